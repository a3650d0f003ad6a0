"""Instruction data: JSON list / JSONL / parquet, id rule, conversation validation."""

import json

import pytest

from data_fixtures import instruct_records, write_instruct
from sparsezip_pl.data.common import SAMPLE_KEYS, DataError, SkipLedger
from sparsezip_pl.data.instruction import build_instruct_dataset, check_conversation


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_formats(tmp_path, fmt):
    path, images = write_instruct(tmp_path, fmt=fmt)
    dataset = build_instruct_dataset(str(path), image_dir=str(images))
    assert [dataset[i]["sample_id"] for i in range(3)] == ["000000033471", "42", "#2"]
    sample = dataset[0]
    assert tuple(sample) == SAMPLE_KEYS
    assert sample["task"] == "instruct" and sample["category"] == "instruct"
    assert sample["image"].mode == "RGB" and sample["image_path"].endswith("000000033471.jpg")
    assert sample["conversations"] == instruct_records()[0]["conversations"]  # <image> kept as in the source
    assert sample["question"] is None and sample["answer"] is None and sample["pair_id"] is None
    assert dataset[2]["image"] is None and dataset[2]["image_path"] is None


def test_duplicate_ids_and_image_dir_default(tmp_path):
    records = instruct_records()
    records[1]["id"] = "000000033471"
    path, _ = write_instruct(tmp_path, records)
    dataset = build_instruct_dataset(str(path), check_images=False)  # default base: the file's folder
    assert [dataset.records[i]["sample_id"] for i in range(3)] == ["000000033471", "000000033471#1", "#2"]
    assert dataset.records[0]["image_file"] == str(tmp_path / "coco/train2017/000000033471.jpg")
    with pytest.raises(DataError, match=r"instruct.json\[0\] \(id 000000033471\): image file not found"):
        build_instruct_dataset(str(path))  # check_images=True: the images are under tmp/images


BAD = {
    "no_gpt_turn": [{"from": "human", "value": "<image>\nHi"}],
    "missing_image_marker": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
    "repeated_image_marker": [{"from": "human", "value": "<image>\n<image> Hi"}, {"from": "gpt", "value": "Yo"}],
    "misplaced_image_marker": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                               {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Ok"}],
    "bad_conversation": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "Hi"}],
}


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_records(tmp_path, reason):
    records = instruct_records()
    records[1]["conversations"] = BAD[reason]
    path, images = write_instruct(tmp_path, records, fmt="jsonl")
    with pytest.raises(DataError, match=r"instruct.jsonl:2 \(id 42\)") as info:
        build_instruct_dataset(str(path), image_dir=str(images))
    assert info.value.reason == reason
    ledger = SkipLedger()
    dataset = build_instruct_dataset(str(path), image_dir=str(images), on_error="skip", ledger=ledger)
    assert len(dataset) == 2 and ledger.counts == {reason: 1}


@pytest.mark.parametrize(
    ("conversations", "has_image", "reason"),
    [
        ([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}], False, "unexpected_image_marker"),
        ([{"from": "user", "value": "hi"}, {"from": "gpt", "value": "x"}], False, "bad_conversation"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], False, "bad_conversation"),
        ([], False, "bad_conversation"),
        (None, False, "bad_conversation"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], False, None),
    ],
)
def test_check_conversation(conversations, has_image, reason):
    result = check_conversation(conversations, has_image)
    assert (result[0] if result else None) == reason


def test_bad_json_and_missing_image(tmp_path):
    path, images = write_instruct(tmp_path, fmt="jsonl")
    lines = path.read_text().splitlines()
    lines.insert(1, "{not json")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"instruct.jsonl: line 2: invalid JSON"):
        build_instruct_dataset(str(path), image_dir=str(images))
    (images / "coco/train2017/000000000042.jpg").unlink()
    ledger = SkipLedger()
    dataset = build_instruct_dataset(str(path), image_dir=str(images), on_error="skip", ledger=ledger)
    assert len(dataset) == 2 and ledger.counts == {"malformed_json": 1, "missing_image": 1}
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,\n "conversations": [}]')
    with pytest.raises(DataError, match=r"broken.json: line 2 column \d+: invalid JSON"):
        build_instruct_dataset(str(broken), on_error="skip")  # a broken JSON list cannot be read in part


def test_empty_and_max_samples(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no usable samples"):
        build_instruct_dataset(str(empty))
    path, images = write_instruct(tmp_path)
    assert len(build_instruct_dataset(str(path), image_dir=str(images), max_samples=2)) == 2


def test_parquet_with_path_column(tmp_path):
    import datasets

    path, images = write_instruct(tmp_path)
    records = json.loads(path.read_text())
    rows = [{"id": str(r.get("id", "")) or None, "image": r.get("image"), "conversations": r["conversations"]}
            for r in records]
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    dataset = build_instruct_dataset(str(tmp_path / "pq"), image_dir=str(images), cache_dir=str(tmp_path / "hf"))
    assert [dataset[i]["sample_id"] for i in range(3)] == ["000000033471", "42", "#2"]
    assert dataset[1]["image"].mode == "RGB" and dataset[2]["image"] is None
