"""object_coverage.py: which patches a method keeps, with its compressor read from config files."""

from pathlib import Path

import yaml


def test_object_coverage_bench_layers_config_files_like_the_cli():
    import object_coverage as bench

    repo = Path(__file__).resolve().parents[3]
    layered = [str(repo / "configs/demo/sparsezip.yaml"), str(repo / "configs/demo/original_positions.yaml")]
    calibrated = yaml.safe_load((repo / "configs/demo/sparsezip.yaml").read_text())["model"]["compressor"]["dynk"]["scale"]
    assert bench.compressor_settings(layered) == {
        "method": "sparsezip", "dynamic_k": True, "k_min": 8, "k_max": 64,
        "dynk": {"rule": "attention_entropy", "scale": calibrated}, "merging": {"contextual_num": 16},
        "visual_positions": "original",
    }
