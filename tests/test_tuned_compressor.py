"""A tuned compressor as a shareable folder: ``python -m sparsezip_pl export`` writes it from a
training checkpoint, and ``sparsezip(model, compressor=...)``, ``--model.compressor_path`` and a
(mocked) hub download read it back; another architecture is refused, another checkpoint warned about."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sparsezip_pl.cli import main
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.integrations.families import detect_checkpoint_family
from sparsezip_pl.integrations.tuned import (
    BaseModelWarning,
    TunedCompressor,
    TunedCompressorError,
    model_name,
    same_model,
)
from sparsezip_pl.models import load_family
from sparsezip_pl.models.loading import ModelNotAvailableError
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples

COMPRESSOR = {"method": "sparsezip", "budget": 32, "sparsezip": {"cross_beta": 0.5}}
MONITOR = "val/mme/perception_total_4of10"

pytestmark = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


def _eval_data(world) -> dict:
    return {"class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
            "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                          "pope_image_dir": world["pope_image_folder"], "batch_size": 8}}


def _config(root: Path, name: str, model: dict, data: dict, **trainer) -> str:
    config = {
        "model": {"backend": "hf", "max_new_tokens": 3, **model},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root / "runs"), "name": name}}, **trainer},
        "data": data,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model):
    """A 2-step fit validated on MME/POPE with a monitored best.ckpt, a test of that checkpoint,
    and its export."""
    root = tmp_path_factory.mktemp("tuned")
    world = generate_world(root / "world", seed=3, n_mme_images=1, n_pope_images=1, n_instruct=8)
    fit_data = {"class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
                "init_args": {"train_source": world["instruct_json"], "batch_size": 4, "val_benchmark": _eval_data(world)}}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"filename": "best", "monitor": MONITOR, "mode": "max"}}
    fit = main(["fit", "--config", _config(
        root, "fit", {"model_path": tiny_model, "compressor": COMPRESSOR, "objective": "mix",
                      "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}},
        fit_data, max_steps=2, val_check_interval=2, num_sanity_val_steps=0, callbacks=[checkpoint])])
    ckpt = Path(fit.trainer.checkpoint_callback.best_model_path)
    validated = float(fit.trainer.checkpoint_callback.best_model_score)
    test = main(["test", "--config", _config(root, "test", {"model_path": tiny_model, "compressor": COMPRESSOR},
                                             _eval_data(world)), f"--ckpt_path={ckpt}"])
    out = main(["export", "--ckpt_path", str(ckpt), str(root / "tuned")])
    return {"root": root, "world": world, "ckpt": ckpt, "out": out, "validated": validated,
            "test_run": Path(test.trainer.log_dir), "fit_run": Path(fit.trainer.log_dir)}


def test_export_writes_settings_weights_and_a_model_card(tuned, tiny_model):
    out = tuned["out"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "compressor.json", "compressor.safetensors"]
    info = json.loads((out / "compressor.json").read_text())
    checkpoint = torch.load(tuned["ckpt"], weights_only=True)
    compressor_state = {k.removeprefix("model.compressor."): v for k, v in checkpoint["state_dict"].items()}
    # only the compressor's weights, bit for bit; kilobytes
    from safetensors.torch import load_file

    weights = load_file(str(out / "compressor.safetensors"))
    assert weights.keys() == compressor_state.keys()
    assert all(torch.equal(weights[k], compressor_state[k]) for k in weights)
    assert (out / "compressor.safetensors").stat().st_size < 64 * 1024
    assert info["compressor"]["method"] == "sparsezip" and info["compressor"]["budget"] == 32
    assert info["compressor"]["sparsezip"]["cross_beta"] == 0.5 and set(info["compressor"]) == {"method", "budget", "sparsezip"}
    assert info["base_model"] == {"model_path": tiny_model, "family": "hf", "dtype": "auto", "num_patches": 64}
    data = info["training"]["data"]
    assert data["train_source"] == tuned["world"]["instruct_json"] and data["train"]["samples"] == 8
    assert info["training"]["validation_data"]["sources"]["mme_root"] == tuned["world"]["mme_root"]
    monitored = info["scores"]["monitored"]
    assert monitored == [{"metric": MONITOR, "value": tuned["validated"], "best_value": tuned["validated"], "is_best": True}]
    # the test run of this very checkpoint is found and its results copied
    (evaluation,) = info["scores"]["evaluations"]
    results = json.loads((tuned["test_run"] / "results.json").read_text())
    assert evaluation["run"] == str(tuned["test_run"].resolve()) and evaluation["metrics"] == results
    # the fit is one row of TensorBoard's HParams view, with its best validation score
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tuned["fit_run"]))
    events.Reload()
    assert f"best/{MONITOR}" in events.Tags()["scalars"] and any(p.suffix == ".hparams" for p in tuned["fit_run"].iterdir())
    card = (out / "README.md").read_text()
    for fact in (tiny_model, "| hf |", data["train"]["digest"], MONITOR, "test/pope/avg/f1",
                 f"{results['test/pope/avg/f1']:.4g}", "32 visual tokens per image"):
        assert fact in card, fact


def test_the_exported_compressor_answers_as_its_checkpoint(tuned, tiny_model):
    root = tuned["root"]
    again = main(["test", "--config", _config(root, "tuned_test", {"model_path": tiny_model}, _eval_data(tuned["world"])),
                  f"--model.compressor_path={tuned['out']}"])
    ours = [json.loads(line) for line in (Path(again.trainer.log_dir) / "predictions/predictions.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (tuned["test_run"] / "predictions/predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in theirs]
    assert [r["visual_tokens"] for r in ours] == [r["visual_tokens"] for r in theirs]
    assert json.loads((Path(again.trainer.log_dir) / "results.json").read_text()) == \
        json.loads((tuned["test_run"] / "results.json").read_text())
    # the run records which tuned weights it used
    record = json.loads((Path(again.trainer.log_dir) / "sparsezip_run.json").read_text())
    assert record["identity"]["model"]["tuned_compressor"]["sha256"] == TunedCompressor.load(tuned["out"]).weights_sha256


def test_sparsezip_api_loads_the_tuned_weights(tuned, tiny_model):
    from sparsezip_pl.api import sparsezip
    from sparsezip_pl.lit.module import SparseZipModule

    family = load_family("hf", tiny_model)
    wrapped = sparsezip(family.model, compressor=str(tuned["out"]))
    module = SparseZipModule.load_from_checkpoint(tuned["ckpt"])
    module.configure_model()
    tuned_state = module.model.compressor.state_dict()
    untuned = sparsezip(family.model, config=COMPRESSOR).compressor.state_dict()
    assert any(not torch.equal(untuned[k], tuned_state[k]) for k in tuned_state)  # tuning moved something
    assert all(torch.equal(wrapped.compressor.state_dict()[k], v) for k, v in tuned_state.items())
    batch = family.batch_builder("generate")(synthetic_samples(3, seed=4))
    ours, ours_compression = wrapped.sparsezip.generate(batch, max_new_tokens=4)
    theirs, theirs_compression = module.model.generate(batch, max_new_tokens=4)
    assert torch.equal(ours, theirs) and torch.equal(ours_compression.kept_indices, theirs_compression.kept_indices)
    # settings: the budget may change, the method may not
    assert sparsezip(family.model, compressor=str(tuned["out"]), budget=24).sparsezip.config.budget == 24
    with pytest.raises(TunedCompressorError, match="'visionzip'.*'sparsezip' compressor"):
        sparsezip(family.model, method="visionzip", compressor=str(tuned["out"]))


def test_other_architectures_are_refused_and_other_checkpoints_warned_about(tuned):
    from sparsezip_pl.api import sparsezip

    wider = load_family("hf", cached_tiny_llava("hf", image_size=112, text_hidden_size=96))
    with pytest.raises(TunedCompressorError, match=r"weight shapes differ.*another hidden size or vision tower"):
        sparsezip(wider.model, compressor=str(tuned["out"]))
    smaller_tower = load_family("hf", cached_tiny_llava("hf", image_size=84))
    with pytest.raises(TunedCompressorError, match="with 64 patches per image; this model .* has 36"):
        sparsezip(smaller_tower.model, compressor=str(tuned["out"]))
    same_shapes = load_family("hf", cached_tiny_llava("hf", image_size=112, seed=7))
    with pytest.warns(BaseModelWarning, match="another checkpoint"):
        sparsezip(same_shapes.model, compressor=str(tuned["out"]))


def test_damaged_or_conflicting_artifacts_are_clear_errors(tuned, tmp_path, tiny_model):
    from sparsezip_pl.lit.module import SparseZipModule

    copy = tmp_path / "copy"
    shutil.copytree(tuned["out"], copy)
    weights = copy / "compressor.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(TunedCompressorError, match="sha256 .* differs"):
        TunedCompressor.load(copy)
    with pytest.raises(TunedCompressorError, match="no compressor.json"):
        TunedCompressor.load(tmp_path)
    with pytest.raises(TunedCompressorError, match="does not exist"):
        TunedCompressor.load(tmp_path / "missing")
    # compressor settings that differ from both the defaults and the tuned ones
    with pytest.raises(TunedCompressorError, match="budget: given 64, tuned 32"):
        SparseZipModule(model_path=tiny_model, compressor={"method": "sparsezip", "budget": 64},
                        compressor_path=str(tuned["out"]))
    module = SparseZipModule(model_path=tiny_model, compressor_path=str(tuned["out"]))
    assert module.compressor_config.budget == 32 and module.hparams["compressor"]["sparsezip"]["cross_beta"] == 0.5
    with pytest.raises(SystemExit) as exit_info:  # export refuses a non-empty folder
        main(["export", "--ckpt_path", str(tuned["ckpt"]), str(tuned["out"])])
    assert exit_info.value.code == 2


def test_hub_ids_download_with_snapshot_download_honouring_offline_mode(tuned, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append({"repo_id": repo_id, "revision": revision, "local_files_only": local_files_only})
        if local_files_only and repo_id == "someone/not-cached":
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        return str(tuned["out"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    loaded = TunedCompressor.load("someone/llava-sparsezip-32@v1")
    assert calls[-1] == {"repo_id": "someone/llava-sparsezip-32", "revision": "v1", "local_files_only": False}
    assert loaded.config.budget == 32 and loaded.source == "someone/llava-sparsezip-32@v1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    TunedCompressor.load("someone/llava-sparsezip-32")
    assert calls[-1]["local_files_only"] is True
    with pytest.raises(ModelNotAvailableError, match="(?s)offline mode is on.*hf download someone/not-cached"):
        TunedCompressor.load("someone/not-cached")


def test_model_names_and_family_detection(tmp_path):
    assert model_name("/root/.cache/huggingface/hub/models--llava-hf--llava-1.5-7b-hf/snapshots/abc") == \
        "llava-hf/llava-1.5-7b-hf"
    assert same_model("llava-hf/llava-1.5-7b-hf", "/models/llava-1.5-7b-hf")
    assert not same_model("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf")
    assert detect_checkpoint_family(cached_tiny_llava("hf", image_size=112)) == "hf"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_vision_tower": "x"}))
    assert detect_checkpoint_family(tmp_path) == "llava"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(ValueError, match="model_type 'mystery'.*family=NAME"):
        detect_checkpoint_family(tmp_path)
