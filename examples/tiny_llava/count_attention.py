"""Where the tiny LLaVA's counting head looks, against the synthetic world's ground truth.

    python examples/tiny_llava/count_attention.py                       # the shipped model, 240 scenes of seed 2
    python examples/tiny_llava/count_attention.py --head 2              # another head (--count-heads in training)
    python examples/tiny_llava/count_attention.py --anchor-probe 300    # also: how readable the anchor patches are

The training script's counting loss (``tiny_training.auxiliary_losses.counting_loss``) asks head 1 of the last
LLM layer, at a yes/no answer, to put 0.2 of its attention on each instance of the asked shape and
the rest on the text prefix. For count questions on fresh training-style scenes of an unseen seed
(all 576 visual tokens), this prints, by the true count n: the first-token accuracy, the head's
attention mass on the text prefix (sink), on the instances' anchor patches (where the counting
loss points: ``--anchor``, the training script's ``--count-anchor``) and on all patches of the
asked shape, and how many such patches there are -- for right and wrong answers apart, then the
spread of the shape's mass per n, the accuracy for each count asked, and how well one threshold on
either mass alone could tell n from n + 1 instances. If the mass tracks the shape's area more
than its number of instances, large pairs and small triples look alike. With ``--anchor-probe``, a
linear probe fit on the tower's features and on the visual tokens entering the last LLM layer shows
how well the anchor patches could be told apart where the counting head's keys come from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # this checkout's sparsezip_pl, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_tiny_llava as T  # noqa: E402
from sparsezip_pl.data import synthetic as S  # noqa: E402
from tiny_llava import Tokenized, normalize_images, shared_prefix_hidden, tower_features  # noqa: E402
from tiny_training import language_data as data  # noqa: E402
import training_world as W  # noqa: E402


def measure(model, tz: Tokenized, seed: int, n_images: int, anchor: str, batch: int = 8,
            head: int = 1) -> list[dict]:
    """One row per count question: true count, right or wrong, attention masses, shape patches."""
    args = T.parse_args(["--count-anchor", anchor, "--p-conversation", "0", "--p-caption", "0",
                         "--p-listing", "0", "--p-count-scene", "1.0"])
    stats = S.world_statistics(seed)
    yes_id, no_id = (tz.tok.convert_tokens_to_ids("▁" + w) for w in data.YES_NO)
    embed = model.model.language_model.embed_tokens
    n_text = len(tz.prefix)
    rows = []
    for start in range(0, n_images, batch):
        px, packed, fams, _, ground = data.lm_batch(tz, seed, start, min(batch, n_images - start), args, stats)
        ids, pos, seg, _, answer_at = packed
        C = ids.shape[2]
        with torch.no_grad():
            img = model.model.multi_modal_projector(tower_features(model, px))
            prefix = torch.cat([embed(torch.tensor([tz.prefix])).expand(px.shape[0], -1, -1), img], 1)
            capture: dict = {}
            hidden = shared_prefix_hidden(model, prefix, embed(ids), pos, seg, None, capture)
            q, k = capture["q"][:, head].float(), capture["k"][:, head].float()
            for b, (firsts, fam_list) in enumerate(zip(answer_at, fams)):
                shapes = ground["shape_maps"][b] // 16
                for rc, (fam, ans, _), shape, named in zip(firsts, fam_list, ground["asked_shapes"][b],
                                                           ground["attributes"][b]):
                    if fam != "count" or rc is None or shape is None:
                        continue
                    attn = torch.softmax((q[b, rc[0] * C + rc[1]] @ k[b].T) * capture["scale"], -1)
                    anchors = [int(cells[0]) for s, cells, _ in ground["count_targets"][b] if s == shape]
                    on_shape = shapes == S.SHAPES.index(shape) + 1
                    logits = model.lm_head(hidden[b, rc[0], rc[1]])
                    said_yes = bool(logits[yes_id] > logits[no_id])
                    rows.append({"n": len(anchors), "asked": named["number"], "right": said_yes == (ans == "Yes"),
                                 "sink": attn[:n_text].sum().item(),
                                 "anchor": attn[n_text:][anchors].sum().item() if anchors else 0.0,
                                 "shape": attn[n_text:][on_shape].sum().item(), "patches": int(on_shape.sum())})
    return rows


def trained_anchor(checkpoint: Path) -> str:
    """The ``--count-anchor`` a checkpoint written by the training script was trained with."""
    results = checkpoint / "eval_results.json"
    if not results.is_file():
        raise SystemExit(f"{results} not found: pass --anchor (centre, cover or first)")
    return T.recorded_args(checkpoint).count_anchor


def report(rows: list[dict]) -> None:
    def line(name: str, sel: list[dict]) -> None:
        if not sel:
            return
        mean = {k: np.mean([r[k] for r in sel]) for k in ("right", "sink", "anchor", "shape", "patches")}
        print(f"{name:14s} {len(sel):5d} {100 * mean['right']:6.1f} {mean['sink']:6.3f} {mean['anchor']:7.3f} "
              f"{mean['shape']:6.3f} {mean['patches']:8.1f}")

    print(f"{'true count':14s} {'n':>5s} {'acc %':>6s} {'sink':>6s} {'anchor':>7s} {'shape':>6s} {'patches':>8s}")
    for n in range(1, S.MAX_PER_SHAPE + 1):
        sel = [r for r in rows if r["n"] == n]
        line(f"{n}", sel)
        line("  right", [r for r in sel if r["right"]])
        line("  wrong", [r for r in sel if not r["right"]])
    print("\nby the count asked: questions, accuracy %, mean shape patches of the right / wrong answers")
    for n in range(1, S.MAX_PER_SHAPE + 1):
        for asked in sorted({r["asked"] for r in rows if r["n"] == n}):
            sel = [r for r in rows if r["n"] == n and r["asked"] == asked]
            patches = [np.mean([r["patches"] for r in sel if r["right"] == ok] or [np.nan]) for ok in (True, False)]
            print(f"  {n} asked as {asked}: {len(sel):4d} {100 * np.mean([r['right'] for r in sel]):6.1f} "
                  f"{patches[0]:6.1f} / {patches[1]:.1f}")
    print("\nattention mass on the asked shape, 10th / 50th / 90th percentile")
    for n in range(1, S.MAX_PER_SHAPE + 1):
        mass = [r["shape"] for r in rows if r["n"] == n]
        if mass:
            print(f"  n={n}: " + " / ".join(f"{v:.3f}" for v in np.percentile(mass, [10, 50, 90])))
    print("\nbest accuracy of one threshold telling n from n + 1 instances, on the mass on the anchors / the shape")
    for n in range(1, S.MAX_PER_SHAPE):
        fewer, more = ([r for r in rows if r["n"] == m] for m in (n, n + 1))
        if fewer and more:
            print(f"  {n} vs {n + 1}: " + " / ".join(
                f"{100 * threshold_accuracy([r[k] for r in fewer], [r[k] for r in more]):.1f}" for k in ("anchor", "shape")))


def anchor_features(model, tz: Tokenized, seed: int, n_images: int, anchor: str) -> dict:
    """Per patch of ``n_images`` scenes of ``seed``: the tower's features (``tower``), the visual
    tokens entering the last LLM layer (``last``, where the counting head's keys are computed), the
    anchor label (1 on each instance's ``--anchor`` patch) and the instance each patch shows."""
    embed = model.model.language_model.embed_tokens
    n_text = len(tz.prefix)
    out = {"tower": [], "last": [], "label": [], "owner": []}
    for i in range(n_images):
        scene = S.sample_scene(S.rng_for(seed, "extra", 50_000 + i))
        px = torch.from_numpy(normalize_images(W.jpeg_roundtrip(S.render(scene))[None]))
        with torch.no_grad():
            feats = tower_features(model, px)
            prefix = torch.cat([embed(torch.tensor([tz.prefix])), model.model.multi_modal_projector(feats)], 1)
            capture: dict = {}
            one = torch.ones(1, 1, 1, dtype=torch.long)  # a one-token row: only the prefix's inputs are read
            shared_prefix_hidden(model, prefix, embed(one * tz.prefix[0]), one * prefix.shape[1], one, None, capture)
        label = torch.zeros(S.GRID * S.GRID)
        label[W.instance_anchors(scene, anchor)] = 1
        out["tower"].append(feats[0])
        out["last"].append(capture["prefix_x"][0, n_text:].float())
        out["label"].append(label)
        out["owner"].append(torch.from_numpy(W.instance_map(scene)))
    return {k: torch.stack(v) for k, v in out.items()}


def fit_probe(x: torch.Tensor, label: torch.Tensor, steps: int = 400):
    """A logistic probe (standardized inputs, positives weighted 10) for label [..., P] from x [..., P, D];
    returns a function of features giving scores."""
    torch.manual_seed(0)
    flat, target = x.reshape(-1, x.shape[-1]), label.reshape(-1)
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    probe = torch.nn.Linear(flat.shape[1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            probe((flat - mean) / std).squeeze(-1), target, pos_weight=torch.tensor(10.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda feats: probe((feats - mean) / std).squeeze(-1).detach()


def probe_quality(scores: torch.Tensor, label: torch.Tensor, owner: torch.Tensor) -> tuple[float, float]:
    """(best F1 of one threshold on ``scores`` [B, P] for ``label``, share of instances in ``owner``
    whose labelled patch is their top-scoring patch)."""
    truth = label.bool()
    f1 = max(float(2 * ((scores > t) & truth).sum() / ((scores > t).sum() + truth.sum()))
             for t in torch.quantile(scores.flatten(), torch.linspace(0.5, 0.999, 200)))
    top = hits = 0
    for b in range(scores.shape[0]):
        for i in owner[b].unique().tolist():
            cells = torch.nonzero(owner[b] == i).flatten()
            if i < 0 or not truth[b, cells].any():
                continue
            hits += 1
            top += int(truth[b, cells[scores[b, cells].argmax()]])
    return f1, top / max(hits, 1)


def report_anchor_probe(model, tz: Tokenized, seed: int, n_images: int, anchor: str) -> None:
    train = anchor_features(model, tz, seed, n_images, anchor)
    test = anchor_features(model, tz, seed + 1, n_images // 2, anchor)
    print(f"\nlinear probe for each instance's anchor patch ({anchor}), fit on {n_images} scenes of seed {seed}, "
          f"scored on {n_images // 2} of seed {seed + 1}: best F1 / the anchor is its instance's top patch")
    for site, name in (("tower", "tower features (projector input)"), ("last", "last LLM layer's visual inputs")):
        f1, top = probe_quality(fit_probe(train[site], train["label"])(test[site]), test["label"], test["owner"])
        print(f"  {name:34s} {f1:.3f} / {100 * top:.1f}%")


def threshold_accuracy(fewer: list[float], more: list[float]) -> float:
    """The best share of values classified right by one cut (``fewer`` below it, ``more`` at or above)."""
    values = np.concatenate([fewer, more])
    is_more = np.concatenate([np.zeros(len(fewer)), np.ones(len(more))])[np.argsort(values, kind="stable")]
    # a cut before sorted position i: the i lowest are called "fewer"
    right = np.concatenate([[0], np.cumsum(1 - is_more)]) + np.concatenate([np.cumsum(is_more[::-1])[::-1], [0]])
    return float(right.max() / len(values))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/tiny-llava-synth")
    p.add_argument("--seed", type=int, default=2, help="world seed of the scenes (unseen in training: not 0)")
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--head", type=int, default=1, help="last-layer head to read (training's default counting head: 1)")
    p.add_argument("--anchor", choices=("centre", "cover", "first"), default=None,
                   help="each instance's anchor patch (default: the --count-anchor of the checkpoint's training "
                        "command, in its eval_results.json)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anchor-probe", type=int, default=0,
                   help="also fit a linear probe for the anchor patches on this many scenes (scored on half as "
                        "many of the next seed): how readable the anchors are where the counting head's keys come from")
    args = p.parse_args(argv)
    if args.anchor is None:
        args.anchor = trained_anchor(Path(args.checkpoint))
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    tz = Tokenized(AutoProcessor.from_pretrained(args.checkpoint))
    print(f"{args.checkpoint}: count questions on {args.images} scenes of seed {args.seed}, head {args.head} "
          f"of the last LLM layer, anchors: {args.anchor}\n")
    report(measure(model, tz, args.seed, args.images, args.anchor, head=args.head))
    if args.anchor_probe:
        report_anchor_probe(model, tz, args.seed, args.anchor_probe, args.anchor)


if __name__ == "__main__":
    main()
