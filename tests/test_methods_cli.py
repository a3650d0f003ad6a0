"""Each vision-side method of the comparison through the CLI: ``python -m sparsezip_pl test`` on a
tiny LLaVA (64 patches) at 16 tokens, on a small synthetic world."""

import json

import pytest
import yaml

from sparsezip_pl.cli import main
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.models.tiny import cached_tiny_llava


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=5, n_mme_images=1, n_pope_images=1, n_instruct=0)


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


@pytest.mark.parametrize("method", ["random", "pool", "divprune", "vispruner", "cdpruner"])
def test_method_runs_through_the_cli_at_its_budget(method, tmp_path, world, tiny_model):
    config = {
        "model": {"backend": "hf", "model_path": tiny_model, "max_new_tokens": 2},
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path / "run"),
                    "enable_progress_bar": False, "enable_model_summary": False},
        "data": {
            "class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
            "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                          "pope_image_dir": world["pope_image_folder"], "batch_size": 8},
        },
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["test", "--config", str(path), "--model.compressor.method", method, "--model.compressor.budget", "16"])
    assert cli.model.model.compressor.method_name == method
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["budget/tokens_mean"] == 16 and results["budget/tokens_min"] == results["budget/tokens_max"] == 16
    predictions = tmp_path / "run" / "predictions" / "predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert {r["task"] for r in records} == {"mme", "pope"} and all(r["visual_tokens"] == 16 for r in records)
    for key in ("test/mme/perception_total_4of10", "test/pope/avg/f1", "test/pope/avg/accuracy"):
        assert 0 <= results[key] <= (400 if "mme" in key else 100), key
