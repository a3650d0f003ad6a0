"""Interrupted runs: `fit` resumed from its last checkpoint continues exactly as an uninterrupted
run would (same data order, optimizer state and losses); a `test` killed half-way resumes from its
prediction files without answering finished samples again and reports the same metrics."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from sparsezip_pl.cli import main
from sparsezip_pl.data.loader import EpochSeededRandomSampler, SkipAwareCollate, SkipCountingDataLoader
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.lit.module import SparseZipModule
from sparsezip_pl.lit.run_folder import RunFolderError
from sparsezip_pl.models.tiny import cached_tiny_llava

COMPRESSOR = {"method": "sparsezip", "k_min": 2, "k_max": 12, "merging": {"contextual_num": 4}}

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


class CrashAt(L.Callback):
    """Stands in for a killed process: raises when the given train step or test batch starts."""

    def __init__(self, train_step: int | None = None, test_batch: int | None = None) -> None:
        self.train_step = train_step
        self.test_batch = test_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.train_step:
            raise RuntimeError("simulated crash")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.test_batch:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=5, n_mme_images=2, n_pope_images=2, n_instruct=6)


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


def _write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


# ------------------------------------------------------------------------------------------ fit
def _loader(data, seed=5):
    return SkipCountingDataLoader(data, batch_size=2, sampler=EpochSeededRandomSampler(data, seed), num_workers=1,
                                  persistent_workers=True, collate_fn=SkipAwareCollate())


def test_resumed_loader_skips_the_drawn_batches_once():
    data = [{"i": i} for i in range(10)]
    loader = _loader(data)
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    first = [next(iterator) for _ in range(2)]
    state = loader.state_dict()
    assert state == {"batches_drawn": 2, "sampler_seed": 5}
    epoch = first + list(iterator)
    assert sorted(s["i"] for batch in epoch for s in batch) == list(range(10))

    resumed = _loader(data, seed=99)
    resumed.sampler.set_epoch(1)
    resumed.load_state_dict(state)  # also restores the sampler's seed
    assert len(resumed) == 5 and list(resumed) == epoch[2:]
    assert list(resumed) == epoch, "the next pass is whole again (the persistent worker is reused)"


def test_one_and_two_process_orders_give_the_same_global_batches():
    data, seed, epoch = list(range(12)), 7, 3
    single = EpochSeededRandomSampler(data, seed)
    single.set_epoch(epoch)
    order = list(single)
    per_rank = []
    for rank in (0, 1):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    assert order != sorted(order)
    for step in range(3):  # global batch 4 = 1 x 4 = 2 x 2
        assert sorted(order[4 * step: 4 * step + 4]) == sorted(per_rank[0][2 * step: 2 * step + 2]
                                                                + per_rank[1][2 * step: 2 * step + 2])


def _fit_config(tmp_path, world, tiny_model, name, max_steps, log_dir, crash_step=None) -> str:
    # Checkpoints go to the logger's version folder (ModelCheckpoint's default); each run gets a new one.
    callbacks = [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 1, "save_last": True},
    }]
    if crash_step is not None:
        callbacks.append({"class_path": f"{__name__}.CrashAt", "init_args": {"train_step": crash_step}})
    return _write_config(tmp_path / f"{name}.yaml", {
        "seed_everything": 11,
        "model": {
            "backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "objective": "mix",
            "budget_target": 8.0,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}},
        },
        "trainer": {
            "accelerator": "cpu", "max_steps": max_steps, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(log_dir), "name": "fit"}},
        },
        "data": {
            "class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
            "init_args": {"train_source": world["instruct_json"], "batch_size": 2, "shuffle": True},
        },
    })


def _losses(cli) -> dict[int, float]:
    """train/loss by step, from the CSVLogger's metrics file."""
    cli.trainer.logger.save()
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def test_fit_resumed_mid_epoch_continues_exactly(tmp_path, world, tiny_model):
    # 6 samples, batch 2: 3 steps per epoch. The crash comes after step 2 (mid-epoch 0); the resumed
    # run must replay the rest of epoch 0 and all of epoch 1 in the uninterrupted run's order.
    steps, crash = 6, 2
    full = main(["fit", "--config", _fit_config(tmp_path, world, tiny_model, "full", steps, tmp_path / "full")])
    reference = _losses(full)
    assert sorted(reference) == list(range(steps))

    logs = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", "--config", _fit_config(tmp_path, world, tiny_model, "first", steps, logs, crash_step=crash)])
    last = logs / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == crash
    assert checkpoint["state_dict"] and all(k.startswith("model.compressor.") for k in checkpoint["state_dict"])
    assert checkpoint["optimizer_states"][0]["state"], "the optimizer's moments are saved"
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"batches_drawn": crash, "sampler_seed": 11}
    ]

    # A newer checkpoint of another experiment under the same logger root is not taken.
    foreign = dict(checkpoint, hyper_parameters={**checkpoint["hyper_parameters"],
                                                 "compressor": {**COMPRESSOR, "k_max": 10}})
    (logs / "fit" / "version_7" / "checkpoints").mkdir(parents=True)
    torch.save(foreign, logs / "fit" / "version_7" / "checkpoints" / "last.ckpt")

    # The resumed run logs to a new version: "last" must still find version_0's checkpoint.
    config = _fit_config(tmp_path, world, tiny_model, "resumed", steps, logs)
    resumed = main(["fit", "--config", config, "--ckpt_path", "last"])
    assert Path(resumed.trainer.ckpt_path) == last
    assert resumed.trainer.logger.version == 8
    after = _losses(resumed)
    assert sorted(after) == list(range(crash, steps)), "the resumed run trains only the missing steps"
    for step in range(crash, steps):
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    for key, value in full.model.model.compressor.state_dict().items():
        torch.testing.assert_close(resumed.model.model.compressor.state_dict()[key], value, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- test
def _test_config(tmp_path, world, tiny_model, name, output_dir, crash_batch=None) -> str:
    callbacks = []
    if crash_batch is not None:
        callbacks.append({"class_path": f"{__name__}.CrashAt", "init_args": {"test_batch": crash_batch}})
    return _write_config(tmp_path / f"{name}.yaml", {
        "model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "max_new_tokens": 3},
        "trainer": {
            "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": callbacks, "logger": False, "default_root_dir": str(tmp_path / name),
        },
        "predictions": {"output_dir": str(output_dir)},
        "data": {
            "class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
            "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                          "pope_image_dir": world["pope_image_folder"], "batch_size": 4, "max_per_category": 1},
        },
    })


@pytest.fixture
def count_generated(monkeypatch):
    """Counts the samples that go through generation."""
    counter = {"samples": 0}
    original = SparseZipModule._answer

    def counting(self, batch):
        counter["samples"] += len(batch["meta"])
        return original(self, batch)

    monkeypatch.setattr(SparseZipModule, "_answer", counting)
    return counter


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_test_killed_half_way_resumes_without_recomputing(tmp_path, world, tiny_model, count_generated):
    uninterrupted = main(["test", "--config", _test_config(tmp_path, world, tiny_model, "full", tmp_path / "p_full")])
    expected = uninterrupted.model.eval_results
    total = count_generated["samples"]
    full_records = {r["sample_id"]: r for r in _read_jsonl(tmp_path / "p_full" / "predictions.jsonl")}
    assert len(full_records) == total > 8

    folder = tmp_path / "p_resumed"
    count_generated["samples"] = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["test", "--config", _test_config(tmp_path, world, tiny_model, "first", folder, crash_batch=2)])
    assert count_generated["samples"] == 8
    rank_file = folder / "predictions.rank0.jsonl"
    lines = rank_file.read_text().splitlines()
    assert len(lines) == 8 and not (folder / "predictions.jsonl").exists()
    # The kill also tore the last record in half.
    torn = lines[-1]
    rank_file.write_text("\n".join(lines[:-1]) + "\n" + torn[: len(torn) // 2])

    count_generated["samples"] = 0
    resumed = main(["test", "--config", _test_config(tmp_path, world, tiny_model, "second", folder)])
    assert count_generated["samples"] == total - 7, "only the unfinished samples (and the torn one) are answered"
    assert resumed.model.eval_results == expected
    budget = {k: v for k, v in json.loads((tmp_path / "second" / "results.json").read_text()).items() if k.startswith("budget/")}
    assert budget and budget == {k: v for k, v in json.loads((tmp_path / "full" / "results.json").read_text()).items()
                                 if k.startswith("budget/")}  # from all records, old and new
    merged = {r["sample_id"]: r for r in _read_jsonl(folder / "predictions.jsonl")}
    assert merged == full_records
    # The torn line was closed before appending: every later line is intact.
    assert sum(1 for line in rank_file.read_text().splitlines() if line.startswith("{") and line.endswith("}")) == total
    official = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.parent != folder)
    assert official == sorted(p.relative_to(tmp_path / "p_full") for p in (tmp_path / "p_full").rglob("*")
                              if p.parent != tmp_path / "p_full")

    count_generated["samples"] = 0
    again = main(["test", "--config", _test_config(tmp_path, world, tiny_model, "third", folder)])
    assert count_generated["samples"] == 0 and again.model.eval_results == expected


def test_resuming_into_predictions_of_other_settings_is_refused(tmp_path, world, tiny_model):
    folder = tmp_path / "preds"
    main(["test", "--config", _test_config(tmp_path, world, tiny_model, "a", folder)])
    other = _test_config(tmp_path, world, tiny_model, "b", folder)
    with pytest.raises(RunFolderError, match=r"model.max_new_tokens: earlier 3, now 5"):
        main(["test", "--config", other, "--model.max_new_tokens", "5"])
    with pytest.raises(RunFolderError, match="resume is false"):
        main(["test", "--config", other, "--predictions.resume", "false"])
