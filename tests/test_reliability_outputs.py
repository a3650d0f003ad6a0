"""Scores users can trust: official files in their source order, resumed runs that are the same
run, no result over zero samples, and nothing of a user's written over.

The runs use the shipped tiny checkpoint on a small synthetic world, so that the answers follow
the labels (a scrambled answer file then scores visibly worse than the project's own metric)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsezip_pl.cli import main
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.lit.callbacks import NoUsableSamplesError, write_official_files
from sparsezip_pl.lit.run_folder import LOCK_NAME, RECORD_NAME, RunFolder, RunFolderError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = str(REPO / "checkpoints" / "tiny-llava-synth")
VISIONZIP = {"method": "visionzip", "dominant": 54, "merging": {"contextual_num": 10}}

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=77, n_mme_images=2, n_pope_images=3, n_instruct=4)


def _config(tmp_path: Path, name: str, data: dict, predictions: Path | None = None, **sections) -> str:
    config = {
        "model": {"backend": "hf", "model_path": SHIPPED, "max_new_tokens": 3, "compressor": VISIONZIP},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(tmp_path / name)},
        "data": data,
    }
    if predictions is not None:
        config["predictions"] = {"output_dir": str(predictions)}
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _pope(world, splits=("random",), **extra) -> dict:
    return {"class_path": "sparsezip_pl.lit.datamodules.POPEDataModule",
            "init_args": {"source": world["pope_root"], "image_dir": world["pope_image_folder"],
                          "splits": list(splits), "batch_size": 4, **extra}}


def eval_pope_positional(answer_file: Path, label_file: Path) -> dict[str, float]:
    """LLaVA's ``eval_pope.py`` rule, re-implemented: the i-th answer line is scored against the
    i-th line of the split's question file (the answer parsed with the first-sentence / "no" /
    "not" rule); accuracy, precision, recall and F1 in %, positive = yes."""
    labels = [json.loads(line)["label"] == "yes" for line in label_file.read_text().splitlines() if line.strip()]
    answers = []
    for line in answer_file.read_text().splitlines():
        words = json.loads(line)["text"].split(".")[0].replace(",", "").split(" ")
        answers.append(not any(word in ("No", "no", "not") for word in words))
    assert len(answers) == len(labels)
    tp = sum(a and y for a, y in zip(answers, labels))
    fp = sum(a and not y for a, y in zip(answers, labels))
    tn = sum(not a and not y for a, y in zip(answers, labels))
    fn = sum(not a and y for a, y in zip(answers, labels))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"accuracy": 100 * (tp + tn) / len(labels), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * 2 * precision * recall / (precision + recall)}


def test_pope_answer_files_score_like_the_project_under_eval_pope_pairing(tmp_path, world):
    label_file = Path(world["pope_files"]["random"])
    assert len(label_file.read_text().splitlines()) >= 12, "ids 1..N with N >= 10 sort differently as strings"
    folder = tmp_path / "answers"
    cli = main(["test", "--config", _config(tmp_path, "run", _pope(world), folder)])
    ours = {k.split("/")[-1]: v for k, v in cli.model.eval_results.items() if k.startswith("test/pope/random/")}
    official = eval_pope_positional(folder / "pope" / "random_answers.jsonl", label_file)
    for name, value in official.items():
        assert ours[name] == pytest.approx(value, abs=1e-4), name
    assert official["accuracy"] > 80, "answers follow the labels, so a scrambled file would score lower"

    # The same holds when the answers come from several processes' files in any order.
    records = PredictionRecords.read(folder)
    shuffled = list(records.values())
    random.Random(0).shuffle(shuffled)
    again = tmp_path / "reordered"
    write_official_files(again, {r["sample_id"]: r for r in shuffled})
    assert (again / "pope" / "random_answers.jsonl").read_text() == (folder / "pope" / "random_answers.jsonl").read_text()
    assert [json.loads(line)["sample_id"] for line in (again / "predictions.jsonl").read_text().splitlines()] == [
        f"random/{json.loads(line)['question_id']}" for line in label_file.read_text().splitlines()]


class PredictionRecords:
    @staticmethod
    def read(folder: Path) -> dict[str, dict]:
        from sparsezip_pl.lit.callbacks import PredictionWriter

        return PredictionWriter.read_records(folder)


def test_mme_files_keep_the_source_order(tmp_path, world):
    data = {"class_path": "sparsezip_pl.lit.datamodules.MMEDataModule",
            "init_args": {"root": world["mme_root"], "subtasks": ["count"], "batch_size": 3}}
    folder = tmp_path / "mme-answers"
    main(["test", "--config", _config(tmp_path, "mme", data, folder)])
    lines = (folder / "mme" / "count.txt").read_text().splitlines()
    expected = []
    for txt in sorted((Path(world["mme_root"]) / "count").glob("*.txt")):
        expected += [(f"{txt.stem}.jpg", line.split("\t")[0]) for line in txt.read_text().splitlines()]
    assert [(line.split("\t")[0], line.split("\t")[1]) for line in lines] == expected


def test_a_run_into_a_folder_of_other_data_is_refused_before_weights_load(tmp_path, world, monkeypatch):
    folder = tmp_path / "answers"
    main(["test", "--config", _config(tmp_path, "first", _pope(world, ("random", "popular")), folder)])
    assert sorted(p.name for p in (folder / "pope").iterdir()) == ["popular_answers.jsonl", "random_answers.jsonl"]

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded before the run folder was checked")

    with monkeypatch.context() as patch:
        patch.setattr("sparsezip_pl.models.load_backend", no_weights)
        with pytest.raises(RunFolderError) as refused:
            main(["test", "--config", _config(tmp_path, "second", _pope(world, ("random",)), folder)])
    message = str(refused.value)
    assert "data.pope.digest" in message and "data.sources.pope_splits: earlier ['random', 'popular'], now ['random']" in message

    # Restarted on purpose: the earlier run's files go, only this run's remain.
    main(["test", "--config", _config(tmp_path, "third", _pope(world, ("random",)), folder),
          "--predictions.restart=true"])
    assert sorted(p.name for p in (folder / "pope").iterdir()) == ["random_answers.jsonl"]
    merged = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert merged and all(r["category"] == "random" for r in merged)
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["status"] == "finished" and record["identity"]["data"]["sources"]["pope_splits"] == ["random"]


def test_a_users_files_are_never_touched(tmp_path, world):
    users = tmp_path / "my-results"
    (users / "mme").mkdir(parents=True)
    (users / "predictions.jsonl").write_text("my own predictions\n")
    (users / "mme" / "count.txt").write_text("my own count answers\n")
    before = {p: p.read_bytes() for p in users.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="holds files this project did not write"):
        main(["test", "--config", _config(tmp_path, "run", _pope(world), users)])
    assert {p: p.read_bytes() for p in users.rglob("*") if p.is_file()} == before

    # Without a logger the run folder is default_root_dir: a folder of the user's is refused
    # before anything is written there, Lightning's config.yaml included.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my notes\n")
    with pytest.raises(RunFolderError, match="config.yaml"):
        main(["test", "--config", _config(tmp_path, "x", _pope(world), None, trainer={"default_root_dir": str(mine)})])
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]
    assert (mine / "config.yaml").read_text() == "# my notes\n"


def test_two_runs_into_one_folder_at_once(tmp_path, world):
    folder = tmp_path / "answers"
    first = RunFolder(folder)
    first.lock()  # a run still going
    try:
        with pytest.raises(RunFolderError, match="in use by a run still going"):
            main(["test", "--config", _config(tmp_path, "second", _pope(world), folder)])
    finally:
        first.unlock()
    # A crashed run leaves its lock file, but no process holds it: the next run goes ahead.
    script = f"from sparsezip_pl.lit.run_folder import RunFolder; RunFolder({str(folder)!r}).lock(); raise SystemExit(3)"
    assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    assert (folder / LOCK_NAME).exists()
    main(["test", "--config", _config(tmp_path, "third", _pope(world), folder)])
    assert json.loads((folder / RECORD_NAME).read_text())["status"] == "finished"


def _corrupt_images(world, tmp_path: Path) -> Path:
    """A copy of the POPE split whose every image is unreadable."""
    images = tmp_path / "broken"
    images.mkdir()
    for image in Path(world["pope_image_folder"]).iterdir():
        (images / image.name).write_bytes(b"not an image")
    return images


@pytest.mark.parametrize("stage", ["test", "validate", "predict"])
def test_no_usable_sample_is_an_error_with_the_counts(tmp_path, world, stage):
    data = _pope(world, image_dir=str(_corrupt_images(world, tmp_path)), on_error="skip")
    with pytest.raises(NoUsableSamplesError, match=r"no usable sample; corrupt_image: \d+ \(first: sample random/1: image "):
        main([stage, "--config", _config(tmp_path, "run", data, tmp_path / "answers")])
    record = json.loads((tmp_path / "run" / RECORD_NAME).read_text())
    assert record["status"] == "failed"
    assert record["skipped"]["corrupt_image"]["count"] > 0
    assert "cannot decode" in record["skipped"]["corrupt_image"]["first"]


def test_skips_are_recorded_in_fit_and_validate_too(tmp_path, world):
    instruct = Path(world["instruct_json"])
    records = json.loads(instruct.read_text())
    broken = tmp_path / "instruct"
    (broken / "images").mkdir(parents=True)
    for i, record in enumerate(records):
        target = broken / record["image"]
        target.write_bytes(b"broken" if i == 0 else (instruct.parent / record["image"]).read_bytes())
    (broken / "data.json").write_text(json.dumps(records))
    data = {"class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
            "init_args": {"train_source": str(broken / "data.json"), "batch_size": 2, "on_error": "skip",
                          "shuffle": False}}
    sparsezip = {"method": "sparsezip", "sparsezip": {"k_min": 2, "k_max": 12, "merging": {"contextual_num": 4}}}
    config = _config(tmp_path, "fit", data, model={"compressor": sparsezip}, trainer={"max_steps": 1})
    main(["fit", "--config", config])
    record = json.loads((tmp_path / "fit" / RECORD_NAME).read_text())
    assert record["status"] == "finished"
    assert record["skipped"] == {"corrupt_image": {"count": 1, "first": record["skipped"]["corrupt_image"]["first"]}}
    assert "synth_000000" in record["skipped"]["corrupt_image"]["first"]

    images = tmp_path / "one-broken"
    images.mkdir()
    for i, image in enumerate(sorted(Path(world["pope_image_folder"]).iterdir())):
        (images / image.name).write_bytes(b"broken" if i == 0 else image.read_bytes())
    val = _pope(world, ("random", "popular"), image_dir=str(images), on_error="skip")
    main(["validate", "--config", _config(tmp_path, "val", val)])
    results = json.loads((tmp_path / "val" / "results-validate.json").read_text())
    assert results["skipped/corrupt_image"] > 0
    assert "val/pope/avg_2of3/f1" in results and "val/pope/avg/f1" not in results, "2 of the 3 splits: it says so"
    record = json.loads((tmp_path / "val" / RECORD_NAME).read_text())
    assert "COCO_val2014_000000000001.jpg" in record["skipped"]["corrupt_image"]["first"]
