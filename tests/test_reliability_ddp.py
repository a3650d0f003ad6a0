"""Two processes (DDP with gloo on CPU) give what one process gives.

``test``: the same answers and metrics, each sample scored and written once although
DistributedSampler repeats one to even out the ranks (and leaves one rank without any POPE sample).
``fit``: with shuffling off and the same global batch (4 = 1 x 4 = 2 x 2), the tuned compressor
weights agree to float precision: the module normalizes its losses over the global batch, so
DDP's gradient average equals the one-process gradient.

The two-process runs go through ``python -m sparsezip_pl`` in a subprocess, as a user runs them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparsezip_pl.cli import main
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.models.tiny import cached_tiny_llava

COMPRESSOR = {"method": "sparsezip", "k_min": 2, "k_max": 12, "merging": {"contextual_num": 4}}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed"),
    pytest.mark.filterwarnings("ignore::UserWarning",
                               "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=2, n_mme_images=1, n_pope_images=1, n_instruct=8)


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


def _config(path: Path, tiny_model: str, data: dict, devices: int, **extra) -> str:
    trainer = {"accelerator": "cpu", "devices": devices, "enable_progress_bar": False, "enable_model_summary": False,
               "logger": False, "default_root_dir": str(path.parent / path.stem)}
    if devices > 1:
        trainer["strategy"] = "ddp"
    config = {"seed_everything": 3, "trainer": trainer, "data": data,
              "model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "max_new_tokens": 3}}
    for key, value in extra.items():
        config.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _run_two_processes(command: str, config: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "sparsezip_pl", command, "--config", config], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_test_with_two_processes_scores_each_sample_once(tmp_path, world, tiny_model):
    data = {"class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
            "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                          "pope_image_dir": world["pope_image_folder"], "pope_splits": ["random"],
                          "max_per_category": 1, "batch_size": 2}}
    # 8 MME questions then 1 POPE question: rank 0 gets samples 0, 2, 4, 6, 8 (the POPE one),
    # rank 1 gets 1, 3, 5, 7 and a repeat of sample 0.
    main(["test", "--config", _config(tmp_path / "one.yaml", tiny_model, data, 1,
                                      predictions={"output_dir": str(tmp_path / "p1")})])
    expected = json.loads((tmp_path / "one" / "results.json").read_text())
    _run_two_processes("test", _config(tmp_path / "two.yaml", tiny_model, data, 2,
                                       predictions={"output_dir": str(tmp_path / "p2")}), tmp_path)

    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["test/mme/num_samples"] == 8 and results["test/pope/num_samples"] == 1
    assert results == pytest.approx(expected, rel=1e-6, abs=1e-6)
    rank_files = [tmp_path / "p2" / f"predictions.rank{rank}.jsonl" for rank in (0, 1)]
    rank_lines = [r["sample_id"] for path in rank_files for r in _read_jsonl(path)]
    assert len(rank_lines) == 10 and len(set(rank_lines)) == 9, "the padded repeat is written, then merged away"
    merged = {r["sample_id"]: r["prediction"] for r in _read_jsonl(tmp_path / "p2" / "predictions.jsonl")}
    assert merged == {r["sample_id"]: r["prediction"] for r in _read_jsonl(tmp_path / "p1" / "predictions.jsonl")}


def test_fit_with_two_processes_matches_one_process(tmp_path, world, tiny_model):
    def fit_config(name, devices, batch_size):
        data = {"class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
                "init_args": {"train_source": world["instruct_json"], "batch_size": batch_size, "shuffle": False}}
        checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(tmp_path / name / "ckpt"), "save_last": True}}
        return _config(tmp_path / f"{name}.yaml", tiny_model, data, devices,
                       model={"objective": "mix", "budget_target": 8.0,
                              "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}},
                       trainer={"max_steps": 2, "callbacks": [checkpoint]})

    one = main(["fit", "--config", fit_config("one", 1, 4)])
    _run_two_processes("fit", fit_config("two", 2, 2), tmp_path)

    tuned = torch.load(tmp_path / "two" / "ckpt" / "last.ckpt", weights_only=True)
    assert tuned["global_step"] == 2
    reference = {f"model.compressor.{k}": v for k, v in one.model.model.compressor.state_dict().items()}
    assert set(tuned["state_dict"]) == set(reference)
    assert not torch.allclose(reference["model.compressor.scorer.alphas"], torch.tensor([1.0, 0.4, 0.6])), "trained"
    for key, value in reference.items():
        torch.testing.assert_close(tuned["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_fit_with_two_processes_validates_the_start(tmp_path, world, tiny_model):
    """ValidateBeforeTraining runs the validation loop on every rank before step 0 (no hang), and the
    monitored checkpoint saves there as after each later validation."""
    val = {"class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
           "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                         "pope_image_dir": world["pope_image_folder"], "pope_splits": ["random"],
                         "max_per_category": 1, "batch_size": 2}}
    data = {"class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
            "init_args": {"train_source": world["instruct_json"], "batch_size": 2, "val_benchmark": val}}
    callbacks = [{"class_path": "sparsezip_pl.lit.callbacks.ValidateBeforeTraining"},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "{step}", "save_top_k": -1,
                                "monitor": "val/mme/perception_total_4of10", "mode": "max"}}]
    config = _config(tmp_path / "two.yaml", tiny_model, data, 2,
                     model={"objective": "distill", "budget_target": 8.0},
                     trainer={"max_steps": 2, "val_check_interval": 1, "check_val_every_n_epoch": None,
                              "num_sanity_val_steps": 0, "callbacks": callbacks})
    _run_two_processes("fit", config, tmp_path)
    saved = {torch.load(path, weights_only=False)["global_step"] for path in (tmp_path / "ckpt").glob("*.ckpt")}
    assert saved == {0, 1, 2}
