"""bench/gpu.py --smoke: the GPU benchmark's whole path at tiny shapes on CPU."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparsezip_pl.compress.registry import get_method, method_names

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_smoke_run_measures_every_method_on_both_model_shapes(gpu_bench, tmp_path):
    report = gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["cases"] == report["cases"] and saved["device"].startswith("CPU")
    table = (tmp_path / "gpu_bench.md").read_text()
    assert saved["device"] in table and saved["date"] in table

    cases = {(c["model"], c["method"]): c for c in report["cases"]}
    for model, stock, budget in (("llava-1.5-7b", 576, 64), ("llava-next-7b (5 views)", 2880, 160)):
        for name in [*method_names(), *gpu_bench.VARIANTS]:
            case = cases[(model, name)]
            llm_side = get_method(name.partition(":")[0]).side == "llm"
            # On the 32-layer decoder an average of 64 of 576 is reachable for FastV (K = 2) and
            # PyramidDrop with stages from layer 2, not for PyramidDrop's official [8, 16, 24]
            # (least 163.5); 160 of 2880 for none (least 181).
            reachable = not llm_side or (model == "llava-1.5-7b" and name != "pdrop")
            if not reachable:
                assert case["status"].startswith("out of reach"), (model, name, case["status"])
                continue
            assert case["status"] == "ok", (model, name, case["status"])
            assert case["budget"] == (None if name == "none" else budget)
            for key in ("tower_ms", "prefill_ms", "ttft_ms"):
                assert case[key] > 0, (model, name, key)
            if case["llm_side"] or name == "none":
                assert case["visual_tokens"] == stock
            else:  # at most the budget (SparseZip's dynamic K may spend less), and some tokens
                assert 0 < case["visual_tokens"] <= budget, (model, name)
                assert case["method_ms"] > 0
    # The NeXT shape's stock prompt is 4 x 576 tokens longer than LLaVA-1.5's.
    longer = cases[("llava-next-7b (5 views)", "none")]["sequence"] - cases[("llava-1.5-7b", "none")]["sequence"]
    assert longer == 4 * 576
    assert [row["variant"] for row in report["compressor"]] == ["eager"] and report["compressor"][0]["status"] == "ok"
