"""Stage 2 data: question items per image, packed rows, and the labels the auxiliary losses read."""

from __future__ import annotations

import numpy as np
import torch

from sparsezip_pl.data import synthetic as S
import training_world as W
from tiny_llava import Tokenized, normalize_images, pack_rows

YES_NO = ("Yes", "No")


def training_items(rng, args, stats):
    """A scene and its training conversations: [(turns, family)] (turns = [(q, a), ...])."""
    force, sizes = None, None
    if rng.random() < args.p_count_scene:
        force = (S.SHAPES[int(rng.integers(len(S.SHAPES)))], S.draw_pinned_count(rng))
        # Drawn only when asked for, so runs without --count-area-match see the same scenes as before.
        if args.count_area_match > 0 and rng.random() < args.count_area_match:
            sizes = W.area_matched_sizes(rng, force[1])
    scene = S.sample_scene(rng, force, sizes)
    items, seen = [], set()

    def add(pair, fam):
        if pair is not None and pair[0] not in seen:
            seen.update(pair)
            items.extend([([(pair[0] + S.SHORT_ANSWER, "Yes")], fam), ([(pair[1] + S.SHORT_ANSWER, "No")], fam)])

    for fam in S.MME_FAMILIES:
        for k in range(args.pairs_per_family):
            if fam == "count" and force is not None and k == 0:  # the benchmark's balanced counts
                add(S.count_pair(force[0], scene.count(force[0]), rng), fam)
            else:
                add(S.yes_no_pair(scene, fam, rng), fam)
    present, absent = scene.present(), scene.absent()
    if present and absent:
        for split in rng.permutation(S.POPE_SPLITS)[: args.pairs_per_family]:
            negs = S.pope_negatives(present, str(split), min(3, len(absent)), stats, rng)
            neg = negs[int(rng.integers(len(negs)))]
            pos = present[int(rng.integers(len(present)))]
            add((S.q_exists(pos), S.q_exists(neg)), "pope")
    if rng.random() < args.p_conversation:
        items.append((S.conversation_turns(scene, rng), "conversation"))
    if rng.random() < args.p_caption:  # LLaVA stage-1 style: every word of a caption reads the image
        q = ("Describe the image briefly.", "What shapes are in the image?", "What objects can you see?")
        items.append(([(q[int(rng.integers(3))], S.describe(scene))], "caption"))
    if rng.random() < args.p_listing:  # short lists: the answer's first word already needs the image
        present = scene.present()
        colors = [c for c in S.COLOR_NAMES if any(o.color == c for o in scene.objects)]
        if rng.random() < 0.5:
            items.append(([("Which shapes are there?" + S.SHORT_ANSWER, _listing(present))], "listing"))
        else:
            items.append(([("Which colors are there?" + S.SHORT_ANSWER, _listing(colors))], "listing"))
    return scene, items


def _listing(words) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def count_targets(scene, anchor: str) -> list:
    """Per object: (shape, patches, share of the object's counting mass on each) for ``--count-anchor``
    -- one patch (``centre``, ``cover`` or ``first``: ``training_world.instance_anchors``), or ``spread``
    evenly over every patch it shows, so a big and a small object weigh the same."""
    if anchor != "spread":
        return [(o.shape, np.array([p]), np.ones(1)) for o, p in zip(scene.objects, W.instance_anchors(scene, anchor))]
    owner = W.instance_map(scene)
    out = []
    for i, o in enumerate(scene.objects):
        cells = np.flatnonzero(owner == i)
        out.append((o.shape, cells, np.full(len(cells), 1.0 / max(len(cells), 1))))
    return out


def _centre_map(scene, labels, rule: str) -> np.ndarray:
    """The keep probe's per-patch object mark: ``render_with_labels``'s centre label, or each instance's
    ``training_world.instance_anchors`` patch under ``rule``."""
    if rule == "centre":
        return labels["center"].reshape(-1)
    marks = np.zeros(S.GRID * S.GRID, np.int64)
    marks[W.instance_anchors(scene, rule)] = 1
    return marks


def lm_batch(tz: Tokenized, seed: int, start: int, n: int, args, stats, purpose: str = "train", n_keep=None):
    """Images (normalized), packed item rows and per-item (family, answer) for images start..start+n.

    With ``n_keep`` (curriculum), also the indices of the visual tokens to keep per image: every
    patch an object touches plus random background patches, ``max(n_keep, most object patches)``
    in all, in their original order.
    """
    imgs, per_image, fams, objects, shape_maps, per_object_targets, asked, attributes, readouts, centre_maps = ([] for _ in range(10))
    for i in range(start, start + n):
        rng = S.rng_for(seed, purpose, 1_000_000 + i)
        scene, items = training_items(rng, args, stats)
        arr, labels = W.render_with_labels(scene)
        objects.append(np.flatnonzero(labels["shape"].reshape(-1) > 0))
        shape_maps.append(labels["shape"].reshape(-1) * 16 + labels["color"].reshape(-1))
        centre_maps.append(_centre_map(scene, labels, args.keep_centre_label))
        asked.append([_question_shape(turns[0][0]) for turns, _ in items])
        attributes.append([question_attributes(turns[0][0]) for turns, _ in items])
        readouts.append([readout_labels(_question_shape(turns[0][0]), scene.objects) for turns, _ in items])
        per_object_targets.append(count_targets(scene, args.count_anchor))
        imgs.append(W.jpeg_roundtrip(arr))
        per_image.append([tz.item(turns) for turns, _ in items])
        fams.append([(fam, turns[0][1] if fam not in ("conversation", "caption", "listing") else None,
                      _asked_target(turns[0][0], scene)) for turns, fam in items])
    px = torch.from_numpy(normalize_images(np.stack(imgs)))
    packed = pack_rows(per_image, len(tz.prefix) + 576, tz.tok.pad_token_id, capacity=args.row_tokens)
    keep = None
    if n_keep is not None:
        k = max([n_keep] + [len(o) for o in objects])
        keep = []
        for j, obj in enumerate(objects):
            g = np.random.default_rng([seed, start + j, 7])
            rest = np.setdiff1d(np.arange(576), obj)
            keep.append(np.sort(np.concatenate([obj, g.choice(rest, k - len(obj), replace=False)])))
        keep = torch.from_numpy(np.stack(keep))
    ground = {"shape_maps": torch.from_numpy(np.stack(shape_maps)), "count_targets": per_object_targets,
              "centre_maps": torch.from_numpy(np.stack(centre_maps)), "asked_shapes": asked,
              "attributes": attributes, "readout": readouts}
    return px, packed, fams, keep, ground


SIDE_WORDS = {"left side": "left", "right side": "right", "upper part": "top", "lower part": "bottom"}


def _question_shape(question: str):
    """The shape a question names (None for questions that name none)."""
    return next((s for s in S.SHAPES if f" {s} " in question or f" {S.PLURALS[s]} " in question), None)


def _asked_target(question: str, scene):
    """What a yes/no question asks the image for, as (shape, colour or None), if the scene holds it.

    Existence / count / POPE: the shape's patches. Colour: the patches of that shape in that colour.
    Position: the (unique) shape's patches if it is on the asked side. None when nothing matches
    (the answer is "No" then, and there is nothing to look at)."""
    shape = _question_shape(question)
    if shape is None or scene.count(shape) == 0:
        return None
    color = next((c for c in S.COLOR_NAMES if f" {c} {shape} " in question), None)
    if color is not None and not any(o.shape == shape and o.color == color for o in scene.objects):
        return None
    side = next((v for k, v in SIDE_WORDS.items() if k in question), None)
    if side is not None:
        o = next(o for o in scene.objects if o.shape == shape)
        c = S.IMAGE_SIZE / 2
        if not {"left": o.cx < c, "right": o.cx > c, "top": o.cy < c, "bottom": o.cy > c}[side]:
            return None
    return shape, color


def readout_labels(shape: str | None, objects) -> dict | None:
    """What the image holds of ``shape``: its colours (multi-hot), the side of its first instance
    (0 none / 1 left / 2 right, 0 none / 1 top / 2 bottom) and its count."""
    if shape is None:
        return None
    mine = [o for o in objects if o.shape == shape]
    colors = [0.0] * len(S.COLOR_NAMES)
    for o in mine:
        colors[S.COLOR_NAMES.index(o.color)] = 1.0
    c = S.IMAGE_SIZE / 2
    lr = 0 if not mine else (1 if mine[0].cx < c else 2)
    tb = 0 if not mine else (1 if mine[0].cy < c else 2)
    return {"colors": colors, "lr": lr, "tb": tb, "count": min(len(mine), S.MAX_PER_SHAPE)}


def question_attributes(question: str) -> dict:
    """Class labels of what a question names (0 = names none)."""
    shape = _question_shape(question)
    color = next((c for c in S.COLOR_NAMES if f" {c} " in question), None)
    side = next((v for k, v in SIDE_WORDS.items() if k in question), None)
    number = next((n for n, w in S.NUMBER_WORDS.items() if f"exactly {w} " in question), None)
    return {"shape": 0 if shape is None else S.SHAPES.index(shape) + 1,
            "color": 0 if color is None else S.COLOR_NAMES.index(color) + 1,
            "side": 0 if side is None else list(SIDE_WORDS.values()).index(side) + 1,
            "number": 0 if number is None else number}
