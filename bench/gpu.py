"""GPU benchmark: every registered method on 7B-shaped LLaVA models with random weights (no download).

    python bench/gpu.py                          # one GPU, bf16, about 8 minutes; writes JSON + Markdown
    python bench/gpu.py --out results/h100 --max-minutes 7.5
    python bench/gpu.py --smoke --out /tmp/gpu-smoke   # CPU, tiny shapes, a few seconds (the test suite runs it)

Models (``bench/llava_shapes.py``): LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B) at 576 stock visual
tokens and budgets 192 / 128 / 64, and the LLaVA-NeXT-7B shape at 2880 stock tokens and budgets
640 / 320 / 160. The NeXT case is "LLaVA-1.5 with 2880 visual tokens (5 views)"
(:class:`llava_shapes.FiveViewLlava`: the same tower, projector and LLM as LLaVA-NeXT-7B; no
image_newline tokens, no unpadding; a vision-side budget is split evenly over the 5 views, an
LLM-side one applies to the whole sequence), so that both cases share one model in GPU memory;
the ``llava-next`` family's own layout is tested in ``tests/test_family_llava_next.py``.

An LLM-side method's budget is the visual tokens averaged over the decoder's layers (the papers'
convention); a budget it cannot reach (FastV at 160 of 2880: layers 0-1 see all 2880, so no
average below 181 exists) is recorded as "out of reach", not run. :data:`VARIANTS` adds rows
with other options (PyramidDrop with earlier stages).

For ``none`` and every registered method (vision and LLM side, found in the registry at run
time), at batch 1 and 16, with SDPA and, when ``flash_attn`` is installed, FlashAttention-2:

* vision tower ms: the tower up to the feature layer, with the method's captures;
* method ms: the vision-side method on that capture ("in LLM" for an LLM-side method, whose cost
  is inside the prefill);
* prefill ms: the LLM's forward over the spliced prompt (visual tokens + question), LLM-side
  pruning included;
* TTFT ms (time to first token): pixels to the first generated token (tower, method, projector,
  splice, prefill, one greedy step);
* decode ms / token: (generate(1 + n) - generate(1)) / n for ``--decode-tokens`` n;
* peak GiB: ``torch.cuda.max_memory_allocated`` during generate(1 + n) (weights included).

Then SparseZip alone (at 64 tokens on LLaVA-1.5 captures): eager, eager replayed as a CUDA graph,
``torch.compile`` (inductor), and ``torch.compile(mode="reduce-overhead")`` (inductor with CUDA
graphs); compiling costs minutes, so by default only at the largest batch.

With ``--vs-seed PATH``: the seed prototype against SparseZip (seed K rule; eager and replayed
as a CUDA graph) on this device, as ``bench/compressor.py --vs-seed`` does on any device.

Every figure is the median of ``--repeats`` synchronized runs after ``--warmup`` untimed ones.
The run keeps to ``--max-minutes`` (default 7.5): cases are run in order of importance (SDPA on
LLaVA-1.5, the compressor variants, SDPA on the NeXT shape, then FlashAttention-2) and a case
that would not finish in time is recorded as skipped. Output: ``gpu_bench.json`` and
``gpu_bench.md`` in ``--out``, naming the device (``torch.cuda.get_device_name``) and the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llava_shapes import build_llava, five_view, llava_spec, make_batch  # noqa: E402

from sparsezip_pl.compress import BudgetOutOfReach, CompressorConfig, VisionCapture, build_method  # noqa: E402
from sparsezip_pl.compress.registry import methods as registered_methods  # noqa: E402
from sparsezip_pl.models.compressed import CompressedLlava, geometry_of  # noqa: E402

#: Rows beside each registered method's defaults (``name:option=value,...``, YAML values): PyramidDrop's
#: official stages [8, 16, 24] reach no average below 163.5 of 576 tokens on 32 layers, so the 64/128
#: rows need earlier stages; the papers' settings for those tables are not published, and these
#: (first stage at FastV's K = 2) are this benchmark's choice.
VARIANTS = ("pdrop:layers=[2,8,16]",)

MODEL_CASES = {
    "llava-1.5-7b": {"views": 1, "stock": 576, "budgets": (192, 128, 64)},
    "llava-next-7b (5 views)": {"views": 5, "stock": 2880, "budgets": (640, 320, 160)},
}


# ------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, object]:
    """(median seconds over ``repeats`` synchronized calls after ``warmup`` untimed ones, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:option=value,...`` (options of the method's own section, YAML values)."""
    name, _, options = spec.partition(":")
    pairs = [item.split("=", 1) for item in re.split(r",(?![^\[]*\])", options) if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"method spec {spec!r}: options are option=value, comma separated")
    return name, {key: yaml.safe_load(value) for key, value in pairs}


def method_names(selected: list[str] | None) -> list[str]:
    """``none`` first, then every registered method (vision and LLM side) and :data:`VARIANTS`, or
    the selection (names or specs)."""
    names = [name for name in registered_methods() if name != "none"] + list(VARIANTS)
    if selected:
        unknown = sorted({parse_spec(s)[0] for s in selected} - set(registered_methods()))
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; registered: {list(registered_methods())}")
        names = [name for name in selected if name != "none"]
    return ["none"] + names


def compressed_model(backend, spec: str, budget: int | None, views: int) -> CompressedLlava:
    """``backend`` with method ``spec`` at ``budget`` visual tokens per sample (None for ``none``)."""
    name, options = parse_spec(spec)
    if name == "none":
        return CompressedLlava(backend, CompressorConfig(method="none")).eval()
    sections = {name: options} if options else {}
    if registered_methods()[name].side == "vision":  # a vision-side budget is per view
        config = CompressorConfig.coerce({"method": name, "budget": budget // views, **sections})
        compressed = CompressedLlava(backend, config).eval()
    else:  # LLM side: the budget is over the whole visual sequence the LLM receives
        config = CompressorConfig.coerce({"method": name, "budget": budget, **sections})
        geometry = dataclasses.replace(geometry_of(backend), num_patches=backend.max_stock_tokens)
        compressed = CompressedLlava(backend, config, compressor=build_method(config, geometry)).eval()
    return compressed


def method_capture(compressed: CompressedLlava, batch: dict) -> VisionCapture:
    """The capture ``compressed.compress`` hands its vision-side method (same steps, kept for timing)."""
    backend = compressed.backend
    method = compressed.compressor
    capture = backend.encode_images(batch, list(getattr(method, "scoring_layers", [])))
    dtype = compressed._compressor_dtype()
    text = backend.embed_tokens(batch["input_ids"])
    text_mask = batch.get("question_mask")
    if capture.sample_index is not None:
        text = text[capture.sample_index]
        text_mask = None if text_mask is None else text_mask[capture.sample_index]

    def cast(tensor):
        return None if tensor is None else tensor.to(dtype)

    return VisionCapture(
        hidden=capture.hidden.to(dtype), queries=cast(capture.queries), keys=cast(capture.keys),
        attention=cast(capture.attention), has_cls=capture.has_cls, grid=capture.grid, text_embeds=text.to(dtype),
        text_mask=None if text_mask is None else text_mask.bool(),
        project=backend.project if getattr(method, "needs_projected", False) else None,
        sample_index=capture.sample_index, layout=capture.layout,
    )


def measure_case(compressed: CompressedLlava, batch: dict, args, device: torch.device) -> dict:
    """Tower, method, prefill, TTFT, decode and peak memory of one (model, method, budget, batch)."""
    backend = compressed.backend
    stock = compressed._stock(None)
    llm_side = compressed.llm_side
    scoring = [] if stock else list(getattr(compressed.compressor, "scoring_layers", []))
    repeats, warmup, new = args.repeats, args.warmup, args.decode_tokens
    record: dict = {}
    with torch.no_grad():
        tower_s, _ = timed(lambda: backend.encode_images(batch, scoring), device, repeats, warmup)
        record["tower_ms"] = tower_s * 1e3
        if stock:
            record["method_ms"] = None
        else:
            capture = method_capture(compressed, batch)
            method_s, _ = timed(lambda: compressed.compressor(capture), device, repeats, warmup)
            record["method_ms"] = method_s * 1e3
        spliced, compression = compressed.prepare_inputs(batch)

        def prefill():
            with compressed._pruning(spliced, None):
                return backend.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids)

        prefill_s, _ = timed(prefill, device, repeats, warmup)
        record["prefill_ms"] = prefill_s * 1e3
        first_s, _ = timed(lambda: compressed.generate(batch, max_new_tokens=1, min_new_tokens=1), device, repeats, 0)
        record["ttft_ms"] = first_s * 1e3
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        total_s, (generated, _) = timed(
            lambda: compressed.generate(batch, max_new_tokens=1 + new, min_new_tokens=1 + new), device, repeats, 0
        )
        if generated.shape[1] != 1 + new:
            raise RuntimeError(f"generate returned {generated.shape[1]} tokens, expected {1 + new}")
        record["decode_ms_per_token"] = (total_s - first_s) * 1e3 / new
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    visual = spliced.visual_mask.sum(1).float()
    record["visual_tokens"] = float(visual.mean())  # what enters the LLM (an LLM-side method prunes inside)
    record["llm_side"] = llm_side
    record["sequence"] = float(spliced.attention_mask.sum(1).float().mean())
    return record


def compressor_variants(backend, batches: list[int], compile_batches: list[int], args, device, deadline) -> list[dict]:
    """SparseZip at 64 tokens on LLaVA-1.5 captures: eager, CUDA graph, torch.compile (+ CUDA graphs)."""
    rows = []
    for size in batches:
        compressed = compressed_model(backend, "sparsezip", 64, 1)
        method = compressed.compressor
        method.check_inputs = False  # its finite check is a host sync: not capturable, and off in compiled code
        batch = make_batch(backend, size, seed=1)
        with torch.no_grad():
            capture = method_capture(compressed, batch)
            eager_s, _ = timed(lambda: method(capture), device, args.repeats + 3, args.warmup + 1)
            variants = [("eager", lambda: eager_s, 0.0)]
            if device.type == "cuda":
                variants.append(("eager, CUDA graph", lambda: _graph_time(method, capture, device, args), 5.0))
            if size in compile_batches and not args.no_compile:
                if device.type == "cuda":
                    variants.append(("torch.compile (inductor)", lambda: _compiled_time(method, capture, device, args, "default"), 150.0))
                    variants.append(("torch.compile, reduce-overhead (CUDA graphs)",
                                     lambda: _compiled_time(method, capture, device, args, "reduce-overhead"), 150.0))
                else:  # the smoke run: exercise the path without minutes of C++ code generation
                    variants.append(("torch.compile (backend eager: graph capture only)",
                                     lambda: _compiled_time(method, capture, device, args, None), 10.0))
            for name, run, cost in variants:
                row = {"variant": name, "batch": size}
                if time.perf_counter() + cost > deadline:
                    row["status"] = "skipped (time)"
                else:
                    try:
                        seconds = run()
                        row.update(ms_per_batch=seconds * 1e3, ms_per_image=seconds * 1e3 / size,
                                   speedup_vs_eager=eager_s / seconds, status="ok")
                    except Exception as error:  # report, go on
                        row["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                rows.append(row)
                print(f"  compressor {name}, batch {size}: {row.get('ms_per_batch', float('nan')):.3f} ms ({row['status']})", flush=True)
    return rows


def _graph_time(method, capture, device, args) -> float:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            method(capture)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        method(capture)
    seconds, _ = timed(graph.replay, device, args.repeats + 3, 1)
    return seconds


def _compiled_time(method, capture, device, args, mode: str | None) -> float:
    torch._dynamo.reset()
    if mode is None:
        compiled = torch.compile(method, fullgraph=True, backend="eager")
    else:
        compiled = torch.compile(method, fullgraph=True, mode=mode)
    for _ in range(3):  # compile, then let cudagraph trees record
        compiled(capture)
    seconds, _ = timed(lambda: compiled(capture), device, args.repeats + 3, 1)
    return seconds


def versus_seed(path: str, device: torch.device, args) -> list[dict]:
    """The seed prototype against SparseZip (seed K rule) on this device, like-for-like as
    ``bench/compressor.py --vs-seed`` (B = 8, LLaVA-1.5 shapes, round-robin medians)."""
    import compressor as compressor_bench  # bench/compressor.py

    from sparsezip_pl.compress import DynKConfig, SparseZipCompressor, SparseZipConfig

    module = compressor_bench.load_seed(path)
    config = SparseZipConfig(dynk=DynKConfig(rule="seed"))
    seed = compressor_bench.seed_compressor(module, config).to(device)
    projector = compressor_bench.llava_projector(device)
    capture = compressor_bench.make_capture(8, 1, 0, device, projector)
    inputs = compressor_bench.seed_inputs(capture)
    layers = [{"attn": inputs["attn"], "keys": inputs["keys"]}]
    ours = SparseZipCompressor(config, 16, 64, check_inputs=False).to(device).eval()

    def run_seed():
        torch.manual_seed(0)
        return seed(scoring_layers=layers, hidden_states=inputs["hidden"], dominant_num=None,
                    weights_for_context=inputs["weights"])

    fns = {"seed prototype": run_seed, "sparsezip seed K rule (eager)": lambda: ours(capture)}
    if device.type == "cuda":
        with torch.no_grad():
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    ours(capture)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ours(capture)
        fns["sparsezip seed K rule (CUDA graph)"] = graph.replay
    with torch.no_grad():
        samples = compressor_bench.round_robin(fns, max(5, args.repeats), 2, device)
    seed_ms = statistics.median(samples["seed prototype"][0]) * 1e3 / 8
    rows = []
    for name, (wall, _) in samples.items():
        ms = statistics.median(wall) * 1e3 / 8
        rows.append({"variant": name, "ms_per_image": ms, "seed_over_this": seed_ms / ms})
        print(f"  {name}: {ms:.3f} ms / image, seed / this {seed_ms / ms:.1f}x", flush=True)
    return rows


# ------------------------------------------------------------------------------------ output


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        f"# GPU benchmark: {report['device']}, {report['date']}",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}, {report['dtype']}, models "
        f"{report['shape']} (random weights), median of {report['repeats']} runs after {report['warmup']} warm-up, "
        f"decode over {report['decode_tokens']} tokens; run time {report['minutes']:.1f} min. "
        "TTFT = pixels to the first token; prefill = the LLM's forward over the spliced prompt; "
        "an LLM-side method prunes inside the prefill (its 'visual tokens' are those entering the LLM).",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for case in report["cases"]:
        groups.setdefault((case["model"], case["attention"], case["batch"]), []).append(case)
    for (model, attention, size), cases in groups.items():
        lines += [f"## {model}, {attention}, batch {size}", ""]
        lines += ["| method | budget | visual tokens / sample | vision tower ms | method ms | prefill ms | TTFT ms "
                  "| decode ms / token | peak GiB | prefill speed-up vs none |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base = next((c for c in cases if c["method"] == "none" and c.get("status") == "ok"), None)
        for c in cases:
            budget = "-" if c["budget"] is None else str(c["budget"])
            if c.get("status") != "ok":
                lines.append(f"| {c['method']} | {budget} | {c.get('status')} | | | | | | | |")
                continue
            method_ms = "in LLM" if c["llm_side"] else fmt(c["method_ms"], 2)
            speedup = f"{base['prefill_ms'] / c['prefill_ms']:.2f}x" if base else "-"
            lines.append(
                f"| {c['method']} | {budget} | {c['visual_tokens']:.1f} | {fmt(c['tower_ms'])} | {method_ms} | "
                f"{fmt(c['prefill_ms'])} | {fmt(c['ttft_ms'])} | {fmt(c['decode_ms_per_token'], 2)} | "
                f"{fmt(c['peak_gib'], 2)} | {speedup} |"
            )
        lines.append("")
    if report["compressor"]:
        lines += ["## SparseZip alone (64 tokens, LLaVA-1.5 captures): eager, CUDA graphs, torch.compile", "",
                  "| variant | batch | ms / batch | ms / image | speed-up vs eager | status |", "|---|---:|---:|---:|---:|---|"]
        for row in report["compressor"]:
            lines.append(f"| {row['variant']} | {row['batch']} | {fmt(row.get('ms_per_batch'), 3)} | "
                         f"{fmt(row.get('ms_per_image'), 3)} | {fmt(row.get('speedup_vs_eager'), 2)} | {row['status']} |")
        lines.append("")
    if report.get("vs_seed"):
        lines += ["## SparseZip against the seed prototype (B = 8, LLaVA-1.5 shapes, seed K rule, same process)", "",
                  "| variant | ms / image (median) | seed / this |", "|---|---:|---:|"]
        for row in report["vs_seed"]:
            lines.append(f"| {row['variant']} | {row['ms_per_image']:.3f} | {row['seed_over_this']:.1f}x |")
        lines.append("")
    if report["skipped"]:
        lines += [f"Skipped to keep within {report['max_minutes']} minutes: {len(report['skipped'])} cases "
                  f"({', '.join(report['skipped'][:12])}{' ...' if len(report['skipped']) > 12 else ''}).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shapes, batch 1, one budget per model, no compile: a few seconds")
    parser.add_argument("--shape", choices=["7b", "small", "tiny"], default=None, help="default: 7b (tiny with --smoke)")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bfloat16 (float32 on CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 16 (1 with --smoke)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--models", nargs="+", default=list(MODEL_CASES), choices=list(MODEL_CASES))
    parser.add_argument("--attention", nargs="+", default=None,
                        help="default: sdpa, plus flash_attention_2 when flash_attn is installed")
    parser.add_argument("--decode-tokens", type=int, default=None, help="default: 16 (2 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 2 (1 with --smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 (0 with --smoke)")
    parser.add_argument("--max-minutes", type=float, default=7.5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the compressor")
    parser.add_argument("--vs-seed", metavar="PATH", help="also time the seed prototype's sparsezip.py against SparseZip")
    parser.add_argument("--compile-batches", type=int, nargs="+", default=None, help="default: the largest batch")
    parser.add_argument("--out", default=None, help="folder for gpu_bench.json / gpu_bench.md (default: bench_results/gpu-DATE)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.shape = args.shape or ("tiny" if smoke else "7b")
    args.device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.batches = args.batches or ([1] if smoke else [1, 16])
    args.decode_tokens = args.decode_tokens or (2 if smoke else 16)
    args.repeats = args.repeats or (1 if smoke else 2)
    args.warmup = args.warmup if args.warmup is not None else (0 if smoke else 1)
    args.compile_batches = args.compile_batches or [max(args.batches)]
    args.no_compile = args.no_compile or smoke  # tracing alone takes longer than the rest of the smoke run
    if args.attention is None:
        args.attention = ["sdpa"]
        if args.device != "cpu" and importlib.util.find_spec("flash_attn") is not None:
            args.attention.append("flash_attention_2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.smoke:
        # Tiny tensors: extra threads only add barriers, which a busy small machine turns into waits.
        torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    deadline = started + args.max_minutes * 60
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    out = Path(args.out or f"bench_results/gpu-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    names = method_names(args.methods)
    import transformers

    print(f"{device_name(device)}: building the {args.shape} LLaVA in {args.dtype} ...", flush=True)
    backend = build_llava(llava_spec(args.shape), device, dtype)
    print(f"  built in {time.perf_counter() - started:.0f} s; methods: {', '.join(names)}", flush=True)
    backends = {"llava-1.5-7b": backend, "llava-next-7b (5 views)": five_view(backend)}
    report = {
        "device": device_name(device), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": args.dtype, "shape": args.shape, "repeats": args.repeats,
        "warmup": args.warmup, "decode_tokens": args.decode_tokens, "max_minutes": args.max_minutes,
        "smoke": args.smoke, "cases": [], "compressor": [], "skipped": [],
    }
    cost: dict[tuple, float] = {}  # seconds the last case of a (model, batch) group took

    def run_cases(model: str, attention: str) -> None:
        spec = MODEL_CASES[model]
        model_backend = backends[model]
        budgets = spec["budgets"][-1:] if args.smoke else spec["budgets"]
        for size in args.batches:
            batch = make_batch(model_backend, size)
            plan = [("none", None)] + [(name, budget) for budget in budgets for name in names if name != "none"]
            for name, budget in plan:
                label = f"{model} / {attention} / batch {size} / {name}" + ("" if budget is None else f" @ {budget}")
                case = {"model": model, "attention": attention, "batch": size, "method": name, "budget": budget}
                estimate = cost.get((model, size, name == "none"), 0.0)
                if time.perf_counter() + 1.2 * estimate > deadline:
                    case["status"] = "skipped (time)"
                    report["skipped"].append(label)
                    report["cases"].append(case)
                    continue
                case_started = time.perf_counter()
                try:
                    compressed = compressed_model(model_backend, name, budget, spec["views"])
                    case.update(measure_case(compressed, batch, args, device), status="ok")
                    del compressed
                except BudgetOutOfReach as error:  # e.g. an LLM-side average below its first pruning layer's
                    case["status"] = f"out of reach: {str(error).splitlines()[0][:200]}"
                except Exception as error:  # one method failing must not stop the benchmark
                    case["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                cost[(model, size, name == "none")] = time.perf_counter() - case_started
                report["cases"].append(case)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"  {label}: {case['status']}" + (
                    f", prefill {case['prefill_ms']:.1f} ms, TTFT {case['ttft_ms']:.1f} ms, "
                    f"decode {case['decode_ms_per_token']:.2f} ms/token" if case["status"] == "ok" else ""), flush=True)

    def set_attention(attention: str) -> None:
        backend.model.set_attn_implementation(attention)

    order = []
    for attention in args.attention:
        for model in args.models:
            order.append((model, attention))
    first = order[0] if order else None
    for index, (model, attention) in enumerate(order):
        set_attention(attention)
        run_cases(model, attention)
        if (model, attention) == first:
            set_attention("sdpa")
            report["compressor"] = compressor_variants(backend, args.batches, args.compile_batches, args, device, deadline)
            if args.vs_seed:
                try:
                    report["vs_seed"] = versus_seed(args.vs_seed, device, args)
                except Exception as error:  # report, go on
                    print(f"  --vs-seed failed: {type(error).__name__}: {error}", flush=True)
            set_attention(attention)
    set_attention("sdpa")
    report["minutes"] = (time.perf_counter() - started) / 60
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_bench.md").write_text(markdown(report))
    print(f"\nwrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'} ({report['minutes']:.1f} min)")
    return report


if __name__ == "__main__":
    main()
