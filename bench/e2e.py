"""End-to-end timing of SparseZip inside a scaled random-weight LLaVA (transformers family).

The vision tower has the real CLIP ViT-L/14-336 shape (24 layers, width 1024, 16 heads, 577
tokens); the LLM is LLaMA-style and scaled down (default: width 1024, 8 layers, vocabulary 32000,
about 0.16 B parameters) so that it runs on a small CPU machine. Weights are random: timings are
meaningful, the generated text is not.

    python bench/e2e.py                 # CPU, batch 1, 2 repeats, markdown tables on stdout
    python bench/e2e.py --device cuda --dtype bfloat16 --repeats 5

Timings are the minimum over ``--repeats`` runs (after one warm-up run with ``--warmup 1``):
the minimum is the least disturbed by other processes on a shared machine. Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` over each measured call; on CPU, a thread samples the process's
resident set size (VmRSS in /proc/self/status) every 2 ms and the table shows the peak minus the
RSS before the call, i.e. the extra memory that call needed (allocator caching can hide reuse, so
read it as an estimate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsezip_pl.compress import MergingConfig, SparseZipConfig  # noqa: E402
from sparsezip_pl.models.loading import freeze  # noqa: E402
from sparsezip_pl.models.capture import encode_with_capture  # noqa: E402
from sparsezip_pl.models.compressed import CompressedLlava  # noqa: E402
from sparsezip_pl.models.families.llava_hf import HFLlavaBackend  # noqa: E402
from sparsezip_pl.models.tiny import TOKENIZER_CORPUS, TinyLlavaSpec, synthetic_samples, tiny_hf_llava  # noqa: E402
from sparsezip_pl.models.tokenizer import build_llama_tokenizer  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_memory(device: torch.device, result: dict):
    """Extra peak memory (bytes) used inside the block, stored in ``result['peak']``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - start
        return
    start = _rss_bytes()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(peak[0], _rss_bytes()) - start


def measure(fn, device: torch.device, repeats: int, warmup: int):
    """(min seconds, max peak extra bytes, result of the fastest run) of ``fn()``."""
    for _ in range(warmup):
        fn()
    best, peaks, out = float("inf"), [], None
    for _ in range(repeats):
        memory: dict = {}
        with peak_memory(device, memory):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
        peaks.append(memory["peak"])
        if elapsed < best:
            best, out = elapsed, result
    return best, max(peaks), out


def build_model(args, device: torch.device, dtype: torch.dtype):
    spec = TinyLlavaSpec(
        image_size=336,
        patch_size=14,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_layers=24,
        vision_heads=16,
        text_hidden_size=args.llm_hidden,
        text_intermediate_size=args.llm_intermediate,
        text_layers=args.llm_layers,
        text_heads=args.llm_hidden // 64,
        text_kv_heads=args.llm_hidden // 64,
        vocab_size=32000,
        initializer_range=0.02,
        vision_initializer_factor=1.0,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_llama_tokenizer(TOKENIZER_CORPUS * 8, folder, add_bos_token=True)
    model, processor = tiny_hf_llava(spec, tokenizer)
    model = freeze(model.to(device=device, dtype=dtype))
    return HFLlavaBackend(model, processor=processor)


def fmt_mb(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-intermediate", type=int, default=2816)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--methods", default="none,visionzip,sparsezip")
    parser.add_argument("--skip-tower", action="store_true", help="skip the tower comparison")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    started = time.perf_counter()
    backend = build_model(args, device, dtype)
    model = backend.model
    vision_params = sum(p.numel() for p in backend.vision_tower.parameters())
    llm_params = sum(p.numel() for p in model.parameters()) - vision_params
    print(
        f"# SparseZip end-to-end bench\n\ndevice {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, "
        f"batch 1, min of {args.repeats} runs (warm-up {args.warmup}); tower {vision_params / 1e6:.0f} M params "
        f"(CLIP ViT-L/14-336 shape), LLM + projector {llm_params / 1e6:.0f} M params; built in "
        f"{time.perf_counter() - started:.0f} s\n"
    )

    sample = synthetic_samples(1, seed=0)[0]
    batch = backend.batch_builder("generate")([sample])
    configs = {
        "none": SparseZipConfig(method="none"),
        "visionzip": SparseZipConfig(method="visionzip", dominant=54, merging=MergingConfig(contextual_num=10)),
        "sparsezip": SparseZipConfig(),
    }
    labels = {"none": "none (576)", "visionzip": "visionzip 54+10", "sparsezip": "sparsezip (default)"}

    rows = []
    for name in args.methods.split(","):
        compressed = CompressedLlava(backend, configs[name]).eval()

        def prefill(compressed=compressed):
            """One prefill, timed by phase: tower + compression, projector + splice, LLM."""
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            with torch.no_grad():
                start = time.perf_counter()
                compression = compressed.compress(batch["pixel_values"], text_embeds=None)
                sync()
                vision = time.perf_counter()
                spliced = compressed.splice(batch, compression)
                sync()
                splice = time.perf_counter()
                backend.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids)
                sync()
                end = time.perf_counter()
            return {"vision": vision - start, "splice": splice - vision, "llm": end - splice}, compression, spliced

        def decode(compressed=compressed):
            return compressed.generate(batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

        t_prefill, m_prefill, (phases, compression, spliced) = measure(prefill, device, args.repeats, args.warmup)
        t_decode, m_decode, (generated, _) = measure(decode, device, args.repeats, args.warmup)
        assert generated.shape[1] == args.new_tokens
        rows.append(
            {
                "method": labels[name],
                "tokens": int(compression.num_tokens[0]),
                "sequence": int(spliced.attention_mask.sum()),
                **phases,
                "prefill": t_prefill,
                "decode": t_decode,
                "peak_prefill": m_prefill,
                "peak_decode": m_decode,
            }
        )
        del compressed

    base = next((r for r in rows if r["method"].startswith("none")), rows[0])
    print("## Prefill and greedy decoding (one 336 px image)\n")
    print(
        "| method | visual tokens | LLM sequence | tower + compression (s) | projector + splice (s) "
        "| LLM prefill (s) | full prefill (s) "
        f"| prefill speed-up | generate {args.new_tokens} tokens (s) | generate speed-up "
        "| peak extra memory prefill (MB) | peak extra memory generate (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['tokens']} | {r['sequence']} | {r['vision']:.3f} | {r['splice']:.3f} | "
            f"{r['llm']:.3f} | "
            f"{r['prefill']:.3f} | {base['prefill'] / r['prefill']:.2f}x | {r['decode']:.3f} | "
            f"{base['decode'] / r['decode']:.2f}x | {fmt_mb(r['peak_prefill'])} | {fmt_mb(r['peak_decode'])} |"
        )

    if not args.skip_tower:
        tower = backend.vision_tower
        pixel_values = batch["pixel_values"].to(device=device, dtype=dtype)

        def capture():
            with torch.no_grad():
                return encode_with_capture(tower, pixel_values, backend.feature_layer, [backend.feature_layer])

        def stock():
            with torch.no_grad():
                return model.get_image_features(pixel_values=pixel_values)

        def eager_attentions():
            with torch.no_grad():
                return tower(pixel_values, output_attentions=True, output_hidden_states=True)

        t_capture, m_capture, _ = measure(capture, device, args.repeats, args.warmup)
        t_stock, m_stock, _ = measure(stock, device, args.repeats, args.warmup)
        implementation = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            t_eager, m_eager, _ = measure(eager_attentions, device, args.repeats, args.warmup)
        finally:
            tower.set_attn_implementation(implementation)
        print("\n## Vision tower paths (one image)\n")
        print("| path | layers run | time (s) | time / capture | peak extra memory (MB) |")
        print("|---|---:|---:|---:|---:|")
        layers = tower.config.num_hidden_layers
        keep = layers + 1 + backend.feature_layer
        for label, run, t, m in (
            (f"capture to feature layer ({implementation}, q/k hooks)", keep, t_capture, m_capture),
            (f"stock get_image_features ({implementation}, + projector)", layers, t_stock, m_stock),
            ("output_attentions=True (eager)", layers, t_eager, m_eager),
        ):
            print(f"| {label} | {run} | {t:.3f} | {t / t_capture:.2f}x | {fmt_mb(m)} |")
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
