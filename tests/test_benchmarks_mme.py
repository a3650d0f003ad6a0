"""MME reading: both folder layouts and parquet, subtask selection, bad input in raise/skip mode."""

import logging

import pytest

from data_fixtures import make_image, write_mme_folder, write_mme_parquet
from sparsezip_pl.data.common import SAMPLE_KEYS, DataError, SkipLedger, SkippedSample
from sparsezip_pl.benchmarks.mme import MME_SUBTASKS, build_mme_dataset, mme_prompt, write_mme_export

SUFFIX = "\nAnswer the question using a single word or phrase."


def _summary(dataset):
    return [(s["sample_id"], s["category"], s["question"], s["answer"], s["pair_id"])
            for s in (dataset[i] for i in range(len(dataset)))]


def test_prompt_rule():
    assert mme_prompt("Is it red? Please answer yes or no.") == "Is it red?" + SUFFIX
    assert mme_prompt("Is it red?") == "Is it red?" + SUFFIX


@pytest.mark.parametrize("layout", ["side_by_side", "split"])
def test_folder_layouts(tmp_path, layout):
    root = write_mme_folder(tmp_path, layout=layout)
    dataset = build_mme_dataset(str(root))
    assert len(dataset) == 8
    sample = dataset[0]
    assert tuple(sample) == SAMPLE_KEYS
    assert sample["sample_id"] == "existence/0000.jpg#0" and dataset[1]["sample_id"] == "existence/0000.jpg#1"
    assert sample["task"] == "mme" and sample["pair_id"] == "existence/0000"
    assert sample["question"] == "Is there a red square in the image?" + SUFFIX
    assert [dataset[i]["answer"] for i in range(2)] == ["yes", "no"]
    assert sample["image"].mode == "RGB" and sample["image_path"].endswith("0000.jpg")
    assert sample["conversations"] is None
    # canonical order: perception before cognition; cognition images are png
    assert dataset[4]["sample_id"] == "code_reasoning/0000.png#0"


def test_root_may_be_parent_and_parquet_matches_folder(tmp_path):
    folder = build_mme_dataset(str(write_mme_folder(tmp_path).parent))  # the folder holding the release
    parquet = build_mme_dataset(str(write_mme_parquet(tmp_path)), cache_dir=str(tmp_path / "hf"))
    assert _summary(folder) == _summary(parquet)
    assert parquet[0]["image"].mode == "RGB" and parquet[0]["image_path"] == "existence/0000.jpg"


def test_subtask_selection(tmp_path, caplog):
    root = str(write_mme_folder(tmp_path, subtasks=("existence", "OCR", "code_reasoning"), n_images=1))
    with caplog.at_level(logging.WARNING):
        assert len(build_mme_dataset(root)) == 6
    assert "lacks subtask(s)" in caplog.text and "'count'" in caplog.text
    dataset = build_mme_dataset(root, subtasks=["code_reasoning", "OCR"])
    assert [dataset[i]["category"] for i in range(4)] == ["OCR"] * 2 + ["code_reasoning"] * 2
    with pytest.raises(ValueError, match="unknown MME subtask.*'ocr'.*valid names.*'OCR'"):
        build_mme_dataset(root, subtasks=["ocr"])
    with pytest.raises(DataError, match=r"requested MME subtask\(s\) \['count'\] not found"):
        build_mme_dataset(root, subtasks=["existence", "count"])


def test_max_per_category(tmp_path):
    dataset = build_mme_dataset(str(write_mme_folder(tmp_path, n_images=3)), max_per_category=1)
    assert len(dataset) == 4


def _break(root, case):
    """Damage image 0001 of 'existence'; returns the expected reason and message pattern."""
    txt, img = root / "existence" / "0001.txt", root / "existence" / "0001.jpg"
    if case == "one_line":
        txt.write_text("Is it? Please answer yes or no.\tYes\n")
        return "malformed_pair", r"0001.txt: expected 2 lines.*found 1"
    if case == "no_tab":
        txt.write_text("Is it? Yes\nIs it not?\tNo\n")
        return "malformed_pair", r"0001.txt: line 1: expected 'question<TAB>answer', found 1 tab-separated field$"
    if case == "three_fields":  # rsplit on the last tab would have read "Is it?\tmaybe" as the question
        txt.write_text("Is it?\tNo\nIs it?\tmaybe\tYes\n")
        return "malformed_pair", r"0001.txt: line 2: expected 'question<TAB>answer', found 3 tab-separated fields"
    if case == "empty_question":
        txt.write_text("\n \tYes\nIs it not?\tNo\n")
        return "malformed_pair", r"0001.txt: line 2: empty question"
    if case == "bad_answer":
        txt.write_text("Is it?\tYes\nIs it not?\tMaybe\n")
        return "bad_answer", r"0001.txt: line 2: answer 'Maybe' is not Yes/No"
    if case == "missing_image":
        img.unlink()
        return "missing_image", r"0001.txt: image 0001.jpg/.png not found"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["one_line", "no_tab", "three_fields", "empty_question", "bad_answer",
                                  "missing_image"])
def test_bad_annotations(tmp_path, case):
    root = write_mme_folder(tmp_path)
    reason, pattern = _break(root, case)
    with pytest.raises(DataError, match=pattern) as info:
        build_mme_dataset(str(root))
    assert info.value.reason == reason
    ledger = SkipLedger()
    dataset = build_mme_dataset(str(root), on_error="skip", ledger=ledger)
    assert len(dataset) == 6  # the whole pair is dropped
    assert ledger.counts == {reason: 1}
    assert "existence/0001" not in {dataset[i]["pair_id"] for i in range(len(dataset))}


def test_corrupt_image_is_lazy(tmp_path):
    root = write_mme_folder(tmp_path)
    (root / "existence" / "0001.jpg").write_bytes(b"garbage")
    dataset = build_mme_dataset(str(root))  # set-up only checks existence
    assert len(dataset) == 8
    with pytest.raises(DataError, match=r"existence/0001.jpg#0.*0001.jpg: cannot decode"):
        dataset[2]
    skipping = build_mme_dataset(str(root), on_error="skip")
    item = skipping[2]
    assert isinstance(item, SkippedSample) and item.reason == "corrupt_image" and item.key == "mme:existence/0001"
    ledger = SkipLedger()
    verified = build_mme_dataset(str(root), on_error="skip", ledger=ledger, verify_images=True)
    assert len(verified) == 6 and ledger.counts == {"corrupt_image": 1}


def test_empty_sources(tmp_path):
    (tmp_path / "MME_Benchmark_release_version" / "existence").mkdir(parents=True)
    with pytest.raises(DataError, match="no usable samples"):
        build_mme_dataset(str(tmp_path))
    root = write_mme_folder(tmp_path / "b", subtasks=("existence",), n_images=1)
    (root / "existence" / "0000.txt").write_text("only one line\tYes\n")
    with pytest.raises(DataError, match=r"no usable samples \(1 skipped \(malformed_pair=1\)\)"):
        build_mme_dataset(str(root), on_error="skip")
    with pytest.raises(DataError, match="not an MME source"):
        build_mme_dataset(str(tmp_path / "b" / "MME_Benchmark_release_version" / "existence"))


def test_parquet_bad_rows(tmp_path):
    import datasets

    source = write_mme_parquet(tmp_path)
    file = source / "data" / "test-00000-of-00001.parquet"
    table = datasets.Dataset.from_parquet(str(file), cache_dir=str(tmp_path / "c")).to_list()
    table[0]["answer"] = "maybe"  # existence/0000 pair: bad answer
    table = [r for i, r in enumerate(table) if i != 3]  # existence/0001 pair: one question left
    table[-1]["category"] = "colour"  # code_reasoning/0001: unknown category (its pair partner stays)
    bad = tmp_path / "bad"
    bad.mkdir()
    datasets.Dataset.from_list(table).to_parquet(str(bad / "test-00000-of-00001.parquet"))
    with pytest.raises(DataError, match="row 6 .*unknown category 'colour'"):
        build_mme_dataset(str(bad), cache_dir=str(tmp_path / "hf"), subtasks=["existence"])
    ledger = SkipLedger()
    dataset = build_mme_dataset(str(bad), on_error="skip", ledger=ledger, cache_dir=str(tmp_path / "hf"))
    assert ledger.counts == {"bad_answer": 1, "malformed_pair": 1, "unknown_subtask": 1}
    assert {dataset[i]["pair_id"] for i in range(len(dataset))} == {"code_reasoning/0000"}


def test_valid_subtask_names():
    assert len(MME_SUBTASKS) == 14 and MME_SUBTASKS[9] == "OCR"


def test_export(tmp_path):
    root = write_mme_folder(tmp_path, subtasks=("existence",), n_images=1)
    dataset = build_mme_dataset(str(root))
    rows = [dict(dataset[i], prediction=p) for i, p in enumerate(["Yes.", "No\tway"])]
    (path,) = write_mme_export(tmp_path / "out", rows)
    assert path.name == "existence.txt"
    assert path.read_text().splitlines() == [
        "0000.jpg\tIs there a red square in the image? Please answer yes or no.\tYes\tYes.",
        "0000.jpg\tIs there a blue circle in the image? Please answer yes or no.\tNo\tNo way",
    ]


def test_unreadable_png_name_in_cognition(tmp_path):
    root = write_mme_folder(tmp_path, subtasks=("code_reasoning",), n_images=1)
    make_image(root / "code_reasoning" / "0000.png", mode="RGBA")
    assert build_mme_dataset(str(root))[0]["image"].mode == "RGB"
