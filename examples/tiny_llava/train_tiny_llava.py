"""Train a tiny LLaVA-1.5 (llava-hf layout) end to end on the synthetic world, on a CPU.

    python examples/tiny_llava/train_tiny_llava.py --out data/generated/my-run   # from the repository root

(how the shipped ``checkpoints/tiny-llava-synth`` was made: ``MODEL_CARD.md`` and ``README.md`` here).

Curriculum (each stage from the previous one's weights, all seeds fixed):
1. tokenizer: a SentencePiece BPE trained on the world's sentences; processor built by hand.
2. vision: the CLIP tower learns to see with dense, cheap supervision -- temporary heads on the
   feature layer (-2) predict, per patch, the shape, colour, object centre, how many objects of
   that shape the image holds, and the patch row/column; the CLS token predicts which shapes and
   shape-colour pairs are present and how many of each (so CLS attention looks at objects, as in
   a real CLIP). The heads are thrown away afterwards. With ``--init-from``, ``--vision-refresh-steps``
   continues this stage on the loaded tower before the language stage re-adapts.
3. language: tower frozen (``--tower-lr`` trains it too); projector + LLaMA LLM learn to answer,
   with the chat template the project's hf backend uses (``processor.apply_chat_template``) and
   the LLaVA-1.5 short-answer suffix on yes/no questions. An image's questions share its visual prefix (exact, see
   ``tiny_llava.check_fast_paths``), so one image pays for ~15 items. Options that made the
   answers look at the image in a CPU budget: a token curriculum (first only the object patches
   plus some background, then all 576), caption and listing items, and a grounding loss on where
   the answer position's attention looks (``grounding_loss``).
4. evaluation on a held-out world (another seed) written to disk in the official layouts: greedy
   decoding, docs/formats.md parsing, all 576 tokens and careless 64-token subsets; a model card with
   every figure from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # this checkout's sparsezip_pl, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate_worlds as E  # noqa: E402
from sparsezip_pl.data import synthetic as S  # noqa: E402
from tiny_llava import Tokenized, build_processor, check_fast_paths  # noqa: E402
from tiny_training.card import dir_size, write_card  # noqa: E402
from tiny_training.common import build, grown_state, log, param_counts, reinit_heads  # noqa: E402
from tiny_training.language_data import lm_batch  # noqa: E402
from tiny_training.language_stage import train_lm  # noqa: E402
from tiny_training.vision_stage import train_vision  # noqa: E402
import training_world as W  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the tiny synthetic-world LLaVA.")
    p.add_argument("--out", default="data/generated/tiny-llava-synth",
                   help="the checkpoint folder to write (replaced if it exists; the shipped "
                        "checkpoints/tiny-llava-synth is frozen: write elsewhere)")
    p.add_argument("--workdir", default="data/generated/tiny_llava_work",
                   help="intermediate checkpoints and the held-out world (kept out of git)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out world")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", type=int, default=1, help="bf16 autocast for training (faster here)")
    p.add_argument("--vocab-size", type=int, default=640)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--lm-width", type=int, default=192)
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--lm-heads", type=int, default=6)
    p.add_argument("--vision-crop-steps", type=int, default=800, help="steps on 12x12-patch crops")
    p.add_argument("--vision-steps", type=int, default=100, help="then steps on full images")
    p.add_argument("--vision-batch", type=int, default=16, help="images per step (crop steps: 2 crops each)")
    p.add_argument("--vision-lr", type=float, default=1.5e-3)
    p.add_argument("--vision-save-every", type=int, default=100, help="vision steps between held-out checks and saves")
    p.add_argument("--vision-refresh-steps", type=int, default=0,
                   help="with --init-from: first this many more full-image vision steps on the loaded tower "
                        "(fresh heads), then the language stage re-adapts to the changed features")
    p.add_argument("--vision-size-weight", type=float, default=0.0,
                   help="weight of a per-patch regression of log(patches its object shows) in vision steps")
    p.add_argument("--vision-count-weight", type=float, default=1.0,
                   help="weight of the per-patch and CLS count losses in full-image vision steps")
    p.add_argument("--vision-centre-label", choices=("centre", "anchor", "first"), default="centre",
                   help="the tower's per-patch centre label marks the patch holding each object's centre, its "
                        "anchor patch (the one its pixels cover most, where --count-anchor cover points), or its "
                        "top-left patch (where --count-anchor first points)")
    p.add_argument("--vision-centre-weight", type=float, default=1.0, help="weight of that label's loss")
    p.add_argument("--lm-steps", type=int, default=1000)
    p.add_argument("--lm-batch", type=int, default=8, help="images per step (~11 questions each)")
    p.add_argument("--lm-lr", type=float, default=1.5e-3)
    p.add_argument("--lm-warmup", type=int, default=100)
    p.add_argument("--tower-lr", type=float, default=0.0,
                   help="language stage: also train the vision tower, end to end, at this peak lr (same warm-up "
                        "and cosine as --lm-lr); 0 keeps it frozen")
    p.add_argument("--curriculum-steps", type=int, default=300,
                   help="first language steps see only --curriculum-tokens visual tokens (all object patches + background)")
    p.add_argument("--curriculum-ramp", type=int, default=300, help="then this many steps ramp up to all 576")
    p.add_argument("--curriculum-tokens", type=int, default=64)
    p.add_argument("--count-area-match", type=float, default=0.0,
                   help="share of counting scenes (--p-count-scene) whose counted instances share one total "
                        "area whatever their number (training_world.area_matched_sizes), so that area cannot stand in "
                        "for the count")
    p.add_argument("--p-subset", type=float, default=0.0,
                   help="after the curriculum, the share of language steps that see only a subset of the visual "
                        "tokens (every object patch, then background, at their original positions)")
    p.add_argument("--subset-tokens", type=token_counts, default=(64, 96),
                   help="comma-separated subset sizes such a step draws from (raised to the batch's most object "
                        "patches)")
    p.add_argument("--init-from", default="",
                   help="a state file of an earlier run (workdir/state.pt) or a checkpoint folder it wrote "
                        "(e.g. checkpoints/tiny-llava-synth, tokenizer included): take its weights (tower "
                        "trained) and run the language stage afresh")
    p.add_argument("--p-conversation", type=float, default=0.3)
    p.add_argument("--p-caption", type=float, default=0.0, help="share of images that also get a caption item")
    p.add_argument("--grounding-weight", type=float, default=0.0,
                   help="weight of the grounding loss: the answer position's last-layer head 0 attends to the asked shape")
    p.add_argument("--count-grounding-weight", type=float, default=0.0,
                   help="weight of the counting loss: last-layer head 1 at a yes/no answer puts 0.2 of its "
                        "attention on each instance of the asked shape, the rest on the text prefix")
    p.add_argument("--count-anchor", choices=("centre", "cover", "first", "spread"), default="centre",
                   help="where the counting loss puts an instance's share: on the patch holding its centre (a hole "
                        "for rings and moons), on the one its pixels cover most, on its top-left patch, or spread "
                        "evenly over its patches")
    p.add_argument("--count-heads", type=head_list, default=(1,),
                   help="comma-separated last-layer heads the counting loss trains, each on its own (averaged); "
                        "head 0 is the grounding loss's")
    p.add_argument("--route-weight", type=float, default=0.0,
                   help="weight of the routing loss: linear probes on the last LLM layer's input at a yes/no answer "
                        "must read the asked shape, colour, side and number (so the question reaches the answer)")
    p.add_argument("--readout-weight", type=float, default=0.0,
                   help="weight of the readout loss: linear probes on the last layer's attention output at a yes/no "
                        "answer must read the asked shape's colours, side and count off the image")
    p.add_argument("--keep-weight", type=float, default=0.0,
                   help="weight of the feature-keeping loss: linear probes on the last LLM layer's visual-token "
                        "inputs must read each patch's shape, colour, row, column and object centre")
    p.add_argument("--count-target", choices=("linear", "softmax"), default="linear",
                   help="the counting loss's share per instance: 0.2 each (linear in the count), or what one fixed "
                        "attention logit per instance gives (auxiliary_losses.instance_share)")
    p.add_argument("--reinit-count-heads", type=int, default=0,
                   help="with --init-from: draw the query and key projections of the --count-heads afresh, so "
                        "they learn where to look under this run's counting loss (e.g. a new --count-target)")
    p.add_argument("--isolate-count-heads", type=int, default=0,
                   help="the answer loss does not train the --count-heads' queries and keys (their values it "
                        "still does): only the counting loss decides where they look")
    p.add_argument("--keep-centre-label", choices=("centre", "cover", "first"), default="centre",
                   help="which patch of each object the feature-keeping probe marks: the one holding its centre, "
                        "or the patch --count-anchor cover / first points the counting head at")
    p.add_argument("--ground-shape-only", type=int, default=0,
                   help="grounding targets for colour and position questions: the asked shape's patches (the "
                        "attribute is then compared after attention) instead of only the matching ones")
    p.add_argument("--family-weights", default="",
                   help="loss weight of the first answer token per family, e.g. 'count=3,color=3,position=3'")
    p.add_argument("--grow-lm-layers", type=int, default=0,
                   help="with --init-from: insert this many identity-initialized LLM layers before the last one")
    p.add_argument("--p-listing", type=float, default=0.0,
                   help="share of images that also get a 'Which shapes/colors are there?' item")
    p.add_argument("--pairs-per-family", type=int, default=2, help="yes/no pairs per family per image")
    p.add_argument("--row-tokens", type=int, default=96, help="capacity of a packed row of questions")
    p.add_argument("--p-count-scene", type=float, default=0.4)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-mme-images", type=int, default=80, help="held-out images per MME subtask")
    p.add_argument("--eval-pope-images", type=int, default=80)
    p.add_argument("--other-seeds", default=",".join(map(str, E.UNSEEN_SEEDS)),
                   help="after training, also evaluate (all tokens) on worlds of these seeds, which no run's choice "
                        "looked at; the card reports them beside the held-out world")
    p.add_argument("--honest-images", type=int, default=20,
                   help="per MME subtask / POPE: images also answered through processor+generate")
    p.add_argument("--resume", type=int, default=1)
    p.add_argument("--history", default="", help="markdown file: how the --init-from weights were made (commands)")
    p.add_argument("--card-only", type=int, default=0,
                   help="rewrite MODEL_CARD.md from OUT/eval_results.json (written by a finished run)")
    p.add_argument("--reevaluate", type=int, default=0,
                   help="with --card-only: measure the saved checkpoint again with this code's worlds and evaluation "
                        "(held-out world, careless subsets, stock-path slice, --other-seeds) before writing the card")
    args = p.parse_args(argv)
    if max(args.count_heads) >= args.lm_heads:
        p.error(f"--count-heads {','.join(map(str, args.count_heads))}: the LLM has heads 0..{args.lm_heads - 1}")
    return args


def token_counts(text: str) -> tuple[int, ...]:
    """``"64,96"`` -> ``(64, 96)``: visual-token counts in 1..576."""
    try:
        counts = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not all(1 <= c <= 576 for c in counts):
        raise argparse.ArgumentTypeError(f"token counts must lie in 1..576, got {text!r}")
    return counts


def head_list(text: str) -> tuple[int, ...]:
    """``"1,2,3"`` -> ``(1, 2, 3)``: distinct, non-negative attention-head indices."""
    try:
        heads = tuple(int(h) for h in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated head indices, got {text!r}") from None
    if min(heads) < 0 or len(set(heads)) != len(heads):
        raise argparse.ArgumentTypeError(f"head indices must be distinct and >= 0, got {text!r}")
    return heads


# ----------------------------------------------------------------------------- main


# How a run records its command (from the repository root), and how runs recorded it while the
# script was a module of the package (the shipped checkpoint's eval_results.json, the card's history).
SCRIPT = "examples/tiny_llava/train_tiny_llava.py"
FORMER_MODULE = "sparsezip_pl.demo.train_tiny_llava"


def recorded_args(folder: str | os.PathLike) -> argparse.Namespace:
    """The options of the training command recorded in a checkpoint folder's ``eval_results.json``
    (defaults filled in as for the run itself); the script named as ``SCRIPT`` or ``FORMER_MODULE``."""
    command = shlex.split(json.loads((Path(folder) / "eval_results.json").read_text())["command"])
    start = next((i for i, word in enumerate(command) if word in (SCRIPT, FORMER_MODULE)), None)
    if start is None:
        raise ValueError(f"no {SCRIPT} (or {FORMER_MODULE}) in the recorded command {shlex.join(command)!r}")
    return parse_args(command[start + 1:])


def load_init(path: str | os.PathLike) -> dict:
    """What ``--init-from`` continues from: ``{model, processor, stage, step, vision_time, earlier_attempt}``.

    ``path`` is a training state this script saved (``state.pt``, kept out of git; ``processor`` is
    then ``None`` and the tokenizer is rebuilt from the world's text, which ``training_world.world_texts``
    keeps fixed) or a checkpoint folder it wrote (``checkpoints/tiny-llava-synth``): the folder's
    weights and processor, the language step its run ended at and the training time its
    ``eval_results.json`` recorded, so a clean clone can continue the shipped model."""
    path = Path(path)
    if not path.is_dir():
        state = torch.load(path, weights_only=False)
        return {"model": state["model"], "processor": None, "stage": state["stage"], "step": state["step"],
                "vision_time": state.get("vision_time", 0.0),
                "earlier_attempt": state.get("elapsed", 0.0) + state.get("earlier_attempt", 0.0)}
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    results = path / "eval_results.json"
    if not results.exists():
        raise FileNotFoundError(f"--init-from {path}: a checkpoint folder needs the eval_results.json "
                                "the training script writes (its command and training time)")
    try:
        times = json.loads(results.read_text())["time"]
        steps = recorded_args(path).lm_steps
    except (KeyError, ValueError, SystemExit) as err:  # SystemExit: argparse refused the recorded command
        raise ValueError(f"{results}: expected 'command' and 'time' as the training script writes them "
                         f"({err!r})") from None
    return {"model": LlavaForConditionalGeneration.from_pretrained(path).state_dict(),
            "processor": AutoProcessor.from_pretrained(path), "stage": "language", "step": steps,
            "vision_time": times["vision"], "earlier_attempt": times["language"] + times.get("earlier_attempt", 0.0)}


def derived_info(args, init_step: int | None = None) -> dict:
    """Figures the card needs besides the measurements: the mix of the training data and the
    language step ``--init-from`` was saved at."""
    processor = build_processor(W.world_texts(args.seed), Path(args.workdir) / "processor_build", args.vocab_size)
    tz = Tokenized(processor)
    stats = S.world_statistics(args.seed)
    _, _, fams, _, _ = lm_batch(tz, args.seed, 0, 64, args, stats)
    out = {"items_per_image": float(np.mean([len(f) for f in fams])), "eval_seed": args.eval_seed}
    if args.init_from:
        out["init_step"] = load_init(args.init_from)["step"] if init_step is None else init_step
    return out


def other_worlds(model, processor, args) -> dict:
    """All-token results on the worlds of ``--other-seeds`` (written under the workdir), by seed."""
    seeds = [int(seed) for seed in args.other_seeds.split(",")]
    results = E.evaluate_seeds(model, processor, seeds, Path(args.workdir) / "other_worlds", args.eval_mme_images)
    return {str(seed): r for seed, r in results.items()}


def overall(results: dict) -> float:
    n = sum(results[f]["n"] for f in E.FAMILIES)
    return sum(results[f]["acc"] * results[f]["n"] for f in E.FAMILIES) / n


def evaluate_checkpoint(model, processor, args, work: Path) -> dict:
    """The card's measurements of a saved checkpoint: the held-out world of ``--eval-seed`` with all
    tokens and the careless 64-token subsets, the stock path on a slice of it, and, with
    ``--other-seeds``, all-token results on those worlds."""
    world = S.generate_world(work / f"heldout_seed{args.eval_seed}", seed=args.eval_seed,
                             n_mme_images=args.eval_mme_images, n_pope_images=args.eval_pope_images,
                             n_instruct=0)
    from PIL import Image

    img = Image.open(sorted(Path(world["pope_image_folder"]).glob("*.jpg"))[0]).convert("RGB")
    err = check_fast_paths(model, processor, img, [("Is there a star in the image?" + S.SHORT_ANSWER, "Yes"),
                                                   ("How many stars are there?", "There is one star.")])
    log(f"fast path vs stock forward: max logit difference {err:.2e}")

    results = {}
    for name, policy in (("all", None), ("random64", "random"), ("stride64", "stride")):
        t = time.time()
        results[name] = E.evaluate_world(model, processor, world, keep_policy=policy, n_keep=64, seed=args.seed)
        log(f"held-out eval [{name}] in {time.time() - t:.0f}s: "
            + " ".join(f"{f}={results[name][f]['acc']:.1f}" for f in E.FAMILIES))
    t = time.time()
    honest = E.evaluate_world(model, processor, world, max_mme_images=args.honest_images,
                              max_pope_images=args.honest_images, honest=True)
    fast_slice = E.evaluate_world(model, processor, world, max_mme_images=args.honest_images,
                                  max_pope_images=args.honest_images)
    n = len(honest["answers"])
    agree = 100.0 * np.mean([honest["answers"][k] == fast_slice["answers"][k] for k in honest["answers"]])
    log(f"stock path (processor + generate) on the slice in {time.time() - t:.0f}s: "
        + " ".join(f"{f}={honest[f]['acc']:.1f}" for f in E.FAMILIES))

    print("\n" + E.format_table({"all 576 tokens": results["all"], "random 64": results["random64"],
                                  "uniform stride 64": results["stride64"]}) + "\n", flush=True)
    for r in list(results.values()) + [honest, fast_slice]:
        r.pop("answers")
    out = {"fast_path_err": err, "eval": results, "honest": {"agree": agree, "n": n, "acc": overall(honest)},
           "test_margin": 8.0, "overall_all": overall(results["all"])}
    if args.other_seeds:
        out["other_worlds"] = other_worlds(model, processor, args)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, work = Path(args.out), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # shlex.join: an empty or spaced argument (--other-seeds "") must survive a round trip (recorded_args)
    command = f"python {SCRIPT} " + shlex.join(sys.argv[1:] if argv is None else argv)
    log(f"args: {vars(args)}")
    if args.card_only:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        # what the training run recorded wins: this code's question sampler may give other item counts
        recorded = json.loads((out / "eval_results.json").read_text())
        info = {**derived_info(args, recorded.get("init_step")), **recorded}
        model, processor = LlavaForConditionalGeneration.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
        if args.reevaluate:
            t_eval = time.time()
            info.pop("other_worlds", None)
            info.update(evaluate_checkpoint(model, processor, args, work))
            info["time"]["eval"] = time.time() - t_eval
            info["reevaluated"] = True
        elif args.other_seeds and "other_worlds" not in info:
            info["other_worlds"] = other_worlds(model, processor, args)
        (out / "eval_results.json").write_text(json.dumps(info, indent=1, default=float))
        write_card(out, model, args, info)
        info["size_mb"] = dir_size(out) / 1e6
        (out / "eval_results.json").write_text(json.dumps(info, indent=1, default=float))
        write_card(out, model, args, info)
        log(f"rewrote {out / 'MODEL_CARD.md'}")
        return

    init = load_init(args.init_from) if args.init_from else None
    processor = (init and init["processor"]) or \
        build_processor(W.world_texts(args.seed), work / "processor_build", args.vocab_size)
    tz = Tokenized(processor)
    model = build(args, processor)
    pc = param_counts(model)
    log(f"parameters: {pc}")
    stats = S.world_statistics(args.seed)

    state_path = work / "state.pt"
    state = torch.load(state_path, weights_only=False) if (args.resume and state_path.exists()) else None
    times = {"vision": 0.0, "language": 0.0, "earlier_attempt": 0.0}
    if init and not state:
        if args.grow_lm_layers:
            init["model"] = grown_state(model, init["model"], args.grow_lm_layers)
        if args.reinit_count_heads:
            init["model"] = reinit_heads(model, init["model"], args.count_heads, args.seed)
        model.load_state_dict(init["model"])
        times["vision"], times["earlier_attempt"] = init["vision_time"], init["earlier_attempt"]
        state = {"stage": "vision-refresh" if args.vision_refresh_steps else "language", "step": 0, "opt": None,
                 "model": init["model"], "vision_time": times["vision"], "earlier_attempt": times["earlier_attempt"]}
        log(f"initialized from {args.init_from} (stage {init['stage']}, step {init['step']})")
    if state:
        model.load_state_dict(state["model"])
        times["vision"] = state.get("vision_time", 0.0)
        times["earlier_attempt"] = state.get("earlier_attempt", 0.0)
    if state and state["stage"] == "vision-refresh":
        # the original run trained on vision images 0 .. (crop + full steps) x batch; refresh on later ones
        offset = (args.vision_crop_steps + args.vision_steps) * args.vision_batch
        times["vision"] += train_vision(model, args, state_path, state, 0, args.vision_refresh_steps, offset,
                                        stage="vision-refresh", carry={"vision_time": times["vision"],
                                                                       "earlier_attempt": times["earlier_attempt"]})
        state = {"stage": "language", "step": 0, "opt": None, "model": model.state_dict(),
                 "vision_time": times["vision"], "earlier_attempt": times["earlier_attempt"]}
    elif not state or state["stage"] == "vision":
        times["vision"] = train_vision(model, args, state_path, state, args.vision_crop_steps, args.vision_steps)
        state = None
    times["language"] = train_lm(model, tz, args, stats, state_path, state, times["vision"])
    times["total"] = times["vision"] + times["language"] + times["earlier_attempt"]
    log(f"training done: {times}")

    # save the checkpoint (model + processor) and check it reloads and matches the stock forward
    t_eval = time.time()
    if out.exists():
        shutil.rmtree(out)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    model.eval()
    info = {"command": command, "params": pc, "time": times, **evaluate_checkpoint(model, processor, args, work)}
    info.update(derived_info(args, init["step"] if init else None))
    times["eval"] = time.time() - t_eval
    (out / "eval_results.json").write_text(json.dumps(info, indent=1, default=float))
    info["size_mb"] = dir_size(out) / 1e6
    write_card(out, model, args, info)
    info["size_mb"] = dir_size(out) / 1e6
    log(f"saved {out} ({info['size_mb']:.1f} MB)")
    (out / "eval_results.json").write_text(json.dumps(info, indent=1, default=float))


if __name__ == "__main__":
    main()
