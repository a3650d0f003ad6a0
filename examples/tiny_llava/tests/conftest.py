"""The lab's modules are a plain folder, not an installed package: put it (and this checkout's
sparsezip_pl) on the import path, as running one of its scripts does."""

import sys
from pathlib import Path

LAB = Path(__file__).resolve().parents[1]
REPO = LAB.parents[1]
for folder in (str(REPO), str(LAB)):
    if folder not in sys.path:
        sys.path.insert(0, folder)
