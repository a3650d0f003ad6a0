"""Run folders: the only places the project writes, each marked by its record file.

A folder becomes a run folder when a run claims it: it must not exist yet, or hold nothing but
what a logger made there for this run (TensorBoard's events file, ``hparams.yaml``). A folder
with anything else and no record is someone else's, and the run stops before it writes a byte
(``config.yaml`` included). A folder with a record is the project's: a run may continue there
only if it evaluates the same thing (:func:`identity_differences` names what changed), or start
it afresh with ``restart``, which deletes only the files the record lists as the project's.

The record (``sparsezip_run.json``) holds the run's identity, its status (``running``,
``finished``, ``interrupted``, ``failed``), the files the project wrote there and the skipped
samples. A lock (``sparsezip_run.lock``, held with ``flock`` for the run's lifetime and released
by the system when a process dies) keeps two runs out of one folder at a time.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

RECORD_NAME = "sparsezip_run.json"
LOCK_NAME = "sparsezip_run.lock"
FORMAT = 1
# What a logger writes into its version folder before any callback runs.
LOGGER_FILES = ("events.out.tfevents.*", "hparams.yaml")
_OWN = (RECORD_NAME, LOCK_NAME)


class RunFolderError(RuntimeError):
    """A folder the run may not write into, or may not continue in."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def identity_differences(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: earlier X, now Y"`` for every dotted key whose value differs."""
    a, b = _flatten(earlier), _flatten(now)
    return [f"{key}: earlier {a.get(key)!r}, now {b.get(key)!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class RunFolder:
    """One folder the project writes into (see the module doc).

    Args:
        path: the folder.
        what: how to call it in messages (``"run folder"``, ``"predictions folder"``).
        restart_flag: the option that starts it afresh, named in a refusal.
    """

    def __init__(self, path: str | os.PathLike, what: str = "run folder", restart_flag: str = "--run.restart") -> None:
        self.path = Path(path)
        self.what = what
        self.restart_flag = restart_flag
        self._lock_handle = None

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_NAME

    def read_record(self) -> dict[str, Any] | None:
        """The record, or None when the folder has none (a torn record is an error naming it)."""
        if not self.record_path.is_file():
            return None
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RunFolderError(f"{self.record_path}: unreadable run record ({error}); move the folder aside") from None

    def foreign_entries(self) -> list[str]:
        """Entries of a folder without a record that the project may not write beside."""
        if not self.path.is_dir():
            return []
        return sorted(entry.name for entry in self.path.iterdir()
                      if entry.name not in _OWN and not any(fnmatch.fnmatch(entry.name, p) for p in LOGGER_FILES))

    def check(self, identity: dict[str, Any], restart: bool = False) -> str:
        """Whether this run may write here: ``"new"``, ``"continue"`` (same identity) or
        ``"restart"``; raises :class:`RunFolderError` otherwise. Reads only."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.what} {self.path} is a file, not a folder")
        record = self.read_record()
        if record is None:
            foreign = self.foreign_entries()
            if foreign:
                shown = ", ".join(foreign[:6]) + (" ..." if len(foreign) > 6 else "")
                raise RunFolderError(
                    f"{self.what} {self.path} holds files this project did not write ({shown}) and no "
                    f"{RECORD_NAME}: nothing was written there. Choose a new or empty folder."
                )
            return "new"
        differences = identity_differences(record.get("identity", {}), identity)
        if not differences:
            return "continue"
        if restart:
            return "restart"
        listed = "\n  ".join(differences[:20]) + ("\n  ..." if len(differences) > 20 else "")
        raise RunFolderError(
            f"{self.what} {self.path} holds a run of something else; continuing there would mix two "
            f"evaluations. What differs:\n  {listed}\nUse another folder, or start this one afresh with "
            f"{self.restart_flag}=true (it deletes only the files this project wrote there)."
        )

    # ---------------------------------------------------------------- claiming (one process)
    def lock(self) -> None:
        """Hold the folder's lock until :meth:`unlock` (or the process's end)."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(f"{self.what} {self.path} is in use by a run still going ({holder}); "
                                 "wait for it, or use another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def claim(self, identity: dict[str, Any], verdict: str, stage: str) -> dict[str, Any]:
        """Write the record of a starting run (after :meth:`lock` and :meth:`check`); with
        ``verdict == "restart"`` the files of the earlier run are deleted first."""
        record = self.read_record() if verdict != "new" else None
        if verdict == "restart" and record is not None:
            for name in record.get("files", []):
                (self.path / name).unlink(missing_ok=True)
            record = None
        record = record or {"project": "sparsezip_pl", "format": FORMAT, "files": [], "runs": []}
        record["identity"] = identity
        record["status"] = "running"
        record["runs"].append({"stage": stage, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "pid": os.getpid(), "host": socket.gethostname(), "status": "running"})
        self.write(record)
        return record

    def release_claim(self) -> None:
        """Undo :meth:`claim` of a new folder: remove the record and lock, and the folder if
        nothing else is left in it."""
        for name in _OWN:
            (self.path / name).unlink(missing_ok=True)
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def write(self, record: dict[str, Any]) -> None:
        _atomic_write(self.record_path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")

    def update(self, **fields: Any) -> None:
        """Set top-level fields of the record (``status`` also closes the latest run entry)."""
        record = self.read_record()
        if record is None:
            return
        record.update(fields)
        if "status" in fields and record.get("runs"):
            record["runs"][-1]["status"] = fields["status"]
            record["runs"][-1]["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(record)

    def own_files(self, names: list[str]) -> None:
        """Add files (relative to the folder) to the record's list of the project's files."""
        record = self.read_record()
        if record is None:
            return
        record["files"] = sorted(set(record.get("files", [])) | set(names))
        self.write(record)
