"""End-to-end timing of the methods inside a scaled random-weight LLaVA (transformers family), and the
overhead of our splice / hook path over feeding the LLM the same number of tokens directly.

The vision tower has the real CLIP ViT-L/14-336 shape (24 layers, width 1024, 16 heads, 577
tokens); the LLM is LLaMA-style and scaled down (default: width 1024, 8 layers, vocabulary 32000,
about 0.16 B parameters) so that it runs on a small CPU machine (``bench/llava_shapes.py``).
Weights are random: timings are meaningful, the generated text is not.

    OMP_NUM_THREADS=1 python bench/e2e.py --repeats 5         # CPU; markdown on stdout
    python bench/e2e.py --device cuda --dtype bfloat16 --repeats 5

Sections:

1. Prefill and greedy decoding of one image per method (tower + compression, projector + splice,
   LLM prefill, generate), peak memory.
2. LLM prefill, ours against the bare LLM: for each method the prefill through our path (the
   splice of the compressed tokens into the prompt and the LLM under our hooks; once more with the
   projector of the visual tokens) and the bare LLM (the same model's forward on ready embeddings
   of the same sequence length: no splice, no hooks), timed round-robin. Ratio (a): splice + LLM
   over bare at the same token count, the overhead of our path (should be <= 1.05). Ratio (b):
   the prefill speed-up of each method against ``none`` (576 visual tokens) through our whole path,
   next to the bare LLM's speed-up between the same two sequence lengths (the bound: what
   shortening the sequence alone buys).
3. The same for a LLaVA-NeXT-shaped case: 5 views of 576 patches per image (2880 visual tokens;
   ``FiveViewLlava``: LLaVA-1.5 weights, no image_newline tokens; a vision-side budget is split
   over the views) against 320 and 160 visual tokens, prefill ratios side by side.
4. The vision tower's paths (capture to the feature layer, stock features, output_attentions).

Timings: the minimum over ``--repeats`` runs (least disturbed on a shared machine) and, for the
prefill sections, the median thread CPU time (on CPU with one thread: time this thread ran, not
inflated by other processes being scheduled). Peak memory: on CUDA ``max_memory_allocated``; on
CPU a thread samples the resident set size every 2 ms (peak minus the RSS before the call).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llava_shapes import build_llava, five_view, llava_spec, make_batch  # noqa: E402

from sparsezip_pl.compress import CompressorConfig, SparseZipOptions  # noqa: E402
from sparsezip_pl.models.capture import encode_with_capture  # noqa: E402
from sparsezip_pl.models.compressed import CompressedLlava  # noqa: E402
from sparsezip_pl.models.splice import splice_visual_tokens  # noqa: E402


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int, warmup: int):
    """(min seconds, max peak extra bytes, result of the fastest run) of ``fn()``."""
    for _ in range(warmup):
        fn()
    best, peaks, out = float("inf"), [], None
    for _ in range(repeats):
        memory: dict = {}
        with peak_memory(device, memory):
            sync(device)
            start = time.perf_counter()
            result = fn()
            sync(device)
            elapsed = time.perf_counter() - start
        peaks.append(memory["peak"])
        if elapsed < best:
            best, out = elapsed, result
    return best, max(peaks), out


def round_robin(fns: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """{name: (min wall s, median wall s, median thread CPU s)}, every function once per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            sync(device)
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {name: (min(wall[name]), statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def fmt_mb(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def method_config(name: str, budget: int | None) -> CompressorConfig:
    """``none``, ``visionzip``, ``sparsezip`` (dynamic K: at most the budget) or ``sparsezip-fixed``
    (exactly the budget) at ``budget`` visual tokens per row."""
    if name == "none":
        return CompressorConfig(method="none")
    if name == "sparsezip-fixed":
        return CompressorConfig(method="sparsezip", budget=budget, sparsezip=SparseZipOptions(dynamic_k=False))
    return CompressorConfig(method=name, budget=budget)


def prefill_fns(compressed: CompressedLlava, batch: dict, device: torch.device, dtype: torch.dtype):
    """Three prefills of one compressed batch, and the spliced inputs.

    ``path``: our whole path after the vision side, as ``CompressedLlava.forward`` runs it: the
    projector on the compressed tokens, the splice into the prompt, the LLM under our hooks.
    ``splice``: the same without the projector (the stock model projects its tokens too): the
    splice of already projected tokens and the LLM under our hooks. ``bare``: the same model's
    forward on ready embeddings of the same sequence length (no splice, no hooks).
    """
    backend = compressed.backend
    with torch.no_grad():
        text_embeds = backend.embed_tokens(batch["input_ids"])
        compression = compressed.compress(batch, None, text_embeds, batch.get("question_mask"))
        spliced = compressed.splice(batch, compression, text_embeds)
        tokens, mask, _, _ = backend.visual_inputs(compression, compressed._layout)
    has_image = batch.get("has_image")
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(batch["input_ids"]) if attention_mask is None else attention_mask
    gen = torch.Generator(device="cpu").manual_seed(0)
    length = spliced.inputs_embeds.shape[1]
    embeds = (torch.randn(1, length, spliced.inputs_embeds.shape[2], generator=gen) * 0.02).to(device=device, dtype=dtype)
    ones = torch.ones(1, length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).unsqueeze(0)

    def llm(inputs):
        with compressed._pruning(inputs, None):
            return backend.language_model(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)

    def path():
        with torch.no_grad():
            return llm(compressed.splice(batch, compression, text_embeds))

    def splice():
        with torch.no_grad():
            inputs = splice_visual_tokens(
                text_embeds, batch["input_ids"], attention_mask, backend.image_token_id, tokens, mask,
                has_image=None if has_image is None else has_image.to(device),
            )
            return llm(inputs)

    def bare():
        with torch.no_grad():
            return backend.model(inputs_embeds=embeds, attention_mask=ones, position_ids=positions, use_cache=False)

    return {"path": path, "splice": splice, "bare": bare}, spliced


def prefill_section(title: str, backend, rows: list[tuple[str, str, int | None]], args, device, dtype) -> list[dict]:
    """Sections 2 and 3: our path and the bare LLM per row, ratios (a) and (b)."""
    batch = make_batch(backend, 1)
    fns, info = {}, {}
    for label, name, budget in rows:
        compressed = CompressedLlava(backend, method_config(name, budget)).eval()
        row_fns, spliced = prefill_fns(compressed, batch, device, dtype)
        fns.update({(label, kind): fn for kind, fn in row_fns.items()})
        info[label] = {"visual": int(spliced.visual_mask.sum()), "sequence": int(spliced.attention_mask.sum())}
    times = round_robin(fns, device, args.prefill_repeats, 1)
    results = [{"label": label, **info[label], **{kind: times[(label, kind)] for kind in ("path", "splice", "bare")}}
               for label, _, _ in rows]
    base = results[0]
    print(f"\n## {title}\n")
    print(
        "| method | visual tokens | LLM sequence | bare LLM (s) | splice + LLM (s) | projector + splice + LLM (s) "
        "| (a) splice + LLM / bare | (a) with projector / bare | (b) speed-up vs stock: ours | (b) bound: bare LLM |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['label']} | {r['visual']} | {r['sequence']} | {r['bare'][0]:.4f} | {r['splice'][0]:.4f} | "
            f"{r['path'][0]:.4f} | {r['splice'][0] / r['bare'][0]:.3f} ({r['splice'][2] / r['bare'][2]:.3f}) | "
            f"{r['path'][0] / r['bare'][0]:.3f} ({r['path'][2] / r['bare'][2]:.3f}) | "
            f"{base['path'][0] / r['path'][0]:.2f}x ({base['path'][2] / r['path'][2]:.2f}x) | "
            f"{base['bare'][0] / r['bare'][0]:.2f}x ({base['bare'][2] / r['bare'][2]:.2f}x) |"
        )
    print(
        f"\nTimes: minimum over {args.prefill_repeats} round-robin rounds; in parentheses the same ratio of median "
        "thread CPU times. (a): our splice / hook path over the bare LLM at the same token count (with the "
        "projector: also the projection of the visual tokens, which the stock model runs too). (b): each row's "
        "prefill speed-up over the stock row through our path, next to the bare LLM's between the same lengths."
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement of section 1 and 4")
    parser.add_argument("--prefill-repeats", type=int, default=5, help="round-robin rounds of sections 2 and 3")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-intermediate", type=int, default=2816)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--methods", default="none,visionzip,sparsezip", help="section 1's methods")
    parser.add_argument("--sections", default="1,2,3,4", help="which sections to run")
    args = parser.parse_args()
    sections = {int(s) for s in args.sections.split(",")}

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    started = time.perf_counter()
    spec = dataclasses.replace(
        llava_spec("small"), text_hidden_size=args.llm_hidden, text_intermediate_size=args.llm_intermediate,
        text_layers=args.llm_layers, text_heads=args.llm_hidden // 64, text_kv_heads=args.llm_hidden // 64,
    )
    backend = build_llava(spec, device, dtype)
    model = backend.model
    vision_params = sum(p.numel() for p in backend.vision_tower.parameters())
    llm_params = sum(p.numel() for p in model.parameters()) - vision_params
    print(
        f"# End-to-end bench\n\ndevice {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, "
        f"batch 1; tower {vision_params / 1e6:.0f} M params (CLIP ViT-L/14-336 shape), LLM + projector "
        f"{llm_params / 1e6:.0f} M params; built in {time.perf_counter() - started:.0f} s"
    )
    batch = make_batch(backend, 1)

    if 1 in sections:
        labels = {"none": "none (576)", "visionzip": "visionzip @ 64", "sparsezip": "sparsezip @ 64 (default, dynamic K)"}
        rows = []
        for name in args.methods.split(","):
            compressed = CompressedLlava(backend, method_config(name, None if name == "none" else 64)).eval()

            def prefill(compressed=compressed):
                """One prefill, timed by phase: tower + compression, projector + splice, LLM."""
                with torch.no_grad():
                    start = time.perf_counter()
                    compression = compressed.compress(batch["pixel_values"], text_embeds=None)
                    sync(device)
                    vision = time.perf_counter()
                    spliced = compressed.splice(batch, compression)
                    sync(device)
                    splice = time.perf_counter()
                    backend.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids)
                    sync(device)
                    end = time.perf_counter()
                return {"vision": vision - start, "splice": splice - vision, "llm": end - splice}, compression, spliced

            def decode(compressed=compressed):
                return compressed.generate(batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

            t_prefill, m_prefill, (phases, compression, spliced) = measure(prefill, device, args.repeats, args.warmup)
            t_decode, m_decode, (generated, _) = measure(decode, device, args.repeats, args.warmup)
            assert generated.shape[1] == args.new_tokens
            rows.append({
                "method": labels.get(name, name), "tokens": int(compression.num_tokens[0]),
                "sequence": int(spliced.attention_mask.sum()), **phases, "prefill": t_prefill, "decode": t_decode,
                "peak_prefill": m_prefill, "peak_decode": m_decode,
            })
            del compressed

        base = next((r for r in rows if r["method"].startswith("none")), rows[0])
        print("\n## 1. Prefill and greedy decoding (one 336 px image)\n")
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
                f"{r['llm']:.3f} | {r['prefill']:.3f} | {base['prefill'] / r['prefill']:.2f}x | {r['decode']:.3f} | "
                f"{base['decode'] / r['decode']:.2f}x | {fmt_mb(r['peak_prefill'])} | {fmt_mb(r['peak_decode'])} |"
            )

    if 2 in sections:
        results = prefill_section(
            "2. LLM prefill: our splice / hook path against the bare LLM (LLaVA-1.5 shape, 576 stock tokens)",
            backend,
            [("none (576)", "none", None), ("visionzip @ 64", "visionzip", 64),
             ("sparsezip fixed @ 64", "sparsezip-fixed", 64), ("sparsezip @ 64 (dynamic K)", "sparsezip", 64)],
            args, device, dtype,
        )
        worst = max(r["splice"][0] / r["bare"][0] for r in results)
        worst_cpu = max(r["splice"][2] / r["bare"][2] for r in results)
        fixed = next(r for r in results if r["label"] == "sparsezip fixed @ 64")
        base = results[0]
        print(
            f"\n(a) splice + LLM / bare LLM at the same token count: at most {worst:.3f} over the rows "
            f"(min times; {worst_cpu:.3f} in median CPU time)"
            f"\n(b) prefill speed-up at 64 tokens against 576: ours {base['path'][0] / fixed['path'][0]:.2f}x, "
            f"bare-LLM bound {base['bare'][0] / fixed['bare'][0]:.2f}x (min times; median CPU time: ours "
            f"{base['path'][2] / fixed['path'][2]:.2f}x, bound {base['bare'][2] / fixed['bare'][2]:.2f}x)"
        )

    if 3 in sections:
        next_backend = five_view(backend)
        prefill_section(
            "3. LLaVA-NeXT shape (5 views, 2880 stock visual tokens): prefill ratios side by side",
            next_backend,
            [("none (2880)", "none", None), ("visionzip @ 320", "visionzip", 64), ("sparsezip fixed @ 320", "sparsezip-fixed", 64),
             ("visionzip @ 160", "visionzip", 32), ("sparsezip fixed @ 160", "sparsezip-fixed", 32)],
            args, device, dtype,
        )
        print("\n(vision-side budgets per view: 320 = 5 x 64, 160 = 5 x 32)")

    if 4 in sections:
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
        print("\n## 4. Vision tower paths (one image)\n")
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
