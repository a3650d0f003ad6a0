"""Tiny data sets in the official MME / POPE / instruction layouts, with synthetic images.

Each writer returns what the tests need to check results (paths and the expected ground truths).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

# Two questions per image with a known mix of answers.
MME_QA = [
    ("Is there a red square in the image? Please answer yes or no.", "Yes"),
    ("Is there a blue circle in the image? Please answer yes or no.", "No"),
]
POPE_OBJECTS = ["dog", "cat", "car", "tree"]


def make_image(path: Path | None = None, size=(8, 8), mode: str = "RGB", color: Any = None) -> bytes:
    """Write (if ``path``) and return the encoded bytes of a plain synthetic image."""
    if color is None:
        color = {"RGB": (200, 30, 30), "RGBA": (0, 0, 255, 0), "L": 128, "CMYK": (0, 255, 255, 0),
                 "LA": (10, 0), "P": 3, "I;16": 40000}.get(mode, 0)
    image = Image.new(mode, size, color)
    fmt = "JPEG" if path is not None and path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    if mode in ("CMYK",):
        fmt = "JPEG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def write_mme_folder(
    tmp: Path, subtasks=("existence", "code_reasoning"), n_images: int = 2, layout: str = "side_by_side"
) -> Path:
    """``MME_Benchmark_release_version/`` with ``n_images`` images per subtask.

    ``layout``: ``"side_by_side"`` (images and txt in the subtask folder) or ``"split"``
    (``images/`` + ``questions_answers_YN/``). Perception images are .jpg, cognition .png.
    """
    root = tmp / "MME_Benchmark_release_version"
    for subtask in subtasks:
        folder = root / subtask
        ext = ".png" if subtask in ("commonsense_reasoning", "numerical_calculation", "text_translation",
                                    "code_reasoning") else ".jpg"
        img_dir, txt_dir = (folder / "images", folder / "questions_answers_YN") if layout == "split" else (folder, folder)
        for i in range(n_images):
            name = f"{i:04d}"
            make_image(img_dir / f"{name}{ext}")
            txt_dir.mkdir(parents=True, exist_ok=True)
            (txt_dir / f"{name}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in MME_QA), encoding="utf-8")
    return root


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import datasets

    features = datasets.Features({
        k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows[0]
    })
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def write_mme_parquet(tmp: Path, subtasks=("existence", "code_reasoning"), n_images: int = 2) -> Path:
    """A folder like the Hugging Face MME release: ``data/test-00000-of-00001.parquet``."""
    rows = []
    for subtask in subtasks:
        ext = ".png" if subtask == "code_reasoning" else ".jpg"
        for i in range(n_images):
            image = make_image(None)
            for q, a in MME_QA:
                rows.append({"question_id": f"{subtask}/{i:04d}{ext}", "image": {"bytes": image, "path": None},
                             "question": q, "answer": a, "category": subtask})
    root = tmp / "mme_hf"
    _write_parquet(rows, root / "data" / "test-00000-of-00001.parquet")
    return root


def pope_rows(split: str, n: int = 4) -> list[dict[str, Any]]:
    """POPE lines for one split: alternating yes/no labels over ``n`` questions."""
    return [
        {"question_id": i + 1, "image": f"COCO_val2014_{i % 2:012d}.jpg",
         "text": f"Is there a {POPE_OBJECTS[i % len(POPE_OBJECTS)]} in the image?",
         "label": "yes" if i % 2 == 0 else "no"}
        for i in range(n)
    ]


def write_coco_images(tmp: Path, n: int = 2) -> Path:
    """A COCO val2014-style image folder."""
    folder = tmp / "val2014"
    for i in range(n):
        make_image(folder / f"COCO_val2014_{i:012d}.jpg")
    return folder


def write_pope_files(tmp: Path, splits=("random", "popular", "adversarial"), n: int = 4) -> tuple[Path, Path]:
    """``coco_pope_SPLIT.json`` files (one JSON object per line) + images; returns (folder, image folder)."""
    folder = tmp / "pope"
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        lines = [json.dumps(r) for r in pope_rows(split, n)]
        (folder / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, write_coco_images(tmp)


def write_pope_merged(tmp: Path, n: int = 4, with_labels: bool = True) -> Path:
    """LLaVA-style merged JSONL with a ``category`` field (labels optional)."""
    lines = []
    qid = 0
    for split in ("random", "popular", "adversarial"):
        for row in pope_rows(split, n):
            qid += 1
            row = dict(row, question_id=qid, category=split)
            if not with_labels:
                row.pop("label")
            lines.append(json.dumps(row))
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "llava_pope_test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pope_parquet(tmp: Path, n: int = 4) -> Path:
    """A folder like the Hugging Face POPE release."""
    rows = []
    for split in ("adversarial", "popular", "random"):
        for r in pope_rows(split, n):
            rows.append({"id": str(len(rows)), "question_id": str(r["question_id"]), "question": r["text"],
                         "answer": r["label"], "image_source": r["image"].removesuffix(".jpg"),
                         "image": {"bytes": make_image(None), "path": None}, "category": split})
    root = tmp / "pope_hf"
    _write_parquet(rows, root / "data" / "test-00000-of-00001.parquet")
    return root


def instruct_records() -> list[dict[str, Any]]:
    """Three valid records: two with images (one multi-turn), one text-only without id."""
    return [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                           {"from": "gpt", "value": "The bus is white and red."},
                           {"from": "human", "value": "Where is it?"},
                           {"from": "gpt", "value": "On a street."}]},
        {"id": 42, "image": "coco/train2017/000000000042.jpg",
         "conversations": [{"from": "human", "value": "Describe it.\n<image>"},
                           {"from": "gpt", "value": "A red square."}]},
        {"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]},
    ]


def write_instruct(tmp: Path, records: list[dict[str, Any]] | None = None, fmt: str = "json") -> tuple[Path, Path]:
    """Write records as a JSON list (``fmt="json"``) or JSONL, plus their images; returns (file, image dir)."""
    records = instruct_records() if records is None else records
    image_dir = tmp / "images"
    for record in records:
        if isinstance(record.get("image"), str):
            make_image(image_dir / record["image"])
    path = tmp / ("instruct.json" if fmt == "json" else "instruct.jsonl")
    if fmt == "json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path, image_dir
