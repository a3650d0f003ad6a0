"""Shared pieces of the data package: errors, skip accounting, record storage and source loading.

Bad input is handled by one policy, ``on_error``:

* ``"raise"`` (default): the first problem stops the run with a :class:`DataError` whose message names
  the file, the line (or record index) and the field.
* ``"skip"``: the offending item is dropped, counted in a :class:`SkipLedger` under a reason and
  logged as a warning (the first :attr:`SkipLedger.max_warnings` individually, then only counted).

Problems in the annotation files (JSON, txt, parquet columns, missing image files) are found
eagerly when a data set is built, in the main process. Image *decoding* happens lazily in
``Dataset.__getitem__`` (so in the DataLoader workers); a decode failure in skip mode returns a
:class:`SkippedSample` instead of a sample, which the loader drops and counts in the main process
(see :mod:`sparsezip_pl.data.loader`).

Skip reasons (the keys of ``datamodule.skipped``):

``missing_image``, ``corrupt_image``, ``malformed_json``, ``bad_field``, ``malformed_pair``,
``bad_answer``, ``unknown_subtask``, ``unknown_split``, ``duplicate_id``, ``no_gpt_turn``,
``missing_image_marker``, ``repeated_image_marker``, ``misplaced_image_marker``,
``unexpected_image_marker``, ``bad_conversation``; and, found when a batch is built (the
LightningModule knows the LLM's context), ``prompt_too_long``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from sparsezip_pl.data.images import ImageLoadError, load_image

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES = ("raise", "skip")

#: The LLaVA-1.5 short-answer instruction appended to MME and POPE questions.
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

#: The keys of every sample dict, in order.
SAMPLE_KEYS = (
    "sample_id",
    "task",
    "category",
    "image",
    "image_path",
    "question",
    "answer",
    "conversations",
    "pair_id",
    "order",
)


class DataError(ValueError):
    """A problem with the input data; the message names the file, line or field.

    ``reason`` is the skip reason the problem is counted under in skip mode.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SkippedSample:
    """Returned by ``__getitem__`` instead of a sample when a lazy load fails in skip mode."""

    key: str
    reason: str
    message: str


def check_on_error(on_error: str) -> str:
    """Validate an ``on_error`` value."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


class SkipLedger:
    """Counts skipped items per reason, each ``(reason, key)`` once, in the process that owns it.

    The same bad image seen again in a later epoch is not counted twice. ``messages`` keeps the
    first ``max_messages`` messages for reports.
    """

    max_warnings = 20
    max_messages = 1000

    def __init__(self) -> None:
        self._keys: dict[str, set[str]] = {}
        self._first: dict[str, str] = {}
        self.messages: list[str] = []
        self._warned = 0

    def record(self, reason: str, key: str, message: str) -> bool:
        """Count one skipped item; returns False when it was already counted."""
        keys = self._keys.setdefault(reason, set())
        if key in keys:
            return False
        keys.add(key)
        self._first.setdefault(reason, message)
        if len(self.messages) < self.max_messages:
            self.messages.append(message)
        if self._warned < self.max_warnings:
            self._warned += 1
            log.warning("skipped (%s): %s", reason, message)
            if self._warned == self.max_warnings:
                log.warning("further skips are counted but not logged one by one")
        return True

    @property
    def counts(self) -> dict[str, int]:
        """Reason -> number of distinct skipped items."""
        return {reason: len(keys) for reason, keys in sorted(self._keys.items()) if keys}

    @property
    def keys(self) -> dict[str, set[str]]:
        """Reason -> the keys of its skipped items (to merge the ledgers of several processes)."""
        return {reason: set(keys) for reason, keys in self._keys.items() if keys}

    @property
    def first_messages(self) -> dict[str, str]:
        """Reason -> the message of its first skipped item (which file, line or sample)."""
        return dict(sorted(self._first.items()))

    def merge(self, other: SkipLedger) -> None:
        """Count ``other``'s skips here too (each item once)."""
        for reason, keys in other._keys.items():
            self._keys.setdefault(reason, set()).update(keys)
        for reason, message in other._first.items():
            self._first.setdefault(reason, message)

    def report(self) -> dict[str, dict[str, Any]]:
        """``{reason: {"count": N, "first": message}}``, the record of a run's skips."""
        first = self.first_messages
        return {reason: {"count": count, "first": first.get(reason, "")} for reason, count in self.counts.items()}

    @property
    def total(self) -> int:
        """All skipped items."""
        return sum(len(keys) for keys in self._keys.values())

    def summary(self) -> str:
        """One line for logs, e.g. ``"3 skipped (missing_image=2, bad_answer=1)"``."""
        counts = self.counts
        if not counts:
            return "0 skipped"
        return f"{self.total} skipped (" + ", ".join(f"{k}={v}" for k, v in counts.items()) + ")"


class IssueHandler:
    """Applies the ``on_error`` policy to a problem found while reading a source."""

    def __init__(self, on_error: str, ledger: SkipLedger | None, name: str) -> None:
        self.on_error = check_on_error(on_error)
        self.ledger = ledger if ledger is not None else SkipLedger()
        self.name = name

    def __call__(self, reason: str, key: str, message: str) -> None:
        """Raise a :class:`DataError` or count the skip, as the policy says."""
        if self.on_error == "raise":
            raise DataError(message, reason)
        self.ledger.record(reason, f"{self.name}:{key}", message)


# --------------------------------------------------------------------------------------------
# Records: compact storage that DataLoader workers can read without copy-on-read blow-up.


class PackedRecords:
    """An immutable list of picklable records stored in one numpy byte buffer.

    A Python list of hundreds of thousands of dicts gets copied page by page into every forked
    worker as reference counts change; one byte buffer plus offsets does not.
    """

    def __init__(self, records: list[dict[str, Any]]) -> None:
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].tobytes())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def make_record(
    *,
    sample_id: str,
    task: str,
    category: str,
    skip_key: str,
    image_file: str | None = None,
    image_row: int | None = None,
    image_path: str | None = None,
    question: str | None = None,
    answer: str | None = None,
    conversations: list[dict[str, str]] | None = None,
    pair_id: str | None = None,
) -> dict[str, Any]:
    """A stored record: the sample fields without the decoded image, plus where the image is."""
    return {
        "sample_id": sample_id,
        "task": task,
        "category": category,
        "image_path": image_path if image_path is not None else image_file,
        "question": question,
        "answer": answer,
        "conversations": conversations,
        "pair_id": pair_id,
        "image_file": image_file,
        "image_row": image_row,
        "skip_key": skip_key,
    }


class RecordDataset(Dataset):
    """Map-style data set of sample dicts (see :data:`SAMPLE_KEYS`) with lazily decoded images.

    Args:
        records: records from :func:`make_record`.
        name: prefix of the skip keys, e.g. ``"mme"``.
        on_error: ``"raise"`` or ``"skip"`` for image decode failures.
        image_rows: for parquet / hub sources, a ``datasets.Dataset`` holding only the ``image``
            column (undecoded); ``record["image_row"]`` indexes it.
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        name: str,
        on_error: str = "raise",
        image_rows: Any = None,
    ) -> None:
        self.records = PackedRecords(records)
        self.name = name
        self.on_error = check_on_error(on_error)
        self.image_rows = image_rows

    def __len__(self) -> int:
        return len(self.records)

    def image_source(self, record: dict[str, Any]) -> Any:
        """What :func:`load_image` reads for a record (a path, bytes dict, or None)."""
        if record["image_row"] is not None:
            return self.image_rows[record["image_row"]]["image"]
        return record["image_file"]

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.records[index]
        image = None
        source = self.image_source(record)
        if source is not None:
            try:
                image = load_image(source, name=record["image_path"])
            except ImageLoadError as err:
                if self.on_error == "raise":
                    raise DataError(f"sample {record['sample_id']}: {err}", err.reason) from err
                return SkippedSample(
                    key=f"{self.name}:{record['skip_key']}",
                    reason=err.reason,
                    message=f"sample {record['sample_id']}: {err}",
                )
        return {
            "sample_id": record["sample_id"],
            "task": record["task"],
            "category": record["category"],
            "image": image,
            "image_path": record["image_path"],
            "question": record["question"],
            "answer": record["answer"],
            "conversations": record["conversations"],
            "pair_id": record["pair_id"],
            "order": index,
        }

    def digest(self) -> str:
        """sha256 of what the samples ask and expect, in order: ids, questions (or
        conversations), answers and image paths. Two data sets with the same digest are scored
        the same way; a resumed run compares it with the digest of the run it continues."""
        digest = hashlib.sha256()
        for record in self.records:
            fields = [record["sample_id"], record["question"], record["answer"], record["conversations"],
                      record["image_path"]]
            digest.update(json.dumps(fields, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()

    def check_first_sample(self) -> None:
        """Decode the first sample now: a source whose images cannot be read fails at set-up, before
        any model weight loads, rather than at its first batch. (In ``skip`` mode a bad first image
        is left to the loaders, which count it.)"""
        if len(self) and self.on_error == "raise":
            self[0]


def verify_record_images(
    records: list[dict[str, Any]], dataset: RecordDataset, handle: IssueHandler
) -> list[dict[str, Any]]:
    """Decode every distinct image once now; drop (or raise for) the records whose image fails.

    Makes lazy skips impossible, so every DDP rank sees the same samples.
    """
    failed: dict[Any, ImageLoadError | None] = {}
    kept = []
    for record in records:
        ident = record["image_file"] if record["image_row"] is None else ("row", record["image_row"])
        if record["image_file"] is None and record["image_row"] is None:
            kept.append(record)
            continue
        if ident not in failed:
            try:
                load_image(dataset.image_source(record), name=record["image_path"])
                failed[ident] = None
            except ImageLoadError as err:
                failed[ident] = err
        err = failed[ident]
        if err is None:
            kept.append(record)
        else:
            handle(err.reason, record["skip_key"], f"sample {record['sample_id']}: {err}")
    return kept


# --------------------------------------------------------------------------------------------
# Reading sources.


def read_json_records(path: str | Path, handle: IssueHandler) -> Iterator[tuple[str, int, dict]]:
    """Yield ``(location, index, record)`` from a JSON list file or a JSON-lines file.

    ``location`` is ``"FILE:LINE"`` for JSON lines and ``"FILE[INDEX]"`` for a JSON list. A line
    that is not valid JSON or not an object is a ``malformed_json`` issue. A JSON list that does
    not parse cannot be read in part: that raises even in skip mode.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}", "malformed_json") from err
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: line {err.lineno} column {err.colno}: invalid JSON: {err.msg}", "malformed_json"
            ) from err
        for index, item in enumerate(items):
            where = f"{path}[{index}]"
            if not isinstance(item, dict):
                handle("malformed_json", where, f"{where}: record is a {type(item).__name__}, not an object")
                continue
            yield where, index, item
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            handle("malformed_json", where, f"{path}: line {lineno}: invalid JSON: {err.msg}")
            index += 1
            continue
        if not isinstance(item, dict):
            handle("malformed_json", where, f"{path}: line {lineno}: not a JSON object")
        else:
            yield where, index, item
        index += 1


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_hub_id(source: str) -> bool:
    """True for ``owner/name`` strings that are not an existing local path."""
    return not os.path.exists(source) and bool(_HUB_ID.match(source))


def parquet_files(path: Path, split: str) -> list[Path]:
    """Parquet files under ``path`` (a file or folder); prefers files named ``SPLIT-*.parquet``."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    files = sorted(path.rglob("*.parquet"))
    for_split = [f for f in files if f.name == f"{split}.parquet" or f.name.startswith(f"{split}-")]
    return for_split or files


def load_hf_dataset(source: str, split: str, cache_dir: str | None = None) -> Any:
    """Load a ``datasets.Dataset`` from a hub id or local parquet file(s)."""
    import datasets

    path = Path(source)
    if path.exists():
        files = parquet_files(path, split)
        if not files:
            raise DataError(f"{source}: no parquet files found", "bad_field")
        return datasets.load_dataset(
            "parquet", data_files={split: [str(f) for f in files]}, split=split, cache_dir=cache_dir
        )
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - the hub client raises many types
        raise DataError(f"{source!r} is not a local path and could not be loaded from the Hugging Face "
                        f"hub (split {split!r}): {err}", "bad_field") from err


def require_columns(ds: Any, columns: tuple[str, ...], source: str) -> None:
    """Raise a :class:`DataError` naming the missing columns of a parquet / hub data set."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {ds.column_names}", "bad_field"
        )


def image_column(ds: Any) -> Any:
    """The ``image`` column alone, left undecoded (``{"bytes", "path"}`` dicts)."""
    import datasets

    images = ds.select_columns(["image"])
    if isinstance(images.features["image"], datasets.Image):
        images = images.cast_column("image", datasets.Image(decode=False))
    return images


def normalize_yes_no(value: Any) -> str | None:
    """``"Yes"``/``" no "`` -> ``"yes"``/``"no"``; anything else -> None."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if value in ("yes", "no") else None


def check_names(given: list[str] | None, valid: tuple[str, ...], what: str) -> list[str] | None:
    """Validate a user's list of subtask / split names (None = all); error lists the valid names."""
    if given is None:
        return None
    if isinstance(given, str):
        given = [given]
    unknown = [g for g in given if g not in valid]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid names: {list(valid)}")
    if not given:
        raise ValueError(f"empty list of {what}s; valid names: {list(valid)}")
    return list(dict.fromkeys(given))


def require_nonempty(records: list, source: str, ledger: SkipLedger) -> None:
    """An empty data set is always an error (never a metric over zero samples)."""
    if not records:
        raise DataError(f"{source}: no usable samples ({ledger.summary()})", "empty")
