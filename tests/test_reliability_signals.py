"""A stopped run never looks successful: SIGTERM or Ctrl-C during ``test`` or ``fit`` keeps the
answers (or a checkpoint) so far, marks the run record interrupted, exits non-zero, and the same
command run again resumes. The runs go through ``python -m sparsezip_pl`` in a subprocess that
signals itself (``signal_helpers.SignalAt``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.lit.run_folder import RECORD_NAME
from sparsezip_pl.models.tiny import cached_tiny_llava

TESTS = Path(__file__).resolve().parent
COMPRESSOR = {"method": "sparsezip", "k_min": 2, "k_max": 12, "merging": {"contextual_num": 4}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=9, n_mme_images=2, n_pope_images=2, n_instruct=8)


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


def _run(command: str, config: dict, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    path = folder / f"{command}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "sparsezip_pl", command, "--config", str(path), *extra],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def _signal(name: str, **at) -> dict:
    return {"class_path": "signal_helpers.SignalAt", "init_args": {"signal_name": name, **at}}


def _test_config(world, tiny_model, run_dir: Path, predictions: Path, callbacks=()) -> dict:
    return {
        "model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "max_new_tokens": 3},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(run_dir), "callbacks": list(callbacks)},
        "predictions": {"output_dir": str(predictions)},
        "data": {"class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
                 "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                               "pope_image_dir": world["pope_image_folder"], "batch_size": 2,
                               "max_per_category": 1}},
    }


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stopped_test_exits_non_zero_keeps_its_answers_and_resumes(tmp_path, world, tiny_model, name, status):
    predictions = tmp_path / "answers"
    stopped = _run("test", _test_config(world, tiny_model, tmp_path / "first", predictions, [_signal(name, batch=1)]),
                   tmp_path)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    kept = _lines(predictions / "predictions.rank0.jsonl")
    assert len(kept) == 4, "the batch in flight finished and was flushed"
    assert not (predictions / "predictions.jsonl").exists(), "no merged file, as if the run had finished"
    for folder in (tmp_path / "first", predictions):
        assert json.loads((folder / RECORD_NAME).read_text())["status"] == "interrupted"
    assert not (tmp_path / "first" / "results.json").exists()

    resumed = _run("test", _test_config(world, tiny_model, tmp_path / "second", predictions), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "4 samples already answered" in resumed.stdout + resumed.stderr
    merged = _lines(predictions / "predictions.jsonl")
    assert len(merged) == len({r["sample_id"] for r in merged}) > 4
    assert json.loads((predictions / RECORD_NAME).read_text())["status"] == "finished"


def test_a_stopped_fit_saves_a_checkpoint_exits_non_zero_and_resumes(tmp_path, world, tiny_model):
    def config(callbacks=()):
        checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_on_exception": True}}
        return {
            "seed_everything": 4,
            "model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "objective": "lm"},
            "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                        "logger": False, "default_root_dir": str(tmp_path / "fit"), "max_steps": 4,
                        "callbacks": [checkpoint, *callbacks]},
            "data": {"class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
                     "init_args": {"train_source": world["instruct_json"], "batch_size": 2}},
        }

    stopped = _run("fit", config([_signal("SIGTERM", train_step=1)]), tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert json.loads((tmp_path / "fit" / RECORD_NAME).read_text())["status"] == "interrupted"

    resumed = _run("fit", config(), tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    record = json.loads((tmp_path / "fit" / RECORD_NAME).read_text())
    assert record["status"] == "finished" and [run["status"] for run in record["runs"]] == ["interrupted", "finished"]
