"""POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023):
yes/no object probes in three splits, read from the three ``coco_pope_SPLIT.json`` files, LLaVA's
merged JSONL or the parquet release.

The prompt is LLaVA-1.5's (the short-answer line added), the answer rule LLaVA's ``eval_pope.py``
rule, the scores accuracy / precision / recall / F1 / yes-ratio per split, and ``export`` writes
one answer file per split in the order of its question file (``eval_pope.py`` pairs the i-th
answer with the i-th question).

Split selection follows MME's subtask rule: ``splits=None`` means every split present (absent ones
are logged); names given explicitly must be present; unknown names are an error.

LLaVA's merged question file (``llava_pope_test.jsonl``) has a ``category`` field but usually no
labels; pass ``label_dir`` (the folder of ``coco_pope_SPLIT.json``) and labels are looked up by
``(split, image, text)``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsezip_pl.benchmarks.base import Benchmark, register_benchmark
from sparsezip_pl.benchmarks.metrics import (
    YES_NO,
    DeduplicatedMetric,
    category_index,
    check_lengths,
    ground_truth,
    partial_name,
    stable_id,
)
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


def parse_pope_answer(text: str) -> str:
    """POPE rule (LLaVA's ``eval_pope.py``): returns ``"yes"`` or ``"no"``.

    Keep the text before the first "."; remove commas; split on spaces; if any word is
    ``No``, ``no`` or ``not`` the answer is no, else yes.
    """
    first = text.split(".", 1)[0]
    words = first.replace(",", "").split(" ")
    if "No" in words or "no" in words or "not" in words:
        return "no"
    return "yes"


def write_pope_export(folder: Path, records: list[dict[str, Any]]) -> list[Path]:
    """``SPLIT_answers.jsonl`` per split (``question_id``, ``prompt``, ``text``: the answers file of
    LLaVA's POPE evaluation), in the order ``records`` come in (their source order)."""
    lines: dict[str, list[str]] = {}
    for record in records:
        question_id = record["sample_id"].split("/", 1)[-1]
        line = {"question_id": int(question_id) if question_id.isdigit() else question_id,
                "prompt": record.get("question"), "text": record["prediction"]}
        lines.setdefault(record["category"], []).append(json.dumps(line, ensure_ascii=False) + "\n")
    written = []
    for split, body in lines.items():
        path = folder / f"{split}_answers.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(body), encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written


class POPEScore(DeduplicatedMetric):
    """POPE scores per split (positive = yes) and their mean over the splits seen.

    ``compute()`` keys: ``SPLIT/accuracy``, ``SPLIT/precision``, ``SPLIT/recall``, ``SPLIT/f1``,
    ``SPLIT/yes_ratio``, ``SPLIT/num_samples``, ``SPLIT/precision_undefined``,
    ``SPLIT/recall_undefined`` for each split seen; ``avg/accuracy`` ... ``avg/yes_ratio`` (plain
    mean over the three splits; a mean over fewer is named ``avg_2of3/...``); ``num_samples``. Percentages. When the model never says yes,
    precision is 0/0: it is reported as 0 with ``precision_undefined = 1`` (likewise recall with no
    positive ground truth); F1 is 0 when precision + recall is 0. Never NaN.
    """

    _columns = ("category", "prediction", "target")

    def update(
        self,
        sample_ids: Sequence[str],
        categories: Sequence[str],
        predictions: Sequence[str],
        targets: Sequence[str],
    ) -> None:
        """Add answers.

        Args:
            sample_ids: unique sample ids (``"split/question_id"``).
            categories: POPE split names.
            predictions: raw model text or ``yes``/``no`` (parsed with LLaVA's rule).
            targets: ground truths ``yes``/``no`` (any case).
        """
        check_lengths(sample_ids=sample_ids, categories=categories, predictions=predictions, targets=targets)
        self._append(
            sample_key=[stable_id(s) for s in sample_ids],
            category=category_index(categories, POPE_SPLITS, "POPE split"),
            prediction=[YES_NO[parse_pope_answer(p)] for p in predictions],
            target=ground_truth(targets),
        )

    def update_from_samples(self, samples: Sequence[dict[str, Any]], predictions: Sequence[str]) -> None:
        """``update`` from sample dicts (``task == "pope"`` ones only) and their predictions."""
        rows = [(s, p) for s, p in zip(samples, predictions, strict=True) if s["task"] == "pope"]
        if rows:
            self.update([s["sample_id"] for s, _ in rows], [s["category"] for s, _ in rows],
                        [p for _, p in rows], [s["answer"] for s, _ in rows])

    def compute(self) -> dict[str, Tensor]:
        """Scores of the de-duplicated answers (see the class doc for the keys)."""
        cols = self._gathered()
        out: dict[str, Tensor] = {}
        per_split: list[dict[str, float]] = []
        for index, split in enumerate(POPE_SPLITS):
            mask = cols["category"] == index
            n = int(mask.sum())
            if n == 0:
                continue
            pred, target = cols["prediction"][mask], cols["target"][mask]
            tp = int(((pred == 1) & (target == 1)).sum())
            fp = int(((pred == 1) & (target == 0)).sum())
            tn = int(((pred == 0) & (target == 0)).sum())
            fn = int(((pred == 0) & (target == 1)).sum())
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            values = {
                "accuracy": 100 * (tp + tn) / n,
                "precision": 100 * precision,
                "recall": 100 * recall,
                "f1": 100 * f1,
                "yes_ratio": 100 * (tp + fp) / n,
            }
            per_split.append(values)
            for name, value in values.items():
                out[f"{split}/{name}"] = torch.tensor(value)
            out[f"{split}/num_samples"] = torch.tensor(float(n))
            out[f"{split}/precision_undefined"] = torch.tensor(float(tp + fp == 0))
            out[f"{split}/recall_undefined"] = torch.tensor(float(tp + fn == 0))
        average = partial_name("avg", len(per_split), len(POPE_SPLITS))
        for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            out[f"{average}/{name}"] = torch.tensor(sum(v[name] for v in per_split) / len(per_split))
        out["num_samples"] = torch.tensor(float(cols["target"].numel()))
        return {k: v.float().to(self.device) for k, v in out.items()}


@register_benchmark("pope")
class POPE(Benchmark):
    """POPE from the per-split files, LLaVA's merged JSONL, the parquet release or its hub id.

    Args:
        source: a folder with ``coco_pope_SPLIT.json`` files, one such file, LLaVA's merged JSONL
            (``category`` field), a folder of the Hugging Face parquet files, or a hub id.
        image_dir: the COCO val2014 image folder for JSON sources (default: the JSON file's folder).
        splits: splits to evaluate; default: every split present. Unknown names are an error.
        label_dir: folder of ``coco_pope_SPLIT.json`` files supplying labels to a merged question
            file that has none (LLaVA's ``llava_pope_test.jsonl``).
        max_per_category: only the first N questions of each split.
        hf_split: split of the parquet / hub release.
        cache_dir: ``datasets`` cache folder for parquet / hub sources.
    """

    def __init__(self, source: str, image_dir: str | None = None, splits: list[str] | None = None,
                 label_dir: str | None = None, max_per_category: int | None = None, hf_split: str = "test",
                 cache_dir: str | None = None) -> None:
        super().__init__(max_per_category, hf_split, cache_dir)
        self.source = source
        self.image_dir = image_dir
        self.splits = splits
        self.label_dir = label_dir

    def load(self, on_error: str = "raise", ledger: SkipLedger | None = None, verify_images: bool = False) -> RecordDataset:
        return build_pope_dataset(self.source, self.image_dir, self.splits, self.label_dir, on_error, ledger,
                                  self.hf_split, self.cache_dir, self.max_per_category, verify_images)

    def sources(self) -> dict[str, Any]:
        return {"pope_source": self.source, "pope_image_dir": self.image_dir, "pope_splits": self.splits,
                "pope_label_dir": self.label_dir, "max_per_category": self.max_per_category, "hf_split": self.hf_split}

    parse = staticmethod(parse_pope_answer)
    metric = staticmethod(POPEScore)

    @staticmethod
    def export(records: list[dict[str, Any]], folder: Path) -> list[Path]:
        return write_pope_export(Path(folder) / "pope", records)
