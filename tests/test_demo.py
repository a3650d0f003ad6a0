"""The demo's short version runs end to end on the shipped tiny LLaVA (what `make demo` runs, at CI size)."""

import json
from pathlib import Path

import pytest
import torch

from sparsezip_pl.demo.pipeline import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "checkpoints/tiny-llava-synth/model.safetensors").exists(), reason="checkpoint not shipped")
def test_quick_demo_reports_every_method(tmp_path):
    rows = main(["--quick", "--out", str(tmp_path)])
    methods = ["visionzip 54+10", "sparsezip default", "sparsezip tuned"]
    assert [r["method"] for r in rows] == [
        "none (all 576)", *methods, *(m + ", original positions" for m in methods)
    ]
    tokens = {r["method"]: r["tokens"] for r in rows}
    assert tokens["none (all 576)"] == 576
    for suffix in ("", ", original positions"):
        assert tokens["visionzip 54+10" + suffix] == 64
        assert 8 < tokens["sparsezip default" + suffix] <= 1 + 64 + 16
    # Where the tokens sit changes no token count, and the untuned rows' budgets are identical.
    assert tokens["sparsezip default"] == tokens["sparsezip default, original positions"]
    for row in rows:
        assert 0 <= row["mme/total"] <= 800 and 0 <= row["pope/f1"] <= 100
    report = (tmp_path / "RESULTS.md").read_text()
    assert report.count("\n| ") == 1 + len(rows)  # header + one line per method
    # per-question changes, tuned against default, whose net equals the difference in right answers
    for suffix in ("", ", original positions"):
        line = next(l for l in report.splitlines() if l.startswith(f"- sparsezip tuned{suffix} against"))
        gained, lost, total = (int(w) for w in line.replace(",", "").split() if w.isdigit())
        assert total == 16 and 0 <= gained <= total and 0 <= lost <= total  # 2 images x 4 subtasks x 2
        right = {}
        for name in (f"sparsezip default{suffix}", f"sparsezip tuned{suffix}"):
            index = [r["method"] for r in rows].index(name)
            predictions = next((tmp_path / "demo").glob(f"*-{index}-test/predictions/predictions.jsonl"))
            records = [json.loads(line) for line in predictions.read_text().splitlines()]
            right[name] = sum(r["parsed"] == r["answer"] for r in records if r["task"] == "mme")
        assert gained - lost == right[f"sparsezip tuned{suffix}"] - right[f"sparsezip default{suffix}"]
    saved = json.loads(next(tmp_path.glob("*-results.json")).read_text())
    assert saved == rows
    # each fit validated on the development world and kept its best compressor, which was tested
    best = sorted(tmp_path.glob("demo/*-fit*/checkpoints/best.ckpt"))
    assert len(best) == 2
    for checkpoint in best:
        assert checkpoint.stat().st_size < 1_000_000  # only the compressor is saved, not the LLaVA
        assert "val/mme/perception_total" in torch.load(checkpoint, weights_only=False)["callbacks"].__repr__()
    tested = [log.read_text() for log in tmp_path.glob("*-test.log")]
    assert sum("best.ckpt" in text for text in tested) == 2


def test_tuning_budget_is_steps_unless_a_time_cap_is_asked():
    from sparsezip_pl.demo.pipeline import fit_budget_args

    assert fit_budget_args(400) == ["--trainer.max_steps=400"]
    assert fit_budget_args(400, minutes=2.5) == ["--trainer.max_steps=400", "--trainer.max_time=00:00:02:30"]
    assert fit_budget_args(400, minutes=90) == ["--trainer.max_steps=400", "--trainer.max_time=00:01:30:00"]
    assert "--trainer.max_steps=2" in fit_budget_args(400, quick=True)


def test_demo_fit_config_is_step_bounded_and_validates_the_start():
    import yaml

    trainer = yaml.safe_load((REPO / "configs/demo/fit.yaml").read_text())["trainer"]
    assert trainer["max_steps"] > 0 and trainer.get("max_time") is None
    callbacks = [c["class_path"] for c in trainer["callbacks"]]
    assert "sparsezip_pl.lit.callbacks.ValidateBeforeTraining" in callbacks
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks


def test_answer_changes_counts_both_directions_over_the_same_questions():
    from sparsezip_pl.demo.pipeline import answer_changes

    before = {"a": True, "b": False, "c": True, "d": False}
    after = {"a": False, "b": True, "c": True, "d": True}
    assert answer_changes(before, after) == (2, 1)
    assert answer_changes(after, before) == (1, 2)
    with pytest.raises(ValueError, match="different"):
        answer_changes(before, {"a": True})
