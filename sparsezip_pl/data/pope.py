"""POPE: the three ``coco_pope_SPLIT.json`` files, LLaVA's merged JSONL or the parquet release.

Split selection follows MME's subtask rule: ``splits=None`` means every split present (absent ones
are logged); names given explicitly must be present; unknown names are an error.

LLaVA's merged question file (``llava_pope_test.jsonl``) has a ``category`` field but usually no
labels; pass ``label_dir`` (the folder of ``coco_pope_SPLIT.json``) and labels are looked up by
``(split, image, text)``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from sparsezip_pl.data.common import (
    ANSWER_SUFFIX,
    DataError,
    IssueHandler,
    RecordDataset,
    SkipLedger,
    check_names,
    image_column,
    load_hf_dataset,
    looks_like_hub_id,
    make_record,
    normalize_yes_no,
    parquet_files,
    read_json_records,
    require_columns,
    require_nonempty,
    verify_record_images,
)

log = logging.getLogger(__name__)

POPE_SPLITS = ("random", "popular", "adversarial")
_SPLIT_FILE = re.compile(r"^coco_pope_(\w+)\.jsonl?$")


def pope_prompt(text: str) -> str:
    """The LLaVA-1.5 POPE prompt: the question plus the short-answer line."""
    return text + ANSWER_SUFFIX


def _select(requested: list[str] | None, present: set[str], source: str) -> list[str]:
    if requested is None:
        absent = [s for s in POPE_SPLITS if s not in present]
        if absent:
            log.warning("POPE source %s lacks split(s) %s", source, absent)
        return [s for s in POPE_SPLITS if s in present]
    missing = [s for s in requested if s not in present]
    if missing:
        raise DataError(f"{source}: requested POPE split(s) {missing} not found; present: "
                        f"{[s for s in POPE_SPLITS if s in present]}", "unknown_split")
    return [s for s in POPE_SPLITS if s in requested]


def _split_of_file(path: Path) -> str | None:
    match = _SPLIT_FILE.match(path.name)
    return match.group(1) if match else None


def _read_labels(label_dir: Path, handle: IssueHandler) -> dict[tuple[str, str, str], str]:
    labels = {}
    for path in sorted(label_dir.glob("coco_pope_*.json")):
        split = _split_of_file(path)
        for _, _, item in read_json_records(path, handle):
            labels[(split, str(item.get("image")), str(item.get("text")))] = item.get("label")
    return labels


def read_pope_json(
    files: list[Path],
    image_dir: Path | None,
    splits: list[str] | None,
    handle: IssueHandler,
    label_dir: Path | None = None,
    max_per_category: int | None = None,
) -> list[dict[str, Any]]:
    """Records from per-split files and/or a merged JSONL with a ``category`` field."""
    labels = _read_labels(label_dir, handle) if label_dir is not None else None
    rows: list[tuple[str, str, dict, Path]] = []
    present: set[str] = set()
    for path in files:
        file_split = _split_of_file(path)
        for where, _, item in read_json_records(path, handle):
            split = item.get("category", file_split)
            if split is None:
                raise DataError(f"{where}: no 'category' field and the file name is not "
                                f"coco_pope_SPLIT.json, so the split is unknown", "unknown_split")
            if split not in POPE_SPLITS:
                handle("unknown_split", where, f"{where}: unknown split {split!r}; valid: {list(POPE_SPLITS)}")
                continue
            present.add(split)
            rows.append((where, split, item, path))
    chosen = set(_select(splits, present, ", ".join(str(f) for f in files)))
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    per_split: dict[str, int] = {}
    exists: dict[Path, bool] = {}
    for where, split, item, path in rows:
        if split not in chosen:
            continue
        if max_per_category is not None and per_split.get(split, 0) >= max_per_category:
            continue
        fields = {}
        for field in ("question_id", "image", "text"):
            value = item.get(field)
            if value is None or (field != "question_id" and (not isinstance(value, str) or not value.strip())):
                handle("bad_field", where, f"{where}: field {field!r} missing, empty or not text")
                break
            fields[field] = value
        else:
            sample_id = f"{split}/{fields['question_id']}"
            raw = item.get("label", item.get("answer"))
            if raw is None and labels is not None:
                raw = labels.get((split, fields["image"], fields["text"]))
            if raw is None:
                handle("bad_field", sample_id, f"{where}: no 'label' field"
                       + ("" if labels is not None else " (for LLaVA's merged file pass label_dir)"))
                continue
            answer = normalize_yes_no(raw)
            if answer is None:
                handle("bad_answer", sample_id, f"{where}: field 'label' {raw!r} is not yes/no")
                continue
            if sample_id in seen:
                handle("duplicate_id", f"{sample_id}@{where}", f"{where}: duplicate question_id {sample_id}")
                continue
            image = (image_dir if image_dir is not None else path.parent) / fields["image"]
            if image not in exists:
                exists[image] = image.is_file()
            if not exists[image]:
                handle("missing_image", sample_id, f"{where}: image file not found: {image}")
                continue
            seen.add(sample_id)
            per_split[split] = per_split.get(split, 0) + 1
            records.append(make_record(
                sample_id=sample_id, task="pope", category=split, skip_key=sample_id,
                image_file=str(image), question=pope_prompt(fields["text"]), answer=answer,
            ))
    order = {s: i for i, s in enumerate(POPE_SPLITS)}
    return sorted(records, key=lambda r: order[r["category"]])  # stable: file order within a split


def read_pope_parquet(
    ds: Any, source: str, splits: list[str] | None, handle: IssueHandler, max_per_category: int | None = None
) -> list[dict[str, Any]]:
    """Records from the parquet release (id, question_id, question, answer, image_source, image, category)."""
    require_columns(ds, ("question_id", "question", "answer", "image", "category"), source)
    columns = [c for c in ("question_id", "question", "answer", "category", "image_source") if c in ds.column_names]
    meta = ds.select_columns(columns).to_list()
    present = {m["category"] for m in meta if m["category"] in POPE_SPLITS}
    chosen = set(_select(splits, present, source))
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in POPE_SPLITS}
    seen: set[str] = set()
    for row, item in enumerate(meta):
        where = f"{source}: row {row}"
        split = item["category"]
        if split not in POPE_SPLITS:
            handle("unknown_split", f"row{row}", f"{where}: unknown category {split!r}; valid: {list(POPE_SPLITS)}")
            continue
        if split not in chosen:
            continue
        if max_per_category is not None and len(records[split]) >= max_per_category:
            continue
        sample_id = f"{split}/{item['question_id']}"
        if not isinstance(item["question"], str) or not item["question"].strip():
            handle("bad_field", sample_id, f"{where}: field 'question' is empty or not text")
            continue
        answer = normalize_yes_no(item["answer"])
        if answer is None:
            handle("bad_answer", sample_id, f"{where}: field 'answer' {item['answer']!r} is not yes/no")
            continue
        if sample_id in seen:
            handle("duplicate_id", f"{sample_id}@row{row}", f"{where}: duplicate question_id {sample_id}")
            continue
        seen.add(sample_id)
        records[split].append(make_record(
            sample_id=sample_id, task="pope", category=split, skip_key=sample_id, image_row=row,
            image_path=str(item.get("image_source") or sample_id), question=pope_prompt(item["question"]),
            answer=answer,
        ))
    return [r for s in POPE_SPLITS for r in records[s]]


def build_pope_dataset(
    source: str,
    image_dir: str | None = None,
    splits: list[str] | None = None,
    label_dir: str | None = None,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    hf_split: str = "test",
    cache_dir: str | None = None,
    max_per_category: int | None = None,
    verify_images: bool = False,
) -> RecordDataset:
    """Build the POPE data set.

    Args:
        source: a folder with ``coco_pope_SPLIT.json`` files, one such file, LLaVA's merged JSONL,
            parquet file(s) / a folder of them, or a hub id.
        image_dir: the COCO val2014 image folder (JSON sources); default: the JSON file's folder.
        splits: split names; None = every split present.
        label_dir: folder of ``coco_pope_SPLIT.json`` giving labels to a merged file without them.
        on_error: ``"raise"`` or ``"skip"``.
        ledger: where skips are counted.
        hf_split: split of the parquet / hub release.
        cache_dir: ``datasets`` cache folder for parquet / hub sources.
        max_per_category: keep only the first N questions of each split.
        verify_images: decode every image now (no lazy skips later).
    """
    splits = check_names(splits, POPE_SPLITS, "POPE split")
    handle = IssueHandler(on_error, ledger, "pope")
    path = Path(source)
    image_rows = None
    json_files: list[Path] = []
    if path.is_dir():
        json_files = sorted(f for f in path.glob("coco_pope_*.json*") if _split_of_file(f))
    elif path.is_file() and path.suffix in (".json", ".jsonl"):
        json_files = [path]
    if json_files:
        records = read_pope_json(
            json_files, Path(image_dir) if image_dir else None, splits, handle,
            Path(label_dir) if label_dir else None, max_per_category,
        )
    elif (path.exists() and parquet_files(path, hf_split)) or looks_like_hub_id(source):
        ds = load_hf_dataset(source, hf_split, cache_dir)
        records = read_pope_parquet(ds, source, splits, handle, max_per_category)
        image_rows = image_column(ds)
    else:
        raise DataError(f"{source}: not a POPE source (expected coco_pope_SPLIT.json files, a JSON(L) "
                        f"file, parquet files, or a hub id)", "bad_field")
    dataset = RecordDataset(records, name="pope", on_error=on_error, image_rows=image_rows)
    if verify_images:
        records = verify_record_images(records, dataset, handle)
        dataset = RecordDataset(records, name="pope", on_error=on_error, image_rows=image_rows)
    require_nonempty(records, source, handle.ledger)
    return dataset
