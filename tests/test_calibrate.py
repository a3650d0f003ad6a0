"""dynk.scale calibration to a mean budget (sparsezip_pl.calibrate)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sparsezip_pl.api import build_config
from sparsezip_pl.calibrate import budgets, calibrate_scale, capture_images, config_from_yaml, find_images, main
from sparsezip_pl.models import load_backend
from sparsezip_pl.models.tiny import cached_tiny_llava

CONFIG = build_config(method="sparsezip", dynamic_k=True, k_min=2, k_max=40, dynk={"rule": "attention_entropy"},
                      merging={"contextual_num": 4})


def _with_dynk(**changes):
    options = CONFIG.sparsezip
    return dataclasses.replace(CONFIG, sparsezip=dataclasses.replace(options, dynk=dataclasses.replace(options.dynk, **changes)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):  # images whose attention spreads differently: smooth ones and noisy ones
        arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) if i % 2 else np.full((64, 64, 3), 40 * i, np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    backend = load_backend("hf", cached_tiny_llava("hf"))
    paths = find_images(folder)
    return backend, paths, capture_images(backend, paths, CONFIG.sparsezip.layers, batch_size=4), folder


def test_finds_only_images_in_order(setup):
    _, paths, captures, _ = setup
    assert [p.name for p in paths] == [f"{i}.png" for i in range(6)]
    assert sum(c.hidden.shape[0] for c in captures) == 6


def test_budget_grows_with_scale_and_calibration_hits_the_target(setup):
    backend, _, captures, _ = setup
    means = [budgets(backend, _with_dynk(scale=s),
                     captures).mean().item() for s in (0.01, 0.05, 0.2, 1.0)]
    assert means == sorted(means) and means[0] < means[-1]
    target = (means[0] + means[-1]) / 2
    scale, tokens = calibrate_scale(backend, CONFIG, captures, target)
    assert tokens.shape == (6,)
    assert abs(tokens.mean().item() - target) <= 1.0
    # the returned budgets are those of the returned scale
    again = budgets(backend, _with_dynk(scale=scale), captures)
    assert torch.equal(again, tokens)


def test_unreachable_target_and_wrong_rule_are_errors(setup):
    backend, _, captures, _ = setup
    with pytest.raises(ValueError, match="outside what dynk.scale"):
        calibrate_scale(backend, CONFIG, captures, 10_000.0)
    with pytest.raises(ValueError, match="attention_entropy"):
        calibrate_scale(backend, _with_dynk(rule="seed"),
                        captures, 20.0)


def test_command_line_reads_the_config_file(setup, tmp_path, capsys):
    _, _, _, folder = setup
    config = tmp_path / "method.yaml"
    config.write_text("model:\n  compressor:\n    method: sparsezip\n    dynamic_k: true\n    k_min: 2\n    k_max: 40\n"
                      "    dynk:\n      rule: attention_entropy\n    merging:\n      contextual_num: 4\n")
    assert config_from_yaml(config) == CONFIG
    scale = main(["--config", str(config), "--model-path", str(cached_tiny_llava("hf")), "--images", str(folder),
                  "--target", "20", "--device", "cpu"])
    assert f"dynk.scale {scale:.3f}" in capsys.readouterr().out
    (tmp_path / "empty.yaml").write_text("model: {}\n")
    with pytest.raises(ValueError, match="no model.compressor"):
        config_from_yaml(tmp_path / "empty.yaml")
