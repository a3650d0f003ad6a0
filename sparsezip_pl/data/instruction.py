"""LLaVA-Instruct-style conversation data -> sample dicts (validated at build time).

A record is ``{"id", "image" (optional), "conversations": [{"from": "human"|"gpt", "value"}...]}``.
Checks (each a skip reason): turns alternate human/gpt starting with human and hold text
(``bad_conversation``); at least one gpt turn (``no_gpt_turn``); with an image, exactly one
``<image>`` marker, in the first human turn (``missing_image_marker``, ``repeated_image_marker``,
``misplaced_image_marker``); without an image, no marker (``unexpected_image_marker``).

``sample_id`` is the record's ``id``; a record without an id gets ``#INDEX`` and a repeated id gets
``ID#INDEX`` (INDEX = position in its source), so ids are unique and stable for a given file.
Local ``.json`` / ``.jsonl`` files are read by our own reader (line numbers in errors, mixed-type
ids as in LLaVA's mix665k); parquet files and hub ids go through ``datasets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsezip_pl.data.common import (
    DataError,
    IssueHandler,
    RecordDataset,
    SkipLedger,
    image_column,
    load_hf_dataset,
    looks_like_hub_id,
    make_record,
    parquet_files,
    read_json_records,
    require_nonempty,
)

IMAGE_MARKER = "<image>"
ROLES = ("human", "gpt")


def check_conversation(conversations: Any, has_image: bool) -> tuple[str, str] | None:
    """Validate one record's turns; returns ``(reason, message)`` or None when fine."""
    if not isinstance(conversations, list) or not conversations:
        return "bad_conversation", "field 'conversations' missing, empty or not a list"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "bad_conversation", f"conversations[{i}] has no text 'value'"
        if turn.get("from") not in ROLES:
            return "bad_conversation", f"conversations[{i}]['from'] is {turn.get('from')!r}, not 'human'/'gpt'"
        if turn["from"] != ROLES[i % 2]:
            return "bad_conversation", (f"conversations[{i}] is from {turn['from']!r}: turns must alternate "
                                        "human/gpt starting with human")
    if not any(t["from"] == "gpt" for t in conversations):
        return "no_gpt_turn", "no 'gpt' turn to train on"
    counts = [t["value"].count(IMAGE_MARKER) for t in conversations]
    total = sum(counts)
    if not has_image:
        if total:
            return "unexpected_image_marker", f"'{IMAGE_MARKER}' in a record without an image"
        return None
    if total == 0:
        return "missing_image_marker", f"record has an image but no '{IMAGE_MARKER}' marker"
    if total > 1:
        return "repeated_image_marker", f"'{IMAGE_MARKER}' appears {total} times (expected once)"
    if counts[0] != 1:
        return "misplaced_image_marker", f"'{IMAGE_MARKER}' is not in the first human turn"
    return None


class _InstructReader:
    """Turns raw records into stored records, applying the checks and the id rule."""

    def __init__(self, handle: IssueHandler, image_base: Path, check_images: bool) -> None:
        self.handle = handle
        self.image_base = image_base
        self.check_images = check_images
        self.seen_ids: set[str] = set()
        self.records: list[dict[str, Any]] = []

    def add(self, where: str, index: int, item: dict[str, Any], image_row: int | None = None) -> None:
        raw_id = item.get("id")
        sample_id = f"#{index}" if raw_id is None or raw_id == "" else str(raw_id)
        if sample_id in self.seen_ids:
            sample_id = f"{sample_id}#{index}"
        image = item.get("image")
        image_file = None
        if image is not None and image_row is None:
            if not isinstance(image, str) or not image:
                self.handle("bad_field", sample_id, f"{where}: field 'image' must be a relative path string")
                return
            image_file = str(self.image_base / image)
        has_image = image is not None
        problem = check_conversation(item.get("conversations"), has_image)
        if problem is not None:
            reason, message = problem
            self.handle(reason, sample_id, f"{where} (id {sample_id}): {message}")
            return
        if image_file is not None and self.check_images and not Path(image_file).is_file():
            self.handle("missing_image", sample_id, f"{where} (id {sample_id}): image file not found: {image_file}")
            return
        self.seen_ids.add(sample_id)
        conversations = [{"from": t["from"], "value": t["value"]} for t in item["conversations"]]
        self.records.append(make_record(
            sample_id=sample_id, task="instruct", category="instruct", skip_key=sample_id,
            image_file=image_file, image_row=image_row if has_image else None,
            image_path=image_file if image_row is None else sample_id,
            conversations=conversations,
        ))


def build_instruct_dataset(
    source: str,
    image_dir: str | None = None,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    name: str = "instruct",
    hf_split: str = "train",
    cache_dir: str | None = None,
    check_images: bool = True,
    max_samples: int | None = None,
) -> RecordDataset:
    """Build an instruction data set.

    Args:
        source: a JSON list / JSONL file, a folder of them (or of parquet files), or a hub id.
        image_dir: folder the records' ``image`` paths are relative to; default: the source's folder
            (the working directory for hub ids).
        on_error: ``"raise"`` or ``"skip"``.
        ledger: where skips are counted.
        name: prefix of skip keys (e.g. ``"instruct-val"``).
        hf_split: split for parquet / hub sources.
        cache_dir: ``datasets`` cache folder for parquet / hub sources.
        check_images: check at build time that every image file exists.
        max_samples: keep only the first N valid records.
    """
    handle = IssueHandler(on_error, ledger, name)
    path = Path(source)
    base = Path(image_dir) if image_dir else (path if path.is_dir() else path.parent) if path.exists() else Path(".")
    reader = _InstructReader(handle, base, check_images)
    image_rows = None
    json_files: list[Path] = []
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        json_files = [path]
    elif path.is_dir():
        json_files = sorted(f for f in path.iterdir() if f.suffix in (".json", ".jsonl"))
    if json_files:
        index = 0
        for file in json_files:
            for where, _, item in read_json_records(file, handle):
                if max_samples is not None and len(reader.records) >= max_samples:
                    break
                reader.add(where, index, item)
                index += 1
    elif (path.exists() and parquet_files(path, hf_split)) or looks_like_hub_id(source):
        ds = load_hf_dataset(source, hf_split, cache_dir)
        if "conversations" not in ds.column_names:
            raise DataError(f"{source}: no 'conversations' column; found {ds.column_names}", "bad_field")
        embedded = "image" in ds.column_names and not _is_path_column(ds)
        meta_columns = [c for c in ("id", "image", "conversations") if c in ds.column_names]
        if embedded:
            meta_columns.remove("image")
            image_rows = image_column(ds)
        missing = ds.data.column("image").is_null().to_pylist() if embedded else None
        for row, item in enumerate(ds.select_columns(meta_columns).to_list()):
            if max_samples is not None and len(reader.records) >= max_samples:
                break
            if embedded:
                item["image"] = None if missing[row] else "<embedded>"
            reader.add(f"{source}: row {row}", row, item, image_row=row if embedded else None)
    else:
        raise DataError(f"{source}: not an instruction source (expected a .json/.jsonl file, a folder of "
                        f"them or of parquet files, or a hub id)", "bad_field")
    require_nonempty(reader.records, source, handle.ledger)
    return RecordDataset(reader.records, name=name, on_error=on_error, image_rows=image_rows)


def _is_path_column(ds: Any) -> bool:
    """True when the ``image`` column holds path strings rather than embedded images."""
    feature = ds.features["image"]
    return getattr(feature, "dtype", None) in ("string", "large_string")
