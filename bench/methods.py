"""Every registered method at several budgets, through the product's CLI, in one Markdown table.

    python bench/methods.py                                  # all methods, budgets 64 128 192
    python bench/methods.py --methods divprune cdpruner --budgets 64 --world-images 10

For each method the registry knows at run time (so methods added later appear too, LLM-side ones
included) and each budget, ``python -m sparsezip_pl test`` runs on the tiny synthetic-world LLaVA
(``checkpoints/tiny-llava-synth``, 576 patches) over a held-out world written by
:func:`sparsezip_pl.data.synthetic.generate_world`; ``none`` runs once, without a budget, as the
reference. Each run's ``results.json`` gives the visual tokens the LLM saw (``budget/tokens_mean``:
for an LLM-side method, the mean over decoder layers when the method records it), the MME-style
total (the four subtasks' scores, out of 800) and the POPE F1 averaged over the three splits.

Timings are measured here, in this process, on one batch of the world's MME questions
(``--timing-batch``), with ``--threads`` intra-op threads, the minimum over ``--repeats`` rounds
after a warm-up round (every row timed once per round, so load bursts spread over all rows):

* method: the method's own work on the inputs the CLI gives it. A vision-side method's
  ``forward`` on the capture ``CompressedLlava.compress`` built for the batch (recorded once and
  rerun; the projector calls of DivPrune / CDPruner included, the vision tower not), an LLM-side
  method's ``select`` calls during one prefill (the attention rows it ranks by included).
* prefill: the LLM's forward on the compressed prompt (``CompressedLlava.prepare_inputs`` outside
  the timer, then ``backend.language_model`` on its output, with an LLM-side method's pruning
  hooks installed, so its pruning counts there too).

The tiny model's scores and timings are informational: it is a 2-layer LLaMA on a 4-layer CLIP
trained on synthetic scenes, with no published targets; the comparison that matters runs the same
command on the 7B checkpoints (``--model-path``, ``--config``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsezip_pl.compress import get_method, method_names  # noqa: E402
from sparsezip_pl.data.synthetic import generate_world  # noqa: E402
from sparsezip_pl.demo.pipeline import results_row, world_args  # noqa: E402


#: Rows beside each registered method's defaults: SparseZip with a fixed K spends exactly the
#: budget, where its dynamic K (the default) spends at most that many tokens per image. The tiny
#: model's LLM has 2 layers, where FastV's K = 2 does not exist and no average over the layers
#: (the LLM-side budget) comes near 64-192 of 576; its row prunes after layer 1 and keeps the
#: budget's count there (``budget_mode: kept``). PyramidDrop has no such mode: its rows report why
#: they cannot run here.
VARIANTS = ("sparsezip:dynamic_k=false", "fastv:layer=1,budget_mode=kept")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``name`` or ``name:option=value,option=value`` (options of the method's own section)."""
    name, _, options = spec.partition(":")
    pairs = [item.split("=", 1) for item in options.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"method spec {spec!r}: options are option=value, comma separated")
    return name, dict(pairs)


def cli_command(spec: str, budget: int | None, world: dict, run_dir: Path, args) -> list[str]:
    """The ``python -m sparsezip_pl test`` command of one row."""
    method, options = parse_spec(spec)
    command = [sys.executable, "-m", "sparsezip_pl", "test", "--config", args.config, *world_args(world),
               f"--model.model_path={args.model_path}", f"--model.compressor.method={method}",
               "--trainer.logger=false", f"--trainer.default_root_dir={run_dir}",
               "--trainer.enable_progress_bar=false"]
    command += [f"--model.compressor.{method}.{key}={value}" for key, value in options.items()]
    if budget is not None:
        command.append(f"--model.compressor.budget={budget}")
    return command


def run_cli(command: list[str], run_dir: Path) -> dict:
    """Run one test command from the repository root; its results.json, or {'error': ...}. The
    output goes to ``<run_dir>.log`` beside the run folder (which must hold only the run's files)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_name(run_dir.name + ".log")
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {process.returncode}", "log": str(log)}
    return json.loads((run_dir / "results.json").read_text())


def timing_batch(backend, world: dict, size: int) -> dict:
    """The first ``size`` MME questions of the world as one generation batch."""
    from sparsezip_pl.data.datamodules import MMEDataModule

    data = MMEDataModule(world["mme_root"], batch_size=size)
    data.setup("test")
    samples = [data.dataset[i] for i in range(min(size, len(data.dataset)))]
    return backend.batch_builder("generate")(samples)


def timers(backend, spec: str, budget: int | None, batch: dict):
    """(method timer or None for ``none``, prefill timer) of one row: functions that run once and
    return the seconds they measured.

    A vision-side method's forward is recorded once, on the capture ``CompressedLlava`` builds
    for the batch, and the timer reruns that very call; an LLM-side method's timer runs a prefill
    and returns the time spent inside the method's ``select`` calls.
    """
    from sparsezip_pl.models.compressed import CompressedLlava

    method, options = parse_spec(spec)
    options = {key: yaml.safe_load(value) for key, value in options.items()}
    model = CompressedLlava(backend, {"method": method, "budget": budget, **({method: options} if options else {})}).eval()
    module = model.compressor
    name = "select" if model.llm_side else "forward"
    inner = getattr(module, name)
    calls, spent = [], [0.0]

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(module, name, recorded)
    with torch.no_grad():
        spliced, _ = model.prepare_inputs(batch)

    def run_prefill() -> None:
        with torch.no_grad(), model._pruning(spliced, None):
            backend.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids)

    def prefill() -> float:
        start = time.perf_counter()
        run_prefill()
        return time.perf_counter() - start

    def llm_method() -> float:
        spent[0] = 0.0
        run_prefill()
        return spent[0]

    def vision_method() -> float:
        args, kwargs = calls[0]
        start = time.perf_counter()
        with torch.no_grad():
            inner(*args, **kwargs)
        return time.perf_counter() - start

    if method == "none":
        return None, prefill
    return (llm_method if model.llm_side else vision_method), prefill


def measure(backend, rows: list[dict], batch: dict, repeats: int) -> None:
    """Set each row's ``method_ms`` (per image; None for ``none``) and ``prefill_ms`` (per sample):
    the minimum over ``repeats`` rounds after a warm-up, the rows interleaved in every round so
    that a burst of load on a shared machine does not land on one row's measurements only."""
    size = batch["input_ids"].shape[0]
    timed = []
    for row in rows:
        try:
            method_timer, prefill_timer = timers(backend, row["method"], row["budget"], batch)
        except Exception as error:  # a row that cannot be timed is reported, not dropped
            row["error"] = f"timing: {type(error).__name__}: {error}"
            continue
        timed.append((row, method_timer, prefill_timer, [float("inf"), float("inf")]))
    for round_ in range(repeats + 1):  # round 0 warms up
        for row, method_timer, prefill_timer, best in timed:
            seconds = (None if method_timer is None else method_timer(), prefill_timer())
            if round_:
                best[:] = [b if s is None else min(b, s) for b, s in zip(best, seconds)]
    for row, method_timer, _, best in timed:
        row["method_ms"] = None if method_timer is None else 1000 * best[0] / size
        row["prefill_ms"] = 1000 * best[1] / size


def format_table(rows: list[dict]) -> str:
    reference = next((r for r in rows if r["method"] == "none" and "error" not in r), None)
    header = ("| method | side | budget | visual tokens the LLM saw | MME-style total (/800) | % of none "
              "| POPE F1 | % of none | method ms / image | prefill ms / sample |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def share(value: float, key: str) -> str:
        return f"{100 * value / reference[key]:.1f}%" if reference and reference[key] else "n/a"

    for row in rows:
        budget = "all" if row["budget"] is None else str(row["budget"])
        if "error" in row:
            error = row["error"]
            if "BudgetOutOfReach: " in error:  # not a failure: the budget cannot exist on this model
                error = "out of reach: " + error.split("BudgetOutOfReach: ", 1)[1]
            else:
                error = "failed: " + error
            lines.append(f"| {row['method']} | {row['side']} | {budget} | {error[:200]} |" + " |" * 6)
            continue
        method_ms = "-" if row["method_ms"] is None else f"{row['method_ms']:.2f}"
        lines.append(
            f"| {row['method']} | {row['side']} | {budget} | {row['tokens']:.1f} | {row['mme/total']:.1f} "
            f"| {share(row['mme/total'], 'mme/total')} | {row['pope/f1']:.1f} | {share(row['pope/f1'], 'pope/f1')} "
            f"| {method_ms} | {row['prefill_ms']:.2f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible (shared with other jobs), torch {torch.__version__} on CPU, "
            f"timed with {torch.get_num_threads()} thread(s), Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to compare, NAME or NAME:option=value,... (default: every registered method and "
                             "sparsezip:dynamic_k=false); none is always added")
    parser.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 192], help="visual tokens per image")
    parser.add_argument("--world-images", type=int, default=3,
                        help="images per MME subtask (2 questions each) and per POPE split")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out world (the demo's)")
    parser.add_argument("--model-path", default="checkpoints/tiny-llava-synth")
    parser.add_argument("--config", default="configs/demo/eval.yaml", help="the test config the runs start from")
    parser.add_argument("--runs", default="runs/methods", help="folder of the runs and the world")
    parser.add_argument("--out", default="docs/methods_comparison.md", help="where the table is written")
    parser.add_argument("--timing-batch", type=int, default=8, help="questions in the timing batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the minimum is reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads while timing (1: a shared machine's descheduled threads stall "
                             "multi-threaded kernels)")
    args = parser.parse_args(argv)
    command = "python bench/methods.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))

    names = args.methods or [*method_names(), *VARIANTS]
    for name in names:
        get_method(parse_spec(name)[0])  # an unknown name lists the known ones
    names = ["none"] + [n for n in names if n != "none"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = (REPO / args.runs / stamp).resolve()
    world = generate_world(runs / "world", seed=args.seed, n_mme_images=args.world_images,
                           n_pope_images=args.world_images, n_instruct=0)

    rows = []
    for name in names:
        for budget in [None] if name == "none" else args.budgets:
            label = f"{name}-{'all' if budget is None else budget}"
            cli = cli_command(name, budget, world, runs / label, args)
            print("$ " + " ".join(shlex.quote(c) for c in cli[1:]), flush=True)
            started = time.monotonic()
            results = run_cli(cli, runs / label)
            row = {"method": name, "side": get_method(parse_spec(name)[0]).side, "budget": budget}
            if "error" in results:
                row.update(results)
                print(f"  failed: {results['error']} (log: {results['log']})")
            else:
                row.update(results_row(name, results))
                row["method"] = name
                print(f"  {time.monotonic() - started:.0f} s: {row['tokens']:.1f} tokens, MME {row['mme/total']:.1f}, "
                      f"POPE F1 {row['pope/f1']:.1f}", flush=True)
            rows.append(row)

    from sparsezip_pl.models.families import load_family

    backend = load_family("hf", REPO / args.model_path, dtype="float32")
    batch = timing_batch(backend, world, args.timing_batch)
    torch.set_num_threads(args.threads)
    measure(backend, [row for row in rows if "error" not in row], batch, args.repeats)

    table = format_table(rows)
    report = (
        "# Methods compared on the tiny synthetic-world LLaVA\n\n"
        f"Written by `{command}` on {datetime.date.today().isoformat()} (runs in `{args.runs}/{stamp}`).\n\n"
        f"Machine: {machine()}.\n\n"
        f"Model `{args.model_path}` (576 patches per image), held-out synthetic world seed {args.seed}: "
        f"{args.world_images} images per MME-style subtask (2 questions each, 4 subtasks) and {args.world_images} "
        f"images per POPE split. Each row is one `python -m sparsezip_pl test --config {args.config} "
        "--model.compressor.method M --model.compressor.budget B` run (its `results.json`); `none` is the stock model. "
        f"Methods run with their default options at each budget; a method whose token count stays below its "
        "budget treats the budget as a ceiling (SparseZip's dynamic K). "
        f"Timings (`bench/methods.py` docstring): the minimum of {args.repeats} interleaved rounds on a batch of "
        f"{batch['input_ids'].shape[0]} MME-style questions; *method*: the method's own call (a vision-side "
        "method's forward on the captured inputs, an LLM-side method's selection calls during prefill), per "
        "image; *prefill*: the LLM forward on the compressed prompt (an LLM-side method's pruning included), per "
        "sample.\n\n"
        "**These figures are informational**: the tiny model (a 2-layer LLaMA on a 4-layer CLIP, trained on "
        "synthetic scenes) has no targets, so few questions and its training distribution decide the scores, and "
        "the CPU timings of a model this small are dominated by fixed costs. Run the same command with a 7B "
        "checkpoint (`--model-path`, `--config`) for figures to compare with the papers. Its LLM has 2 layers: "
        "FastV's default K = 2 does not exist there and no LLM-side average over the layers comes near these "
        "budgets (those rows say why); the `fastv:layer=1,budget_mode=kept` row prunes after layer 1 and keeps "
        "the budget's count there. SparseZip's default dynamic K treats the budget as a ceiling (its `dynk.scale` "
        "is not calibrated to it: `python -m sparsezip_pl.calibrate`); `sparsezip:dynamic_k=false` spends "
        "exactly the budget.\n\n"
        + table + "\n"
    )
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    (runs / "rows.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n" + report)
    return rows


if __name__ == "__main__":
    main()
