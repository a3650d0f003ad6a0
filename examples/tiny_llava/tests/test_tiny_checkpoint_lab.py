"""The shipped tiny LLaVA as the lab sees it: its card is the training run's measurement, the lab's
evaluator reads the documented accuracy, careless token dropping costs it, the training fast path
equals the stock forward, and the training script rebuilds its tokenizer.

(Loading it and its accuracy through the project's `test` command: tests/test_tiny_checkpoint.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate_worlds as E
import training_world as W
from sparsezip_pl.data import synthetic as S
from tiny_llava import check_fast_paths

LAB = Path(__file__).resolve().parents[1]
CKPT = LAB.parents[1] / "checkpoints" / "tiny-llava-synth"
# the held-out slice: a fresh world from the card's held-out seed, read back from its files
SLICE = dict(n_mme_images=10, n_pope_images=10, n_instruct=0)


@pytest.fixture(scope="module")
def documented():
    return json.loads((CKPT / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(1)
    model = LlavaForConditionalGeneration.from_pretrained(CKPT)
    processor = AutoProcessor.from_pretrained(CKPT)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def world(tmp_path_factory, documented):
    seed = documented["eval_seed"]
    return S.generate_world(tmp_path_factory.mktemp("heldout"), seed=seed, **SLICE)


def _overall(results: dict) -> float:
    n = sum(results[f]["n"] for f in E.FAMILIES)
    return sum(results[f]["acc"] * results[f]["n"] for f in E.FAMILIES) / n


def test_card_is_the_runs_measurement(documented):
    card = (LAB / "MODEL_CARD.md").read_text()
    assert f"{documented['params']['total']:,}" in card
    assert documented["command"] in card
    for fam in E.FAMILIES:  # the card's table is the script's measurement
        assert f"| {fam} | {documented['eval']['all'][fam]['acc']:.1f} |" in card


def test_training_fast_path_equals_stock_forward(loaded):
    model, processor = loaded
    image = Image.fromarray(S.render(S.sample_scene(S.rng_for(9, "extra", 1))))
    turns = [("Is there a red star in the image?" + S.SHORT_ANSWER, "No"), ("How many stars are there?", "There is one star.")]
    assert check_fast_paths(model, processor, image, turns) < 1e-4


def test_heldout_slice_accuracy_as_documented_by_the_labs_evaluator(loaded, world, documented):
    model, processor = loaded
    res = E.evaluate_world(model, processor, world, honest=True)  # processor + generate, as the hf backend
    floor = documented["overall_all"] - documented["test_margin"]
    assert _overall(res) >= floor, (_overall(res), floor)
    # the families the compression demo leans on (small objects) are solid on their own
    for fam in ("mme_existence", "pope_random", "pope_popular", "pope_adversarial"):
        assert res[fam]["acc"] >= 85.0, (fam, res[fam]["acc"])


def test_careless_token_dropping_costs_accuracy(loaded, world, documented):
    model, processor = loaded
    full = E.evaluate_world(model, processor, world)
    dropped = E.evaluate_world(model, processor, world, keep_policy="random", n_keep=64)
    assert _overall(full) - _overall(dropped) >= 10.0


def test_multi_seed_evaluation_reports_each_world_and_their_mean(tmp_path):
    columns = E.main(["--model-path", str(CKPT), "--seeds", "7", "8", "--mme-images", "2", "--pope-images", "1",
                      "--out", str(tmp_path), "--threads", "1"])
    assert list(columns) == ["seed 7", "seed 8", "mean"]
    assert (tmp_path / "seed7" / "MME_Benchmark_release_version").is_dir()
    for family in E.FAMILIES:
        accs = [columns[f"seed {s}"][family]["acc"] for s in (7, 8)]
        assert columns["mean"][family]["acc"] == pytest.approx(sum(accs) / 2)
        assert columns["seed 7"][family]["n"] == 4 if family.startswith("mme") else columns["seed 7"][family]["n"] > 0


def test_training_builds_the_shipped_tokenizer(tmp_path):
    """`train_tiny_llava` rebuilds its tokenizer from `training_world.world_texts` on every run, also when it
    continues from saved weights (--init-from): if that corpus drifted with the world's question
    sampler, the continued weights would silently read other token ids."""
    from tiny_llava import build_processor

    build_processor(W.world_texts(0), tmp_path / "build").save_pretrained(tmp_path / "saved")
    built = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert built == json.loads((CKPT / "tokenizer.json").read_text())
