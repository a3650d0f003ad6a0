"""Speed and memory of the compressor at LLaVA-1.5 shapes, against the CLIP tower it follows.

    python bench/compressor.py                      # B = 8, 10 repeats, 1 thread, markdown table
    python bench/compressor.py --batch 8 --repeats 20 --threads 2 --tower-batch 2 --keep-freed-memory

Inputs are random captures with LLaVA-1.5's shapes (L = 577, C = 1024, 16 heads of 64 dims,
scoring layer -2 only unless a row says otherwise); the CLS query of each image is pulled towards
a few "hot" patches with a strength that varies over the batch, so that the CLS attention is
peaked like a real CLIP layer's and dynamic K varies from image to image.

Threads: one by default. On a small shared machine, intra-op parallelism is fragile: when another
process holds one of the two cores, every parallel kernel waits at its barrier for the descheduled
thread, and an elementwise op can become ten times slower than on one thread. ``--threads 0``
keeps torch's own choice.

Time: per image, the median (and the minimum) over ``--repeats`` timed forwards after
``--warmup`` untimed ones, in eval mode under ``torch.no_grad()``. On a shared machine the
minimum is the least disturbed figure. Peak memory: the profiler (``profile_memory=True``)
records every tensor allocation and free of one forward; the table shows the highest total of
live tensor bytes allocated by the forward (inputs excluded). Temporaries that are allocated
and freed inside a single ATen kernel do not appear, so read it as a close lower bound.

``--keep-freed-memory`` asks glibc (``mallopt``) to keep freed memory in the process instead of
returning every large block to the OS, as jemalloc/tcmalloc or a GPU caching allocator do. With
the default, a forward whose temporaries are large page-faults them back in every time (on a
small virtual machine that can cost as much as the arithmetic); the compressor keeps its
temporaries small (the N x N similarity is reduced block by block), so both settings should now
give about the same figures.

The tower row is one forward of a random-weight CLIP ViT-L/14-336 (``transformers``,
24 layers) stopped nowhere, at ``--tower-batch`` images; SparseZip's cost is reported as a
percentage of it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsezip_pl.compress import MergingConfig, SparseZipCompressor, SparseZipConfig  # noqa: E402
from sparsezip_pl.compress.testing import random_capture  # noqa: E402

NUM_PATCHES, WIDTH, HEADS, HEAD_DIM = 576, 1024, 16, 64


def methods() -> dict[str, SparseZipConfig]:
    return {
        "none (576 patches)": SparseZipConfig(method="none"),
        # ``dominant`` counts CLS, as VisionZip does: 54 + 10 = 64 tokens.
        "visionzip 54+10": SparseZipConfig(method="visionzip", dominant=54, merging=MergingConfig(contextual_num=10)),
        "sparsezip (default)": SparseZipConfig(),
        "sparsezip fixed 54+16": SparseZipConfig(dynamic_k=False, dominant=54),
        "sparsezip attention-only": SparseZipConfig(hybrid_scoring=False),
        "sparsezip non-hierarchical": SparseZipConfig(merging=MergingConfig(hierarchical=False)),
        "sparsezip 3 layers": SparseZipConfig(layers=[-2, -6, -12]),
    }


def peak_tensor_bytes(fn) -> int:
    """Highest total of live tensor bytes allocated while ``fn`` runs (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def time_it(fn, repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) seconds of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def tower_ms_per_image(batch: int, repeats: int) -> float:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    tower = CLIPVisionModel(config).eval()
    pixels = torch.randn(batch, 3, 336, 336)
    with torch.no_grad():
        median, _ = time_it(lambda: tower(pixel_values=pixels), repeats=repeats, warmup=1)
    return median * 1e3 / batch


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's choice")
    parser.add_argument("--tower-batch", type=int, default=1)
    parser.add_argument("--tower-repeats", type=int, default=2)
    parser.add_argument("--no-tower", action="store_true", help="skip the CLIP tower forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time the default under torch.compile (inductor)")
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc mallopt: keep freed memory (see above)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "glibc default"
    if args.keep_freed_memory:
        allocator = "glibc, freed memory kept (mallopt)" if keep_freed_memory() else "glibc default (mallopt failed)"

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, allocator: {allocator}")
    print(
        f"batch {args.batch}, L = {NUM_PATCHES + 1}, C = {WIDTH}, {HEADS} heads x {HEAD_DIM}; "
        f"median and min of {args.repeats} forwards after {args.warmup} warm-up\n"
    )

    peaks = torch.linspace(10.0, 30.0, args.batch).tolist()
    captures = {
        layers: random_capture(
            args.batch, NUM_PATCHES, WIDTH, HEADS, HEAD_DIM, num_layers=layers, peak=peaks, num_hot=8, seed=args.seed
        )
        for layers in (1, 3)
    }

    variants = [(name, config, False) for name, config in methods().items()]
    if args.compile:
        variants.append(("sparsezip (default, torch.compile)", SparseZipConfig(), True))
    rows = []
    for name, config, compiled in variants:
        comp = SparseZipCompressor(config, HEADS, HEAD_DIM, check_inputs=False).eval()
        if compiled:
            started = time.perf_counter()
            comp = torch.compile(comp)
            with torch.no_grad():
                comp(captures[1])
            print(f"torch.compile (inductor) of the default: {time.perf_counter() - started:.0f} s to compile")
        capture = captures[len(config.layers)]
        with torch.no_grad():
            out = comp(capture)
            median, fastest = time_it(lambda: comp(capture), args.repeats, args.warmup)
            peak = peak_tensor_bytes(lambda: comp(capture))
        k = out.num_dominant.float()
        rows.append(
            {
                "name": name,
                "ms": median * 1e3 / args.batch,
                "min_ms": fastest * 1e3 / args.batch,
                "peak_mb": peak / 2**20,
                "tokens": out.num_tokens.float().mean().item(),
                "k": f"{int(k.min())} / {k.mean().item():.1f} / {int(k.max())}",
            }
        )

    tower_ms = None if args.no_tower else tower_ms_per_image(args.tower_batch, args.tower_repeats)

    header = ["method", "ms / image (median)", "ms / image (min)", "peak MiB (batch)", "tokens / image"]
    header += ["K min / mean / max", "% of CLIP tower"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        share = f"{100 * row['ms'] / tower_ms:.2f}" if tower_ms else "-"
        cells = [row["name"], f"{row['ms']:.3f}", f"{row['min_ms']:.3f}", f"{row['peak_mb']:.1f}"]
        cells += [f"{row['tokens']:.1f}", row["k"], share]
        print("| " + " | ".join(cells) + " |")
    if tower_ms:
        print(f"| CLIP ViT-L/14-336 tower (random weights, batch {args.tower_batch}) | {tower_ms:.1f} | | | | | 100 |")
        default = next(r for r in rows if r["name"] == "sparsezip (default)")
        print(
            f"\ndefault SparseZip: {default['ms']:.3f} ms / image = "
            f"{100 * default['ms'] / tower_ms:.2f}% of the tower's {tower_ms:.1f} ms / image"
        )


if __name__ == "__main__":
    main()
