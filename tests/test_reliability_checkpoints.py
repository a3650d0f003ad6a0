"""Checkpoints: a corrupt one is named, ``--ckpt_path last`` steps over an unreadable one with a
warning, and a resumed fit neither continues on other data nor ignores a changed learning rate."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sparsezip_pl.cli import CheckpointError, main
from sparsezip_pl.lit.run_folder import RunFolderError
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.models.tiny import cached_tiny_llava

COMPRESSOR = {"method": "sparsezip", "k_min": 2, "k_max": 12, "merging": {"contextual_num": 4}}

pytestmark = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=13, n_mme_images=1, n_pope_images=1, n_instruct=8)


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


def _fit_config(tmp_path: Path, name: str, tiny_model: str, train_source: str, lr: float = 0.05, steps: int = 2) -> str:
    config = {
        "seed_everything": 2,
        "model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "objective": "lm",
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(tmp_path / name), "max_steps": steps,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True,
                                                 "every_n_train_steps": 1, "save_top_k": -1}}]},
        "data": {"class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
                 "init_args": {"train_source": train_source, "batch_size": 2}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _eval_config(tmp_path: Path, name: str, tiny_model: str, world) -> str:
    config = {
        "model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "max_new_tokens": 2},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                    "default_root_dir": str(tmp_path / name)},
        "data": {"class_path": "sparsezip_pl.lit.datamodules.MMEDataModule",
                 "init_args": {"root": world["mme_root"], "max_per_category": 1}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world, tiny_model):
    """A 2-step fit with a checkpoint at every step (ckpt/step=1.ckpt, step=2.ckpt, last.ckpt)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", _fit_config(tmp_path, "fit", tiny_model, world["instruct_json"])])
    return tmp_path


def test_a_corrupt_checkpoint_is_named(tmp_path, trained, world, tiny_model):
    good = trained / "ckpt" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{truncated} is not a readable checkpoint"):
        main(["test", "--config", _eval_config(tmp_path, "t", tiny_model, world), f"--ckpt_path={truncated}"])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        main(["test", "--config", _eval_config(tmp_path, "g", tiny_model, world), f"--ckpt_path={garbage}"])


def test_last_steps_over_an_unreadable_newest_checkpoint(tmp_path, trained, world, tiny_model):
    folder = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", folder)
    older = folder / "last-v1.ckpt"
    shutil.copy(folder / "last.ckpt", older)
    newest = folder / "last.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn while being written
    older.touch()
    import os
    os.utime(newest, (older.stat().st_mtime + 10, older.stat().st_mtime + 10))
    config = _fit_config(tmp_path, "resume", tiny_model, world["instruct_json"], steps=3)
    with pytest.warns(UserWarning, match=f"skipping {newest}: .* is not a readable checkpoint"):
        cli = main(["fit", "--config", config, "--ckpt_path", "last"])
    assert Path(cli.trainer.ckpt_path) == older


def test_resuming_on_other_training_data_is_refused(tmp_path, trained, world, tiny_model):
    records = json.loads(Path(world["instruct_json"]).read_text())
    other = Path(world["instruct_json"]).with_name("fewer.json")
    other.write_text(json.dumps(records[:6]))
    config = _fit_config(tmp_path, "other", tiny_model, str(other), steps=3)
    with pytest.raises(ValueError, match=r"trained on other data \(train\.|train_source: checkpoint"):
        main(["fit", "--config", config, f"--ckpt_path={trained / 'ckpt' / 'last.ckpt'}"])


def test_a_changed_learning_rate_is_applied_on_resume(tmp_path, trained, world, tiny_model):
    config = _fit_config(tmp_path, "lr", tiny_model, world["instruct_json"], lr=0.001, steps=3)
    with pytest.warns(UserWarning, match=r"optimizer had lr = 0.05 .* applies its own lr = 0.001"):
        cli = main(["fit", "--config", config, f"--ckpt_path={trained / 'ckpt' / 'last.ckpt'}"])
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.001
    saved = torch.load(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == 0.001


def test_the_run_record_names_the_evaluated_checkpoint_and_refuses_another(tmp_path, trained, world, tiny_model):
    folder = tmp_path / "answers"
    first, second = trained / "ckpt" / "epoch=0-step=1.ckpt", trained / "ckpt" / "epoch=0-step=2.ckpt"
    config = _eval_config(tmp_path, "eval", tiny_model, world)
    main(["test", "--config", config, "--ckpt_path", str(first), "--predictions.output_dir", str(folder)])
    record = json.loads((folder / "sparsezip_run.json").read_text())
    checkpoint = record["identity"]["checkpoint"]
    assert checkpoint["path"] == str(first.resolve())
    assert checkpoint["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    # Answers of one checkpoint are never continued with another's.
    with pytest.raises(RunFolderError, match="checkpoint"):
        main(["test", "--config", config, "--ckpt_path", str(second), "--predictions.output_dir", str(folder)])
