"""What the training lab reads from the synthetic world beyond the files the demo writes.

The world itself (scenes, rendering, questions, ``generate_world``) is the package's
``sparsezip_pl.data.synthetic``; this module adds, from the same scenes:

- per-patch labels of a rendered scene (``render_with_labels``: the vision stage's dense labels);
- which patches each object covers (``patch_cover``, ``object_patches``, ``instance_map``) and the
  one patch that stands for it (``centre_patch``, ``anchor_patch``, ``first_patches``,
  ``instance_anchors``: where the counting loss points);
- area-matched counting scenes (``area_matched_sizes``, ``--count-area-match``);
- what a loader sees of an image after a .jpg file (``jpeg_roundtrip``);
- the frozen tokenizer corpus (``world_texts``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sparsezip_pl.data.synthetic import (
    COLOR_NAMES,
    GRID,
    IMAGE_SIZE,
    MAX_PER_SHAPE,
    MME_FAMILIES,
    MME_SUFFIX,
    NUMBER_WORDS,
    PATCH,
    SHAPES,
    SHORT_ANSWER,
    Obj,
    Scene,
    conversation_turns,
    jpeg_bytes,
    pope_questions,
    q_count,
    q_exists,
    render,
    rng_for,
    sample_scene,
    shape_mask,
    world_statistics,
    yes_no_pair,
)

# ----------------------------------------------------------------------------- patches of an object

_PAD = 32  # margin of the label canvas, so a shape's mask box may cross the image border


def _object_canvas(o: Obj) -> np.ndarray:
    """The object's own pixels (1.0, its ``shape_mask``) on a zero canvas padded by ``_PAD`` on every side."""
    m, (x0, y0) = shape_mask(o.shape, o.cx, o.cy, o.size)
    canvas = np.zeros((IMAGE_SIZE + 2 * _PAD, IMAGE_SIZE + 2 * _PAD), np.float32)
    canvas[y0 + _PAD: y0 + _PAD + m.size[1], x0 + _PAD: x0 + _PAD + m.size[0]] = np.asarray(m) > 127
    return canvas


def _patch_cover(canvas: np.ndarray) -> np.ndarray:
    """[GRID, GRID]: the share of each patch the canvas's pixels cover."""
    return canvas[_PAD:-_PAD, _PAD:-_PAD].reshape(GRID, PATCH, GRID, PATCH).mean((1, 3))


def patch_cover(o: Obj) -> np.ndarray:
    """[GRID * GRID]: the share of each patch the object's own pixels cover (0..1)."""
    return _patch_cover(_object_canvas(o)).reshape(-1)


def object_patches(o: Obj) -> np.ndarray:
    """Indices (row * GRID + column) of the patches the object covers by at least 20%: the
    patches ``render_with_labels``'s labels give to it."""
    return np.flatnonzero(patch_cover(o) >= 0.2)


def instance_map(scene: Scene) -> np.ndarray:
    """[GRID * GRID]: the index in ``scene.objects`` of the object each patch shows (-1 =
    background), by ``object_patches`` and drawing order (a later object covers an earlier one),
    as ``render_with_labels``'s labels assign patches."""
    out = np.full(GRID * GRID, -1, np.int64)
    for i, o in enumerate(scene.objects):
        out[object_patches(o)] = i
    return out


def centre_patch(o: Obj) -> int:
    """Index of the patch holding the object's centre (``render_with_labels``'s ``center`` label)."""
    return min(int(o.cy // PATCH), GRID - 1) * GRID + min(int(o.cx // PATCH), GRID - 1)


def anchor_patch(o: Obj) -> int:
    """Index of the patch that the object's own pixels cover most (ties: the one nearest the
    centre). Unlike ``centre_patch`` it lies on the object: a ring's centre is a hole."""
    cover = _patch_cover(_object_canvas(o))
    rows, cols = np.mgrid[0:GRID, 0:GRID] * PATCH + PATCH / 2
    return int((cover - 1e-4 * np.hypot(rows - o.cy, cols - o.cx)).argmax())


def first_patches(scene: Scene) -> list[int]:
    """Per object, the first patch in raster order that ``instance_map`` gives it: its top-left
    patch. Unlike ``anchor_patch`` (which breaks ties by the distance to the centre, so it depends
    on the whole object), a patch's own neighbourhood mostly decides whether it is this one. An
    object hidden entirely by later ones (the generator never places one) gets its ``anchor_patch``."""
    owner = instance_map(scene)
    return [int(np.flatnonzero(owner == i)[0]) if (owner == i).any() else anchor_patch(o)
            for i, o in enumerate(scene.objects)]


def instance_anchors(scene: Scene, rule: str) -> list[int]:
    """Per object, the one patch that stands for it: ``centre`` (``centre_patch``), ``cover``
    (``anchor_patch``) or ``first`` (``first_patches``)."""
    if rule == "first":
        return first_patches(scene)
    pick = {"centre": centre_patch, "cover": anchor_patch}[rule]
    return [pick(o) for o in scene.objects]


# ----------------------------------------------------------------------------- labels


def scene_labels(scene: Scene) -> dict:
    """Per-patch labels of a scene, from its objects' masks in drawing order (a later object
    covers an earlier one).

    ``shape`` ([24, 24] int64; 0 = background, else 1 + index in SHAPES), ``color`` (0 =
    background, else 1 + index in COLOR_NAMES), ``center`` (1 on the patch holding an object's
    centre), ``count`` (on object patches: how many objects of that shape the scene has); ``occ``
    ([24, 24, 49] float32): the object pixels' share of each 2x2 cell of each patch. A patch
    belongs to an object it covers by at least 20%.
    """
    shape_l = np.zeros((GRID, GRID), np.int64)
    color_l = np.zeros((GRID, GRID), np.int64)
    center_l = np.zeros((GRID, GRID), np.int64)
    count_l = np.zeros((GRID, GRID), np.int64)
    union = np.zeros((IMAGE_SIZE + 2 * _PAD, IMAGE_SIZE + 2 * _PAD), np.float32)
    for o in scene.objects:
        canvas = _object_canvas(o)
        union = np.maximum(union, canvas)
        on = _patch_cover(canvas) >= 0.2
        shape_l[on] = SHAPES.index(o.shape) + 1
        color_l[on] = COLOR_NAMES.index(o.color) + 1
        count_l[on] = scene.count(o.shape)
        center_l.reshape(-1)[centre_patch(o)] = 1
    # object occupancy of each patch on a 7x7 grid of 2x2-pixel cells: [24, 24, 49]
    occ = union[_PAD:-_PAD, _PAD:-_PAD].reshape(GRID, 7, 2, GRID, 7, 2).mean((2, 5))
    occ = occ.transpose(0, 2, 1, 3).reshape(GRID, GRID, 49)
    return {"shape": shape_l, "color": color_l, "center": center_l, "count": count_l, "occ": occ}


def render_with_labels(scene: Scene) -> tuple[np.ndarray, dict]:
    """The package's ``render(scene)`` (the world's image, unchanged) and ``scene_labels(scene)``."""
    return render(scene), scene_labels(scene)


def jpeg_roundtrip(arr: np.ndarray) -> np.ndarray:
    """What a loader sees after the image went through a .jpg file (the world's ``jpeg_bytes``)."""
    return np.asarray(Image.open(io.BytesIO(jpeg_bytes(arr))).convert("RGB"))


# ----------------------------------------------------------------------------- counting scenes


def area_matched_sizes(rng: np.random.Generator, n: int) -> list[float]:
    """Bounding-box edges for ``n`` instances of one shape whose total area does not depend on ``n``
    (``sample_scene(rng, (shape, n), pinned_sizes=...)`` places them).

    The total (in px^2) is drawn from one range for every n and split nearly evenly (+-20%), so the
    area a shape covers tells nothing about how many instances there are: one large instance, two
    middling or three small ones. Edges stay within the world's sizes (26-84 px).
    """
    total = rng.uniform(2600.0, 7000.0)
    shares = rng.uniform(0.8, 1.2, n)
    shares /= shares.sum()
    return [float(np.clip(np.sqrt(total * share), 26.0, 84.0)) for share in shares]


# ----------------------------------------------------------------------------- tokenizer corpus

# The tokenizer corpus still draws count questions as the world did when the shipped tokenizer was
# built (a wrong count could be four): its token ids must not move with the question sampler, or
# weights trained with it (`train_tiny_llava.py --init-from`) would read other tokens.
TOKENIZER_CORPUS_MAX_COUNT = MAX_PER_SHAPE + 1


def world_texts(seed: int = 0, n: int = 400) -> list[str]:
    """Every kind of sentence the world produces (for training a tokenizer); a frozen corpus, see
    ``TOKENIZER_CORPUS_MAX_COUNT``."""
    texts = []
    max_count = TOKENIZER_CORPUS_MAX_COUNT
    stats = world_statistics(seed, 300)
    for i in range(n):
        rng = rng_for(seed, "extra", i)
        scene = sample_scene(rng)
        for fam in MME_FAMILIES:
            pair = yes_no_pair(scene, fam, rng, max_count)
            if pair:
                texts += [p + MME_SUFFIX for p in pair] + [p + SHORT_ANSWER for p in pair]
        for probes in pope_questions(scene, rng, stats).values():
            texts += [q_exists(s) for s, _ in probes]
        for q, a in conversation_turns(scene, rng, max_count=max_count):
            texts += [q, a]
    for n_ in NUMBER_WORDS:
        for s in SHAPES:
            texts.append(q_count(s, n_))
    texts += ["USER: Describe ASSISTANT: Yes", "ASSISTANT: No USER:"] * 20
    return texts
