"""The embedded demo: tune SparseZip on the tiny synthetic-world LLaVA, then compare methods.

    python -m sparsezip_pl.demo.pipeline            # what `make demo` runs
    python -m sparsezip_pl.demo.pipeline --quick    # a short version (CI)

Steps, each an ordinary CLI command printed before it runs, so any of them can be rerun by hand:

1. write a held-out synthetic world (MME / POPE / instruction files in their official layouts);
2. ``test`` the stock model (``none``);
3. for each way of placing the kept tokens in the LLM's sequence (``--positions``: one after
   another, the published methods' way, and/or at their original positions):
   ``test`` ``visionzip`` at 64 tokens and SparseZip's default; ``fit`` SparseZip's trainable
   parts (alphas, layer gates, text projection and gate, budget offset) by distillation from the
   same model fed all 576 tokens, with a budget penalty at 64 tokens, validating every 100 steps
   on a development world of another seed and keeping the compressor with the best MME-style
   total there; ``test`` that checkpoint;
4. print one table from the runs' ``results.json`` files and save it as ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sparsezip_pl.data.synthetic import generate_world

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "demo"
MME_SUBTASKS = ("existence", "count", "color", "position")
POPE_SPLITS = ("random", "popular", "adversarial")

# (label, CLI arguments that pick the method)
STOCK = ("none (all 576)", ["--config", "configs/methods/none.yaml"])
COMPRESSED = (
    ("visionzip 54+10", ["--config", "configs/methods/visionzip.yaml"]),
    ("sparsezip default", ["--config", "configs/demo/sparsezip.yaml"]),
)
TUNED = ("sparsezip tuned", ["--config", "configs/demo/sparsezip.yaml", "--config", "configs/demo/tuned.yaml"])
# (label suffix, CLI arguments layered on every compressed method's fit and test)
POSITIONS = {
    "contiguous": ("", []),
    "original": (", original positions", ["--config", "configs/demo/original_positions.yaml"]),
}


def run(args: list[str], log: Path) -> None:
    """Run one ``python -m sparsezip_pl`` command from the repository root, teeing its output."""
    command = [sys.executable, "-m", "sparsezip_pl", *args]
    print("\n$ " + " ".join(shlex.quote(a) for a in command[1:]), flush=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        sys.stdout.write(log.read_text(encoding="utf-8")[-6000:])
        raise SystemExit(f"command failed with exit code {process.returncode}; full log: {log}")
    print(f"  done in {time.monotonic() - started:.0f} s (log: {log.relative_to(REPO) if log.is_relative_to(REPO) else log})")


def world_args(world: dict) -> list[str]:
    return [
        f"--data.init_args.mme_root={world['mme_root']}",
        f"--data.init_args.pope_source={world['pope_root']}",
        f"--data.init_args.pope_image_dir={world['pope_image_folder']}",
    ]


def dev_args(world: dict) -> list[str]:
    """The fit's validation data: the development world's MME and POPE files."""
    prefix = "--data.init_args.val_benchmark.init_args"
    return [
        "--data.init_args.val_benchmark=sparsezip_pl.lit.datamodules.EvalDataModule",
        f"{prefix}.mme_root={world['mme_root']}",
        f"{prefix}.pope_source={world['pope_root']}",
        f"{prefix}.pope_image_dir={world['pope_image_folder']}",
        f"{prefix}.batch_size=16",
    ]


def logger_args(out: Path, version: str) -> list[str]:
    return [f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.name=demo",
            f"--trainer.logger.init_args.version={version}"]


def fit_budget_args(steps: int, minutes: float | None = None, quick: bool = False) -> list[str]:
    """Trainer overrides that end a tuning run: a step count, plus a wall-clock cap only if asked
    (a cap makes the kept checkpoint, and so the tuned rows, depend on the machine's speed)."""
    if quick:
        return ["--trainer.max_steps=2", "--trainer.max_time=null", "--trainer.val_check_interval=1"]
    budget = [f"--trainer.max_steps={steps}"]
    if minutes is not None:
        seconds = round(minutes * 60)
        budget.append(f"--trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}")
    return budget


def results_row(label: str, results: dict) -> dict:
    row = {"method": label, "tokens": results.get("budget/tokens_mean", float("nan"))}
    for subtask in MME_SUBTASKS:
        row[f"mme/{subtask}"] = results.get(f"test/mme/{subtask}/score", float("nan"))
    row["mme/total"] = sum(row[f"mme/{s}"] for s in MME_SUBTASKS)
    for split in POPE_SPLITS:
        row[f"pope/{split}/acc"] = results.get(f"test/pope/{split}/accuracy", float("nan"))
        row[f"pope/{split}/f1"] = results.get(f"test/pope/{split}/f1", float("nan"))
    row["pope/f1"] = results.get("test/pope/avg/f1", float("nan"))
    return row


def mme_answers(run_dir: Path) -> dict[str, bool]:
    """Sample id -> whether a test run answered that MME-style question right (its predictions file)."""
    records = (json.loads(line) for line in (run_dir / "predictions" / "predictions.jsonl").open(encoding="utf-8"))
    return {r["sample_id"]: r["parsed"] == r["answer"] for r in records if r["task"] == "mme"}


def answer_changes(before: dict[str, bool], after: dict[str, bool]) -> tuple[int, int]:
    """(questions ``after`` answers right and ``before`` did not, the reverse), over the same questions."""
    if before.keys() != after.keys():
        raise ValueError("the two runs answered different MME-style questions")
    gained = sum(after[k] and not before[k] for k in before)
    lost = sum(before[k] and not after[k] for k in before)
    return gained, lost


def format_table(rows: list[dict]) -> str:
    full = rows[0]
    header = (
        "| method | visual tokens / image | "
        + " | ".join(f"MME {s}" for s in MME_SUBTASKS)
        + " | MME total (/800) | "
        + " | ".join(f"POPE {s} acc / F1" for s in POPE_SPLITS)
        + " | POPE F1 avg | MME total vs all tokens | POPE F1 vs all tokens |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [row["method"], f"{row['tokens']:.1f}"]
        cells += [f"{row[f'mme/{s}']:.1f}" for s in MME_SUBTASKS]
        cells.append(f"{row['mme/total']:.1f}")
        cells += [f"{row[f'pope/{s}/acc']:.1f} / {row[f'pope/{s}/f1']:.1f}" for s in POPE_SPLITS]
        cells.append(f"{row['pope/f1']:.1f}")
        cells.append(f"{100 * row['mme/total'] / full['mme/total']:.1f}%" if full["mme/total"] else "n/a")
        cells.append(f"{100 * row['pope/f1'] / full['pope/f1']:.1f}%" if full["pope/f1"] else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the demo's runs and RESULTS.md")
    parser.add_argument("--world", default="data/generated/demo-world", help="where the held-out world is written")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out world (the model trained on others)")
    parser.add_argument("--mme-images", type=int, default=40, help="images per MME subtask (2 questions each)")
    parser.add_argument("--pope-images", type=int, default=40, help="images probed by each POPE split")
    parser.add_argument("--instruct", type=int, default=600, help="instruction records for tuning")
    parser.add_argument("--dev-world", default="data/generated/demo-dev-world",
                        help="where the development world (the fit's validation data) is written")
    parser.add_argument("--dev-seed", type=int, default=4321,
                        help="its seed (the world configs/demo/sparsezip.yaml's budget was calibrated on)")
    parser.add_argument("--dev-images", type=int, default=20, help="its images per MME subtask")
    parser.add_argument("--dev-pope-images", type=int, default=8, help="its images per POPE split")
    parser.add_argument("--fit-steps", type=int, default=400,
                        help="optimizer steps of each tuning run (about 4 minutes on a 2-core CPU); a step budget "
                             "keeps the tuned rows identical across machines")
    parser.add_argument("--fit-minutes", type=float, default=None,
                        help="also stop a tuning run after this many minutes (its rows then depend on the machine)")
    parser.add_argument("--model-path", default="checkpoints/tiny-llava-synth", help="the LLaVA to run (llava-hf layout)")
    parser.add_argument("--positions", nargs="+", choices=list(POSITIONS), default=list(POSITIONS),
                        help="how the kept tokens are placed in the LLM's sequence (one pass per choice)")
    parser.add_argument("--quick", action="store_true", help="a few samples and steps (the CI version)")
    args = parser.parse_args(argv)
    if args.quick:
        args.mme_images, args.pope_images, args.instruct, args.dev_images, args.dev_pope_images = 2, 2, 16, 1, 1

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    world_root, dev_root = (REPO / args.world).resolve(), (REPO / args.dev_world).resolve()
    if args.quick:
        world_root, dev_root = out / f"{stamp}-world", out / f"{stamp}-dev-world"
    if args.dev_seed == args.seed:
        raise SystemExit("--dev-seed must differ from --seed: the fit would be validated on the test world")
    world = generate_world(world_root, seed=args.seed, n_mme_images=args.mme_images,
                           n_pope_images=args.pope_images, n_instruct=args.instruct)
    print(f"held-out synthetic world (seed {args.seed}) in {world_root}")
    dev = generate_world(dev_root, seed=args.dev_seed, n_mme_images=args.dev_images,
                         n_pope_images=args.dev_pope_images, n_instruct=0)
    print(f"development world for the fit's validation (seed {args.dev_seed}) in {dev_root}")

    eval_base = ["--config", "configs/demo/eval.yaml", *world_args(world), f"--model.model_path={args.model_path}"]
    rows, run_dirs = [], {}

    def test(label: str, method_args: list[str]) -> None:
        version = f"{stamp}-{len(rows)}-test"
        run(["test", *eval_base, *method_args, *logger_args(out, version)], out / f"{version}.log")
        run_dirs[label] = out / "demo" / version
        rows.append(results_row(label, json.loads((run_dirs[label] / "results.json").read_text())))

    test(*STOCK)
    for positions in args.positions:
        suffix, position_args = POSITIONS[positions]
        for label, method_args in COMPRESSED:
            test(label + suffix, [*method_args, *position_args])
        tuned_label, tuned_args = TUNED
        fit_version = f"{stamp}-fit" + ("" if positions == "contiguous" else f"-{positions}")
        fit_args = [
            "fit", *eval_base[:2], *tuned_args, *position_args, "--config", "configs/demo/fit.yaml",
            f"--model.model_path={args.model_path}",
            f"--data.init_args.train_source={world['instruct_json']}", *dev_args(dev),
            *logger_args(out, fit_version),
        ]
        run(fit_args + fit_budget_args(args.fit_steps, args.fit_minutes, args.quick), out / f"{fit_version}.log")
        checkpoint = out / "demo" / fit_version / "checkpoints" / "best.ckpt"
        test(tuned_label + suffix, [*tuned_args, *position_args, f"--ckpt_path={checkpoint}"])

    changes = []
    for positions in args.positions:
        suffix = POSITIONS[positions][0]
        default = mme_answers(run_dirs[COMPRESSED[1][0] + suffix])
        gained, lost = answer_changes(default, mme_answers(run_dirs[TUNED[0] + suffix]))
        changes.append(f"- {TUNED[0] + suffix} against {COMPRESSED[1][0] + suffix}: {gained} MME-style answers "
                       f"gained, {lost} lost, of {len(default)} questions.")
    table = format_table(rows)
    report = (
        f"Demo run {stamp}: tiny synthetic-world LLaVA (`checkpoints/tiny-llava-synth`), held-out world seed "
        f"{args.seed}, {args.mme_images} images per MME subtask, {args.pope_images} POPE images per split, "
        f"tuning {2 if args.quick else args.fit_steps} steps per tuned row on {args.instruct} "
        f"instruction records, validated on world seed {args.dev_seed} ({args.dev_images} images per MME subtask, "
        f"{args.dev_pope_images} per POPE split).\n\n"
        + table + "\n\nPer question (the test runs' `predictions/predictions.jsonl`):\n\n" + "\n".join(changes) + "\n"
    )
    (out / "RESULTS.md").write_text(report, encoding="utf-8")
    (out / f"{stamp}-results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n" + report)
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {out}")
    return rows


if __name__ == "__main__":
    main()
