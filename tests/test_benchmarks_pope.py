"""POPE reading: split files, merged JSONL, parquet, split selection, bad input."""

import json

import pytest

from data_fixtures import write_pope_files, write_pope_merged, write_pope_parquet
from sparsezip_pl.data.common import SAMPLE_KEYS, DataError, SkipLedger
from sparsezip_pl.benchmarks.pope import build_pope_dataset

SUFFIX = "\nAnswer the question using a single word or phrase."


def _rows(dataset):
    return [(s["sample_id"], s["category"], s["question"], s["answer"])
            for s in (dataset[i] for i in range(len(dataset)))]


def test_split_files(tmp_path):
    folder, images = write_pope_files(tmp_path)
    dataset = build_pope_dataset(str(folder), image_dir=str(images))
    assert len(dataset) == 12
    sample = dataset[0]
    assert tuple(sample) == SAMPLE_KEYS
    assert sample["sample_id"] == "random/1" and sample["task"] == "pope" and sample["category"] == "random"
    assert sample["question"] == "Is there a dog in the image?" + SUFFIX
    assert sample["answer"] == "yes" and dataset[1]["answer"] == "no"
    assert sample["image"].mode == "RGB" and sample["image_path"].endswith("COCO_val2014_000000000000.jpg")
    assert sample["pair_id"] is None and sample["conversations"] is None
    assert [dataset[i]["category"] for i in (0, 4, 8)] == ["random", "popular", "adversarial"]
    # one split file on its own: the split comes from the file name
    single = build_pope_dataset(str(folder / "coco_pope_popular.json"), image_dir=str(images))
    assert {s for _, s, _, _ in _rows(single)} == {"popular"}


def test_merged_and_parquet_match_split_files(tmp_path):
    folder, images = write_pope_files(tmp_path)
    reference = _rows(build_pope_dataset(str(folder), image_dir=str(images)))
    merged = build_pope_dataset(str(write_pope_merged(tmp_path)), image_dir=str(images))
    assert [r[1:] for r in _rows(merged)] == [r[1:] for r in reference]  # question ids are renumbered
    unlabeled = write_pope_merged(tmp_path / "u", with_labels=False)
    with pytest.raises(DataError, match=r"llava_pope_test.jsonl:1: no 'label' field .*label_dir"):
        build_pope_dataset(str(unlabeled), image_dir=str(images))
    relabeled = build_pope_dataset(str(unlabeled), image_dir=str(images), label_dir=str(folder))
    assert _rows(relabeled) == _rows(merged)
    parquet = build_pope_dataset(str(write_pope_parquet(tmp_path)), cache_dir=str(tmp_path / "hf"))
    assert _rows(parquet) == reference
    assert parquet[0]["image"].mode == "RGB" and parquet[0]["image_path"] == "COCO_val2014_000000000000"


def test_split_selection(tmp_path):
    folder, images = write_pope_files(tmp_path, splits=("random", "adversarial"))
    assert len(build_pope_dataset(str(folder), image_dir=str(images))) == 8
    dataset = build_pope_dataset(str(folder), image_dir=str(images), splits=["adversarial"])
    assert {dataset[i]["category"] for i in range(len(dataset))} == {"adversarial"}
    with pytest.raises(ValueError, match=r"unknown POPE split.*'hard'.*valid names"):
        build_pope_dataset(str(folder), image_dir=str(images), splits=["hard"])
    with pytest.raises(DataError, match=r"requested POPE split\(s\) \['popular'\] not found"):
        build_pope_dataset(str(folder), image_dir=str(images), splits=["popular"])


def _append_line(path, line):
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


CASES = {
    "malformed_json": ('{"question_id": 9, "image": ', r"coco_pope_random.json: line 5: invalid JSON"),
    "bad_answer": (json.dumps({"question_id": 9, "image": "COCO_val2014_000000000000.jpg", "text": "Q?",
                               "label": "maybe"}), r"coco_pope_random.json:5: field 'label' 'maybe' is not yes/no"),
    "missing_image": (json.dumps({"question_id": 9, "image": "COCO_val2014_000000000099.jpg", "text": "Q?",
                                  "label": "no"}), r"coco_pope_random.json:5: image file not found"),
    "duplicate_id": (json.dumps({"question_id": 1, "image": "COCO_val2014_000000000000.jpg", "text": "Q?",
                                 "label": "no"}), r"coco_pope_random.json:5: duplicate question_id random/1"),
    "bad_field": (json.dumps({"question_id": 9, "text": "Q?", "label": "no"}),
                  r"coco_pope_random.json:5: field 'image' missing"),
    "unknown_split": (json.dumps({"question_id": 9, "image": "COCO_val2014_000000000000.jpg", "text": "Q?",
                                  "label": "no", "category": "hard"}), r"coco_pope_random.json:5: unknown split 'hard'"),
}


@pytest.mark.parametrize("reason", list(CASES))
def test_bad_lines(tmp_path, reason):
    folder, images = write_pope_files(tmp_path)
    line, pattern = CASES[reason]
    _append_line(folder / "coco_pope_random.json", line)
    with pytest.raises(DataError, match=pattern) as info:
        build_pope_dataset(str(folder), image_dir=str(images))
    assert info.value.reason == reason
    ledger = SkipLedger()
    dataset = build_pope_dataset(str(folder), image_dir=str(images), on_error="skip", ledger=ledger)
    assert len(dataset) == 12 and ledger.counts == {reason: 1}


def test_empty(tmp_path):
    folder, images = write_pope_files(tmp_path, splits=("random",))
    (folder / "coco_pope_random.json").write_text("\n")
    with pytest.raises(DataError, match="no usable samples"):
        build_pope_dataset(str(folder), image_dir=str(images))
    with pytest.raises(DataError, match="not a POPE source"):
        build_pope_dataset(str(images))


def test_max_per_category(tmp_path):
    folder, images = write_pope_files(tmp_path)
    assert len(build_pope_dataset(str(folder), image_dir=str(images), max_per_category=1)) == 3
