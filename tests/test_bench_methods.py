"""bench/methods.py (smoke): its timings on a tiny LLaVA and its table; the CLI runs it makes are
tests/test_methods_cli.py's."""

import importlib
from pathlib import Path

import pytest

from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.models.families import load_family
from sparsezip_pl.models.tiny import cached_tiny_llava


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module("methods")


def test_timings_of_the_stock_model_and_of_a_method(bench, tmp_path):
    world = generate_world(tmp_path / "w", seed=2, n_mme_images=1, n_pope_images=1, n_instruct=0)
    backend = load_family("hf", cached_tiny_llava("hf", image_size=112), dtype="float32")
    batch = bench.timing_batch(backend, world, 3)
    assert batch["input_ids"].shape[0] == 3
    rows = [{"method": "none", "budget": None}, {"method": "cdpruner", "budget": 16},
            {"method": "random", "budget": 100}]
    bench.measure(backend, rows, batch, repeats=1)
    assert rows[0]["method_ms"] is None and rows[0]["prefill_ms"] > 0
    assert rows[1]["method_ms"] > 0 and rows[1]["prefill_ms"] > 0
    assert "more than the 64" in rows[2]["error"] and "prefill_ms" not in rows[2]  # reported, not dropped


def test_table_rows_relative_to_none_and_failed_rows_keep_the_columns(bench):
    def row(method, budget, tokens, mme, f1):
        return {"method": method, "side": "vision", "budget": budget, "tokens": tokens, "mme/total": mme,
                "pope/f1": f1, "method_ms": None if method == "none" else 1.5, "prefill_ms": 10.0}

    rows = [row("none", None, 576, 600.0, 80.0), row("pool", 64, 64, 450.0, 60.0),
            {"method": "fastv", "side": "llm", "budget": 64, "error": "ValueError: boom"}]
    lines = bench.format_table(rows).splitlines()
    assert lines[2] == "| none | vision | all | 576.0 | 600.0 | 100.0% | 80.0 | 100.0% | - | 10.00 |"
    assert lines[3] == "| pool | vision | 64 | 64.0 | 450.0 | 75.0% | 60.0 | 75.0% | 1.50 | 10.00 |"
    assert lines[4].startswith("| fastv | llm | 64 | failed: ValueError: boom |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
