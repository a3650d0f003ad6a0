"""The Lightning path end to end: CLI, fit, test, predict, checkpoints and configs, on a tiny
LLaVA and data written by the synthetic world generator in the official layouts."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from sparsezip_pl.cli import main
from sparsezip_pl.compress import MergingConfig, SparseZipConfig
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.lit.module import SparseZipModule
from sparsezip_pl.models.tiny import cached_tiny_llava

REPO = Path(__file__).resolve().parents[1]
COMPRESSOR = {"method": "sparsezip", "k_min": 2, "k_max": 12, "merging": {"contextual_num": 4}}
COMPRESSOR_CONFIG = SparseZipConfig(method="sparsezip", k_min=2, k_max=12, merging=MergingConfig(contextual_num=4))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=3, n_mme_images=2, n_pope_images=3, n_instruct=8)


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


def _config(tmp_path: Path, name: str, model_path: str, data: dict, **extra) -> str:
    config = {
        "model": {"backend": "hf", "model_path": model_path, "max_new_tokens": 3, "compressor": COMPRESSOR},
        "trainer": {
            "accelerator": "cpu",
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": name},
            },
            "enable_progress_bar": False,
        },
        "data": data,
    }
    for key, value in extra.items():
        config.setdefault(key, {}).update(value)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _eval_data(world) -> dict:
    return {
        "class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
        "init_args": {
            "mme_root": world["mme_root"],
            "pope_source": world["pope_root"],
            "pope_image_dir": world["pope_image_folder"],
            "batch_size": 4,
        },
    }


def _fit(tmp_path, world, tiny_model, steps=3):
    data = {
        "class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
        "init_args": {"train_source": world["instruct_json"], "batch_size": 4},
    }
    config = _config(
        tmp_path, "fit", tiny_model, data,
        model={"objective": "mix", "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}},
        trainer={"max_steps": steps, "enable_checkpointing": True},
    )
    return main(["fit", "--config", config])


def test_fit_trains_only_the_compressor_and_saves_a_loadable_checkpoint(tmp_path, world, tiny_model):
    reference = SparseZipModule(model_path=tiny_model, compressor=COMPRESSOR_CONFIG)
    reference.configure_model()
    frozen_before = {k: v.clone() for k, v in reference.model.state_dict().items() if not k.startswith("compressor.")}
    compressor_before = {k: v.clone() for k, v in reference.model.compressor.state_dict().items()}

    cli = _fit(tmp_path, world, tiny_model)
    trained = cli.model
    after = trained.model.state_dict()
    for key, value in frozen_before.items():
        assert torch.equal(after[key], value), f"frozen LLaVA weight {key} changed"
    changed = [k for k, v in trained.model.compressor.state_dict().items() if not torch.equal(v, compressor_before[k])]
    assert "alphas" in " ".join(changed), changed

    checkpoint_path = next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["state_dict"] and all(k.startswith("model.compressor.") for k in checkpoint["state_dict"])
    loaded = SparseZipModule.load_from_checkpoint(checkpoint_path)
    for key, value in trained.model.compressor.state_dict().items():
        assert torch.equal(loaded.model.compressor.state_dict()[key], value)


def test_fit_validates_on_a_benchmark_and_keeps_the_best_compressor(tmp_path, world, tiny_model):
    data = {
        "class_path": "sparsezip_pl.lit.datamodules.InstructDataModule",
        "init_args": {"train_source": world["instruct_json"], "batch_size": 4, "val_benchmark": _eval_data(world)},
    }
    # the README's recipe: the best compressor by validation, and last.ckpt from an unmonitored callback
    best = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"filename": "best", "monitor": "val/mme/perception_total_4of10", "mode": "max"}}
    last = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    config = _config(
        tmp_path, "fit", tiny_model, data,
        model={"objective": "distill", "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.5}}},
        trainer={"max_steps": 6, "val_check_interval": 2, "num_sanity_val_steps": 0, "enable_checkpointing": True,
                 "callbacks": [best, last]},
    )
    cli = main(["fit", "--config", config])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    validated = [e.value for e in events.Scalars("val/mme/perception_total_4of10")]
    assert len(validated) == 3 and "val/pope/avg/f1" in events.Tags()["scalars"]
    callback = next(c for c in cli.trainer.checkpoint_callbacks if c.monitor)
    assert float(callback.best_model_score) == max(validated) and Path(callback.best_model_path).name == "best.ckpt"
    assert torch.load(Path(callback.dirpath) / "last.ckpt", weights_only=False)["global_step"] == 6
    # the kept compressor answers the same questions, through `test`, exactly as validation scored it
    tested = main(["test", "--config", _config(tmp_path, "test", tiny_model, _eval_data(world)),
                   f"--ckpt_path={callback.best_model_path}"])
    assert tested.trainer.callback_metrics["test/mme/perception_total_4of10"] == callback.best_model_score


def test_checkpoint_missing_compressor_weights_is_an_error(tmp_path, world, tiny_model):
    cli = _fit(tmp_path, world, tiny_model, steps=1)
    checkpoint_path = next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "alphas" not in k}
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(KeyError, match="alphas"):
        SparseZipModule.load_from_checkpoint(tmp_path / "broken.ckpt")


def test_checkpoint_from_before_the_text_gate_loads_with_the_gate_open(tmp_path, world, tiny_model):
    cli = _fit(tmp_path, world, tiny_model, steps=1)
    checkpoint_path = next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["state_dict"].pop("model.compressor.scorer.text_gate").item() == 0.0
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="text_gate missing"):
        loaded = SparseZipModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.model.compressor.scorer.text_gate.item() == 1.0


def test_ckpt_path_keeps_the_given_settings_and_warns_about_differences(tmp_path, world, tiny_model):
    """Plain LightningCLI would load the checkpoint's hyperparameters over the given config."""
    cli = _fit(tmp_path, world, tiny_model, steps=1)
    checkpoint_path = next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
    config = _config(tmp_path, "test", tiny_model, _eval_data(world))
    with pytest.warns(UserWarning, match=r"model\.visual_positions = 'contiguous'; this run uses 'original'"):
        tested = main([
            "test", "--config", config, f"--ckpt_path={checkpoint_path}",
            "--model.visual_positions=original", "--model.max_new_tokens=2",
        ])
    assert tested.model.model.visual_positions == "original"
    assert tested.model.hparams.max_new_tokens == 2


def _mme_reference(records):
    """MME acc / acc+ / score per subtask by docs/formats.md's rules, computed independently."""

    def parse(text):
        text = text.lower().strip().replace(".", "")
        if text in ("yes", "no"):
            return text
        if text in ("y", "n"):
            return {"y": "yes", "n": "no"}[text]
        head = text[:4]
        return "yes" if "yes" in head else "no" if "no" in head else "other"

    scores = {}
    for subtask in {r["category"] for r in records}:
        rows = [r for r in records if r["category"] == subtask]
        correct = [parse(r["prediction"]) == r["answer"] for r in rows]
        pairs = {}
        for row, ok in zip(rows, correct):
            pairs.setdefault(row["pair_id"], []).append(ok)
        acc = 100.0 * sum(correct) / len(correct)
        acc_plus = 100.0 * sum(all(v) and len(v) == 2 for v in pairs.values()) / len(pairs)
        scores[subtask] = (acc, acc_plus, acc + acc_plus)
    return scores


def _pope_reference(records):
    def parse(text):
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if any(w in ("No", "no", "not") for w in words) else "yes"

    out = {}
    for split in {r["category"] for r in records}:
        rows = [r for r in records if r["category"] == split]
        pred = [parse(r["prediction"]) == "yes" for r in rows]
        gold = [r["answer"] == "yes" for r in rows]
        tp = sum(p and g for p, g in zip(pred, gold))
        fp = sum(p and not g for p, g in zip(pred, gold))
        fn = sum(not p and g for p, g in zip(pred, gold))
        precision = 100.0 * tp / (tp + fp) if tp + fp else 0.0
        recall = 100.0 * tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        accuracy = 100.0 * sum(p == g for p, g in zip(pred, gold)) / len(rows)
        out[split] = {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
                      "yes_ratio": 100.0 * sum(pred) / len(rows)}
    return out


def test_test_metrics_equal_a_hand_computed_reference(tmp_path, world, tiny_model):
    cli = main(["test", "--config", _config(tmp_path, "test", tiny_model, _eval_data(world))])
    run = Path(cli.trainer.log_dir)
    results = json.loads((run / "results.json").read_text())
    records = [json.loads(line) for line in (run / "predictions" / "predictions.jsonl").read_text().splitlines()]
    mme = [r for r in records if r["task"] == "mme"]
    pope = [r for r in records if r["task"] == "pope"]
    assert len(mme) == 4 * 2 * 2 and len(pope) == len({r["sample_id"] for r in pope}) > 0
    for subtask, (acc, acc_plus, score) in _mme_reference(mme).items():
        assert results[f"test/mme/{subtask}/acc"] == pytest.approx(acc, abs=1e-4)
        assert results[f"test/mme/{subtask}/acc_plus"] == pytest.approx(acc_plus, abs=1e-4)
        assert results[f"test/mme/{subtask}/score"] == pytest.approx(score, abs=1e-4)
    for split, metrics in _pope_reference(pope).items():
        for name, value in metrics.items():
            assert results[f"test/pope/{split}/{name}"] == pytest.approx(value, abs=1e-4), (split, name)
    tokens = [r["visual_tokens"] for r in records]
    assert results["budget/tokens_mean"] == pytest.approx(sum(tokens) / len(tokens), rel=1e-5)
    assert max(tokens) <= 1 + COMPRESSOR["k_max"] + COMPRESSOR["merging"]["contextual_num"]


def test_predict_writes_the_official_files(tmp_path, world, tiny_model):
    cli = main(["predict", "--config", _config(tmp_path, "predict", tiny_model, _eval_data(world))])
    folder = Path(cli.trainer.log_dir) / "predictions"
    for subtask in ("existence", "count", "color", "position"):
        lines = (folder / "mme" / f"{subtask}.txt").read_text().splitlines()
        source = sorted(Path(world["mme_root"], subtask).glob("*.txt"))
        assert len(lines) == 2 * len(source)
        image, question, truth, _ = lines[0].split("\t")
        first_q, first_a = source[0].read_text().splitlines()[0].split("\t")
        assert (image, question, truth) == (source[0].stem + ".jpg", first_q, first_a)
    for split, path in world["pope_files"].items():
        questions = {json.loads(line)["question_id"] for line in Path(path).read_text().splitlines()}
        answers = [json.loads(line) for line in (folder / "pope" / f"{split}_answers.jsonl").read_text().splitlines()]
        assert {a["question_id"] for a in answers} == questions
        assert all(isinstance(a["text"], str) for a in answers)


def test_lightning_and_python_api_give_identical_answers(world, tiny_model):
    from sparsezip_pl.api import sparsezip
    from sparsezip_pl.lit.datamodules import MMEDataModule

    module = SparseZipModule(model_path=tiny_model, compressor=COMPRESSOR_CONFIG, max_new_tokens=4)
    module.configure_model()
    module.eval()
    datamodule = MMEDataModule(world["mme_root"], batch_size=4)
    datamodule.setup("test")
    samples = [datamodule.dataset[i] for i in range(4)]
    batch = module.backend.batch_builder("generate")(samples)
    lightning_answers = [r["prediction"] for r in module._answer(batch)["records"]]

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}],
            add_generation_prompt=True,
        )
        for s in samples
    ]
    inputs = processor(images=[s["image"] for s in samples], text=prompts, padding=True, return_tensors="pt")
    wrapped = sparsezip(module.backend.model, config=module.compressor_config)
    wrapped.sparsezip.compressor.load_state_dict(module.model.compressor.state_dict())
    output = wrapped.generate(**inputs, max_new_tokens=module.hparams.max_new_tokens)
    api_answers = module.backend.decode(output[:, inputs["input_ids"].shape[1]:])
    assert api_answers == lightning_answers


@pytest.mark.parametrize("config", sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    text = yaml.safe_load((REPO / config).read_text()) or {}
    command = "fit" if "fit" in config.name or "optimizer" in text.get("model", {}) else "test"
    args = [command]
    if config.parent.name == "methods":
        args += ["--config", "configs/llava15_7b_hf_mme.yaml"]
    args += ["--config", str(config), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    if "compressor" in text.get("model", {}):
        assert printed["model"]["compressor"]["method"] == text["model"]["compressor"].get("method", "sparsezip")


def test_misspelled_config_key_fails_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  compressor:\n    k_maxx: 10\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "configs/llava15_7b_hf_mme.yaml", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "k_maxx" in capsys.readouterr().err


def test_budget_penalty_counts_images_only(tiny_model):
    """The budget is per image: a text-only sample in a training batch (which LLaVA-1.5 still runs
    through the compressor, on a blank image) changes neither the penalty nor the logged mean."""
    from sparsezip_pl.models.tiny import synthetic_samples

    module = SparseZipModule(model_path=tiny_model, compressor=COMPRESSOR_CONFIG, objective="lm", budget_target=4.0)
    module.configure_model()
    samples = synthetic_samples(3)
    samples[1] = dict(samples[1], image=None)
    builder = module.collate_fn("train")
    _, mixed, compression = module._tuning_loss(builder(samples))
    assert compression.expected_tokens[1] > 0  # the blank image's expectation, left out below
    images = compression.expected_tokens[[0, 2]].mean()
    torch.testing.assert_close(mixed["expected_tokens"], images)
    torch.testing.assert_close(mixed["budget_penalty"], ((images - 4.0) / 4.0) ** 2)
    _, text_only, _ = module._tuning_loss(builder([samples[1]]))
    assert text_only["budget_penalty"] == 0
