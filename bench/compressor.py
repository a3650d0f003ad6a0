"""Speed and memory of the vision-side methods at LLaVA-1.5 shapes, against the CLIP tower they follow
and, with ``--vs-seed``, against the SparseZip seed prototype in the same process.

    python bench/compressor.py                      # B = 8, 10 repeats, 1 thread, markdown tables
    python bench/compressor.py --vs-seed /path/to/sparsezip.py --repeats 20 --profile --no-tower
    python bench/compressor.py --device cuda --vs-seed /path/to/sparsezip.py --compile

Inputs are random captures with LLaVA-1.5's shapes (L = 577, C = 1024, 16 heads of 64 dims,
scoring layer -2 only unless a row says otherwise); the CLS query of each image is pulled towards
a few "hot" patches with a strength that varies over the batch, so that the CLS attention is
peaked like a real CLIP layer's and dynamic K varies from image to image. Methods that read the
question or score in the LLM's input space get random question embeddings (4096 wide, 32 tokens)
and a random projector of LLaVA-1.5's shape (Linear 1024 -> 4096, GELU, Linear 4096 -> 4096);
their time includes projecting every patch.

Rows:

* one per vision-side method of the registry (``compress.registry.methods()`` at run time), all
  at the same ``--budget`` (64 visual tokens by default; ``none`` keeps all 576), and the
  projector alone on all 576 patches: the share of DivPrune's and CDPruner's rows that the stock
  model spends anyway;
* SparseZip's ablations and settings (the legacy flat config);
* with ``--vs-seed PATH``: the seed prototype (``VisionZipCompressor`` of the file at PATH,
  imported, never copied) and SparseZip with the seed's dynamic-K rule (``dynk.rule: seed``,
  otherwise the defaults, which are the seed YAML's: k in [8, 64], 16 contextual tokens, 32
  k-means++ seeds merged to 16, 10 Lloyd steps). The seed gets what its LLaVA integration passed
  it (the layer's attention map [B, 16, L, L], built once outside the timed region, with the
  CLS row computed from the same queries and keys; the head-averaged keys; the head-averaged CLS
  attention as merge weights); SparseZip gets its own capture (per-head keys and the CLS query)
  and, in a second row, the very tensors the seed gets (head-averaged keys as a one-head capture
  and the head-averaged CLS attention row): the same scores up to float rounding, less input to read.
  Every ratio is seed time / row time from the same interleaved run.

Timing: all rows are timed round-robin (one forward of each per round, ``--repeats`` rounds after
``--warmup`` untimed ones), in eval mode under ``torch.no_grad()``, so drifts of a shared machine
hit every row alike. Per image: the median and the minimum wall time and, on CPU, the median
thread CPU time (``time.thread_time``: time this thread ran, which a descheduling by other
processes does not inflate; cache and memory-bandwidth contention still do). On a shared machine
the minimum and the CPU time are the least disturbed figures. ``--profile`` adds a stage breakdown
of SparseZip (CPU time per stage, or synchronized wall time on a GPU).

Threads: one by default. On a small shared machine, intra-op parallelism is fragile: when another
process holds one of the two cores, every parallel kernel waits at its barrier for the descheduled
thread. ``--threads 0`` keeps torch's own choice.

Peak memory (CPU): the profiler (``profile_memory=True``) records every tensor allocation and free
of one forward; the table shows the highest total of live tensor bytes allocated by the forward
(inputs excluded), a close lower bound (temporaries inside one ATen kernel do not appear). On a
GPU: ``torch.cuda.max_memory_allocated`` over one forward, minus what was allocated before.

``--keep-freed-memory`` asks glibc (``mallopt``) to keep freed memory in the process instead of
returning large blocks to the OS, as jemalloc/tcmalloc or a GPU caching allocator do (page faults
on a small virtual machine can cost as much as the arithmetic). It applies to every row alike.

The tower row is one forward of a random-weight CLIP ViT-L/14-336 (``transformers``, 24 layers)
at ``--tower-batch`` images; each method's cost is reported as a percentage of it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsezip_pl.compress import (  # noqa: E402
    CompressorConfig,
    DynKConfig,
    Geometry,
    MergingConfig,
    SparseZipCompressor,
    SparseZipConfig,
    VisionCapture,
    build_method,
)
from sparsezip_pl.compress.registry import methods as registered_methods  # noqa: E402
from sparsezip_pl.compress.testing import random_capture  # noqa: E402

NUM_PATCHES, WIDTH, HEADS, HEAD_DIM = 576, 1024, 16, 64
TEXT_DIM, TEXT_TOKENS = 4096, 32


def ablations() -> dict[str, SparseZipConfig]:
    """SparseZip's settings and ablations (flat legacy configs, as earlier versions of this bench)."""
    return {
        "sparsezip (default)": SparseZipConfig(),
        "sparsezip seed K rule": SparseZipConfig(dynk=DynKConfig(rule="seed")),
        "sparsezip fixed 54+16": SparseZipConfig(dynamic_k=False, dominant=54),
        "sparsezip attention-only": SparseZipConfig(hybrid_scoring=False),
        "sparsezip non-hierarchical": SparseZipConfig(merging=MergingConfig(hierarchical=False)),
        "sparsezip 3 layers": SparseZipConfig(layers=[-2, -6, -12]),
    }


# ------------------------------------------------------------------------------------ the seed


def load_seed(path: str | Path, name: str = "sparsezip_seed_prototype"):
    """Import the seed prototype's file from ``path`` (read-only; nothing is copied).

    The module is registered in ``sys.modules`` before it runs (its dataclasses, with postponed
    annotations, look their module up there). The original 2025-11-08 file uses dataclass
    instances as field defaults, which Python >= 3.11 refuses; while it runs, ``dataclass`` makes
    such classes hashable (``unsafe_hash``), which Python accepts as defaults and which keeps the
    file's shared-default semantics.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--vs-seed: no such file: {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    original = dataclasses.dataclass

    def hashable_dataclass(cls=None, **kwargs):
        kwargs.setdefault("unsafe_hash", True)
        return original(cls, **kwargs) if cls is not None else functools.partial(hashable_dataclass, **kwargs)

    dataclasses.dataclass = hashable_dataclass
    try:
        spec.loader.exec_module(module)
    finally:
        dataclasses.dataclass = original
    for attribute in ("VisionZipCompressor", "CompressionConfig", "ScoringAlphas", "DynamicKConfig", "MergingConfig"):
        if not hasattr(module, attribute):
            raise SystemExit(f"--vs-seed: {path} has no {attribute}; is it the SparseZip prototype (utils/sparsezip.py)?")
    return module


def seed_compressor(module, config: SparseZipConfig):
    """The prototype's compressor with SparseZip's settings (the seed YAML's values)."""
    dynk = module.DynamicKConfig(c=8.0, k_min=config.k_min, k_max=config.k_max, eps=config.dynk.eps)
    merging = config.merging
    cfg = module.CompressionConfig(
        alphas=module.ScoringAlphas(config.alphas.attn, config.alphas.entropy, config.alphas.mutual),
        tau_feat=config.tau_feat,
        tau_sim=config.tau_sim,
        cross_beta=0.0,
        dynamic_k=True,
        dynk=dynk,
        k_min=config.k_min,
        k_max=config.k_max,
        merging=module.MergingConfig(
            contextual_num=merging.contextual_num,
            kmeans_init_factor=merging.kmeans_init_factor,
            kmeans_iters=merging.kmeans_iters,
            agglomerative=merging.agglomerative,
        ),
    )
    return module.VisionZipCompressor(num_scoring_layers=1, cfg=cfg).eval()


def seed_inputs(capture: VisionCapture) -> dict[str, torch.Tensor]:
    """What the seed's LLaVA integration passed its compressor, from one of our captures.

    attn [B, h, L, L] (only the CLS row is ever read; it is softmax(q . K^T / sqrt(d)) of the
    captured CLS query, the other rows 1 / L), keys = the head-averaged keys [B, L, d] (VisionZip's
    "metric"), merge weights = the head-averaged CLS attention to the patches [B, N].
    """
    queries, keys = capture.queries[0].float(), capture.keys[0].float()
    batch, heads, length, dim = keys.shape
    row = torch.softmax(torch.einsum("bhd,bhld->bhl", queries, keys) / math.sqrt(dim), dim=-1)
    attn = torch.full((batch, heads, length, length), 1.0 / length, device=keys.device)
    attn[:, :, 0, :] = row
    return {"attn": attn, "keys": keys.mean(dim=1), "hidden": capture.hidden, "weights": row[:, :, 1:].mean(dim=1)}


def seed_shaped_capture(inputs: dict[str, torch.Tensor]) -> VisionCapture:
    """The seed's inputs as one of our captures: one head (the head-averaged keys) and the
    head-averaged CLS attention row given as the capture's attention (softmax over L, CLS column
    dropped), so SparseZip reads exactly what the seed reads."""
    attention = inputs["attn"][:, :, 0, 1:].mean(dim=1)  # [B, N]
    return VisionCapture(
        hidden=inputs["hidden"],
        keys=inputs["keys"][None, :, None],  # [1, B, 1, L, d]
        attention=attention[None, :, None],  # [1, B, 1, N]
    )


# ------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device):
    """Time every function once per round; {name: (wall seconds list, thread CPU seconds list)}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    samples = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.thread_time()
            fn()
            synchronize(device)
            samples[name][1].append(time.thread_time() - cpu)
            samples[name][0].append(time.perf_counter() - wall)
    return samples


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Highest extra memory of one call (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def stage_timers(device: torch.device):
    """Wrap SparseZip's stage functions with timers (thread CPU time on CPU, synchronized wall
    time on a GPU); yields {stage: [seconds per call]}."""
    from sparsezip_pl.compress import compressor as comp_module, merge, scoring

    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    records: dict[str, list[float]] = {}
    targets = [
        (comp_module, "patch_attention_and_keys", "CLS attention (q . k, softmax)"),
        (scoring, "head_sum", "keys summed over heads"),
        (scoring, "feature_entropy", "feature entropy"),
        (scoring, "mutual_information_proxy", "MI proxy (N x N similarities)"),
        (comp_module, "select_dominant", "top-K selection"),
        (merge, "leftover_weights", "merge weights"),
        (merge, "kmeans_pp_init", "k-means++ seeding"),
        (merge, "weighted_kmeans", "Lloyd iterations"),
        (merge, "agglomerate", "agglomerative merging"),
        (merge, "assign_nearest", "final assignment"),
        (comp_module, "hierarchical_plan", "contextual plan (total)"),
        (comp_module, "assemble_output", "output assembly"),
    ]
    saved = []

    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            synchronize(device)
            start = clock()
            result = fn(*args, **kwargs)
            synchronize(device)
            records.setdefault(label, []).append(clock() - start)
            return result

        return wrapper

    for module, name, label in targets:
        if hasattr(module, name):
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, timed(getattr(module, name), label))
    try:
        yield records
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


# ------------------------------------------------------------------------------------ setup


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def keep_freed_memory() -> bool:
    """glibc: no trimming of the heap and no mmap for blocks below 32 MiB. True if applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def llava_projector(device: torch.device) -> nn.Module:
    """A random projector of LLaVA-1.5's shape (mlp2x_gelu)."""
    gen = torch.Generator().manual_seed(7)
    layers = nn.Sequential(nn.Linear(WIDTH, TEXT_DIM), nn.GELU(), nn.Linear(TEXT_DIM, TEXT_DIM))
    with torch.no_grad():
        for param in layers.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return layers.to(device).eval()


def make_capture(batch: int, layers: int, seed: int, device: torch.device, projector: nn.Module) -> VisionCapture:
    peaks = torch.linspace(10.0, 30.0, batch).tolist()
    capture = random_capture(batch, NUM_PATCHES, WIDTH, HEADS, HEAD_DIM, num_layers=layers, peak=peaks, num_hot=8, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    text = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=gen) * 0.02
    return VisionCapture(
        hidden=capture.hidden.to(device),
        queries=capture.queries.to(device),
        keys=capture.keys.to(device),
        text_embeds=text.to(device),
        text_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=device),
        project=projector,
    )


def tower_ms_per_image(batch: int, repeats: int, device: torch.device) -> float:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14
    )
    tower = CLIPVisionModel(config).to(device).eval()
    pixels = torch.randn(batch, 3, 336, 336, device=device)
    with torch.no_grad():
        samples = round_robin({"tower": lambda: tower(pixel_values=pixels)}, repeats, 1, device)
    return statistics.median(samples["tower"][0]) * 1e3 / batch


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's choice")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens per image for the registry rows")
    parser.add_argument("--tower-batch", type=int, default=1)
    parser.add_argument("--tower-repeats", type=int, default=2)
    parser.add_argument("--no-tower", action="store_true", help="skip the CLIP tower forward")
    parser.add_argument("--no-registry", action="store_true", help="skip the registry rows")
    parser.add_argument("--no-ablations", action="store_true", help="skip SparseZip's ablation rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vs-seed", metavar="PATH", help="the seed prototype's sparsezip.py, timed side by side")
    parser.add_argument("--profile", action="store_true", help="stage breakdown of SparseZip (seed K rule)")
    parser.add_argument("--compile", action="store_true", help="also time SparseZip under torch.compile (inductor)")
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc mallopt: keep freed memory (see above)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "glibc default"
    if args.keep_freed_memory:
        allocator = "glibc, freed memory kept (mallopt)" if keep_freed_memory() else "glibc default (mallopt failed)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {where}, allocator: {allocator}")
    print(
        f"batch {args.batch}, L = {NUM_PATCHES + 1}, C = {WIDTH}, {HEADS} heads x {HEAD_DIM}; per image: median and "
        f"min wall time and median thread CPU time of {args.repeats} round-robin forwards after {args.warmup} warm-up\n"
    )

    projector = llava_projector(device)
    captures: dict[int, VisionCapture] = {}

    def capture_for(layers: int) -> VisionCapture:
        if layers not in captures:
            captures[layers] = make_capture(args.batch, layers, args.seed, device, projector)
        return captures[layers]

    geometry = Geometry(num_heads=HEADS, head_dim=HEAD_DIM, width=WIDTH, num_patches=NUM_PATCHES, text_dim=TEXT_DIM)
    rows: dict[str, dict] = {}  # name -> {"fn", "kind", ...}

    def add(name: str, module: nn.Module, capture: VisionCapture, kind: str) -> None:
        rows[name] = {"fn": (lambda m=module, c=capture: m(c)), "module": module, "capture": capture, "kind": kind}

    if not args.no_registry:
        for name, spec in registered_methods().items():
            if spec.side != "vision":
                continue
            budget = None if name == "none" else args.budget
            try:
                module = build_method(CompressorConfig(method=name, budget=budget), geometry).to(device).eval()
                if hasattr(module, "check_inputs"):
                    module.check_inputs = False
                layers = max(1, len(getattr(module, "scoring_layers", [])))
                capture = capture_for(layers)
                with torch.no_grad():
                    module(capture)
            except Exception as error:  # a method this synthetic capture cannot feed: say so, go on
                print(f"registry method {name!r} skipped: {type(error).__name__}: {error}")
                continue
            add(f"{name}" + ("" if budget is None else f" @ {budget}"), module, capture, "registry")
        # DivPrune and CDPruner rank projector outputs, so their rows include projecting all 576
        # patches (which the stock model does anyway): this row is that share of them.
        hidden = capture_for(1).hidden
        rows[f"(the projector alone, all {NUM_PATCHES} patches)"] = {
            "fn": lambda: projector(hidden[:, 1:]), "kind": "registry", "reference": True}
    if not args.no_ablations:
        for name, config in ablations().items():
            module = SparseZipCompressor(config, HEADS, HEAD_DIM, check_inputs=False).to(device).eval()
            add(name, module, capture_for(len(config.layers)), "ablation")

    seed_config = SparseZipConfig(dynk=DynKConfig(rule="seed"))
    ours_seed_rule = SparseZipCompressor(seed_config, HEADS, HEAD_DIM, check_inputs=False).to(device).eval()
    if args.vs_seed:
        module = load_seed(args.vs_seed)
        seed = seed_compressor(module, seed_config).to(device)
        inputs = seed_inputs(capture_for(1))
        layers = [{"attn": inputs["attn"], "keys": inputs["keys"]}]

        def run_seed():
            torch.manual_seed(args.seed)  # the prototype seeds k-means++ from the global RNG
            return seed(scoring_layers=layers, hidden_states=inputs["hidden"], dominant_num=None,
                        weights_for_context=inputs["weights"])

        rows["seed prototype"] = {"fn": run_seed, "module": seed, "kind": "seed"}
        add("sparsezip seed K rule (vs seed)", ours_seed_rule, capture_for(1), "vs-seed")
        one_head = SparseZipCompressor(seed_config, 1, HEAD_DIM, check_inputs=False).to(device).eval()
        add("sparsezip seed K rule, the seed's inputs", one_head, seed_shaped_capture(inputs), "vs-seed")
    if args.compile:
        started = time.perf_counter()
        compiled = torch.compile(SparseZipCompressor(seed_config, HEADS, HEAD_DIM, check_inputs=False).to(device).eval())
        with torch.no_grad():
            compiled(capture_for(1))
        print(f"torch.compile (inductor) of SparseZip (seed K rule): {time.perf_counter() - started:.0f} s to compile")
        add("sparsezip seed K rule, torch.compile", compiled, capture_for(1), "vs-seed" if args.vs_seed else "ablation")

    with torch.no_grad():
        samples = round_robin({name: row["fn"] for name, row in rows.items()}, args.repeats, args.warmup, device)
        for name, row in rows.items():
            out = row["fn"]()
            wall, cpu = samples[name]
            row.update(
                ms=statistics.median(wall) * 1e3 / args.batch,
                min_ms=min(wall) * 1e3 / args.batch,
                cpu_ms=statistics.median(cpu) * 1e3 / args.batch,
                peak_mb=peak_bytes(row["fn"], device) / 2**20,
            )
            if row.get("reference"):  # not a method: no tokens kept or merged
                row["tokens"], row["k"] = float(NUM_PATCHES), "-"
                continue
            if isinstance(out, tuple):  # the seed: (tokens, indices) with zero padding, no mask
                tokens, indices = out
                row["tokens"] = float((tokens.abs().sum(-1) > 0).sum(1).float().mean())
                kept = (indices >= 1).sum(1).float()
            else:
                row["tokens"] = float(out.num_tokens.float().mean())
                kept = out.num_dominant.float()
            row["k"] = f"{int(kept.min())} / {kept.mean().item():.1f} / {int(kept.max())}"

    tower_ms = None if args.no_tower else tower_ms_per_image(args.tower_batch, args.tower_repeats, device)
    seed_row = rows.get("seed prototype")

    def table(kinds: tuple[str, ...], title: str) -> None:
        selected = [(name, row) for name, row in rows.items() if row["kind"] in kinds]
        if not selected:
            return
        header = ["method", "ms / image (median)", "ms / image (min)", "CPU ms / image (median)", "peak MiB (batch)",
                  "tokens / image", "K min / mean / max", "% of CLIP tower"]
        if seed_row:
            header += ["seed / this (median)", "seed / this (min)", "seed / this (CPU)"]
        print(f"\n### {title}\n")
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * (len(header) - 1))
        for name, row in selected:
            share = f"{100 * row['ms'] / tower_ms:.2f}" if tower_ms else "-"
            cells = [name, f"{row['ms']:.3f}", f"{row['min_ms']:.3f}", f"{row['cpu_ms']:.3f}", f"{row['peak_mb']:.1f}",
                     f"{row['tokens']:.1f}", row["k"], share]
            if seed_row:
                cells += [f"{seed_row[key] / row[key]:.1f}x" for key in ("ms", "min_ms", "cpu_ms")]
            print("| " + " | ".join(cells) + " |")

    table(("registry",), f"Registered vision-side methods at {args.budget} visual tokens (none: all {NUM_PATCHES})")
    table(("ablation",), "SparseZip settings and ablations (legacy flat configs)")
    table(("seed", "vs-seed"), "SparseZip against the seed prototype (same settings, same process, interleaved)")
    if seed_row:
        ours = rows["sparsezip seed K rule (vs seed)"]
        print(
            f"\nseed prototype {seed_row['ms']:.2f} ms / image (min {seed_row['min_ms']:.2f}, CPU {seed_row['cpu_ms']:.2f}); "
            f"SparseZip (seed K rule) {ours['ms']:.3f} ms / image (min {ours['min_ms']:.3f}, CPU {ours['cpu_ms']:.3f}): "
            f"{seed_row['ms'] / ours['ms']:.1f}x faster (median), {seed_row['min_ms'] / ours['min_ms']:.1f}x (min), "
            f"{seed_row['cpu_ms'] / ours['cpu_ms']:.1f}x (CPU time)"
        )
    if tower_ms:
        print(f"\nCLIP ViT-L/14-336 tower (random weights, batch {args.tower_batch}): {tower_ms:.1f} ms / image")

    profile_rows = []
    if args.profile:
        clock = time.thread_time if device.type == "cpu" else time.perf_counter
        capture = capture_for(1)
        totals = []

        def whole():
            synchronize(device)
            start = clock()
            ours_seed_rule(capture)
            synchronize(device)
            totals.append(clock() - start)

        with torch.no_grad(), stage_timers(device) as records:
            for _ in range(args.repeats):
                whole()
        forward_ms = statistics.median(totals) * 1e3
        what = "thread CPU time" if device.type == "cpu" else "synchronized wall time"
        print(f"\n### Where SparseZip's time goes (seed K rule; {what}, median per forward of the batch)\n")
        print("| stage | ms / batch | % of the forward |")
        print("|---|---:|---:|")
        for label, values in records.items():
            ms = statistics.median(values) * 1e3
            profile_rows.append({"stage": label, "ms_per_batch": ms})
            print(f"| {label} | {ms:.3f} | {100 * ms / forward_ms:.1f} |")
        print(f"| whole forward | {forward_ms:.3f} | 100 |")
        print("\n(the contextual plan's total includes merge weights, k-means++, Lloyd, agglomeration and the "
              "final assignment; the timers add a little overhead of their own)")

    if args.json:
        keys = ("ms", "min_ms", "cpu_ms", "peak_mb", "tokens", "k", "kind")
        payload = {
            "device": where, "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "rows": {name: {key: row[key] for key in keys} for name, row in rows.items()},
            "tower_ms_per_image": tower_ms, "profile": profile_rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
