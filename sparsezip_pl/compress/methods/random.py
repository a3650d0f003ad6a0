"""``random``: ``budget`` patches drawn uniformly at random, in spatial order (no CLS token).

The smallest complete method, and the pattern for a new one: a config dataclass whose fields
become ``--model.compressor.<name>.<field>`` options, and a :class:`VisionMethod` subclass
registered under its name with ``output_length`` and ``forward`` (here
:class:`~sparsezip_pl.compress.selection.SelectionMethod`, which gives ``output_length`` to the
methods that keep exactly ``budget`` patches). A file in this folder is all it takes: the
registry imports it, and the CLI, the Python API and ``bench/methods.py`` find it.

The draw is a counter-based hash of (seed, patch index) (:func:`merge.hash_uniform`), not a
random generator: it is the same on every device, for every batch size and for an image
wherever it sits in a batch, and it never touches the global random state. It depends on
nothing but the seed and the patch count, so every image of a run keeps the same random subset
of patches (a content-dependent draw would hang on the last bits of the features, which
batching and devices change); another seed draws another subset.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..merge import hash_uniform
from ..registry import register_method
from ..selection import SelectionMethod, selection_output
from ..types import CompressionOutput, VisionCapture


@dataclass
class RandomConfig:
    """Options of the random selection."""

    seed: int = 0
    """Seed of the draw: the same seed keeps the same patches."""


@register_method("random", config=RandomConfig)
class RandomSelection(SelectionMethod):
    """Random: ``budget`` patches drawn uniformly without replacement (seeded), in spatial order."""

    def forward(self, capture: VisionCapture) -> CompressionOutput:
        patches = capture.patches()  # [B, N, C], with or without a CLS token in the capture
        batch, n, _ = patches.shape
        noise = hash_uniform(1, n, self.config.seed, patches.device).expand(batch, n)
        # The K largest of N i.i.d. uniforms are a uniform K-subset; the stable sort breaks the
        # (rare) ties of the 24-bit noise by patch index, identically on every device.
        kept = noise.argsort(dim=1, descending=True, stable=True)[:, : self.kept_count(capture)]
        return selection_output(patches, kept, noise)
