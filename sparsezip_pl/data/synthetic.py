"""A synthetic visual world for the demo: coloured shapes on cluttered backgrounds.

Every image is 336x336 RGB: a textured, noisy background with faint distractor strokes (never
objects) and a few coloured shapes of varied size, some small enough to cover only a handful of
14-pixel patches. Each shape category has its own fill pattern (stripes, dots, grid, ...) drawn
in the object's colour and a darker shade of it. Scenes follow a generative process with *themes*: each scene draws a theme and
most of its objects come from that theme's shapes, so some shapes co-occur far more often than
others (which makes POPE's ``adversarial`` split meaningful), and shapes have unequal base
frequencies (which makes ``popular`` meaningful).

From the scenes come yes/no questions that mirror MME's ``existence``, ``count``, ``color`` and
``position`` subtasks (pairs: one "Yes", one "No"; count pairs are balanced so that their text
alone answers at chance, see ``count_pair``), POPE's ``random`` / ``popular`` /
``adversarial`` object probing, and LLaVA-Instruct style multi-turn conversations. Files are
written in the official layouts (see docs/formats.md) so the project's real loaders read them unchanged.

Everything is deterministic given the seed: each image draws from its own generator seeded by
``(seed, purpose, index)``, so the same seed yields byte-identical files.

    python -m sparsezip_pl.data.synthetic --out data/generated/synth --seed 0

The lab that trained the shipped tiny model on this world (``examples/tiny_llava``) reads more
from the same scenes -- per-patch labels, each object's patches, the tokenizer corpus -- in its
``training_world.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 x 24 = 576 patches

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "moon", "heart")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
COLORS = {
    "red": (214, 36, 36),
    "green": (36, 156, 58),
    "blue": (38, 78, 214),
    "yellow": (236, 206, 32),
    "purple": (142, 56, 182),
    "orange": (242, 128, 24),
}
COLOR_NAMES = tuple(COLORS)
# Co-occurrence structure: a scene draws one theme; most of its objects come from it.
THEMES = (("circle", "ring", "moon"), ("square", "diamond", "cross"), ("triangle", "star", "heart"))
# Unequal base frequencies (POPE "popular" negatives are the most frequent absent shapes).
POPULARITY = {"circle": 6.0, "square": 5.0, "triangle": 4.0, "star": 3.5, "cross": 3.0,
              "ring": 2.5, "diamond": 2.0, "moon": 1.5, "heart": 1.5}
# Each shape has its own fill pattern (object colour and a darker shade of it), as real object
# categories have their own surfaces: the category is visible inside every patch an object covers,
# not only along its outline, which a tiny ViT trained from scratch on a CPU could not learn in time.
FILLS = {"circle": "solid", "square": "grid", "triangle": "hstripes", "star": "dots",
         "cross": "vstripes", "ring": "concentric", "diamond": "checker", "moon": "diag1",
         "heart": "diag2"}
THEME_PROB = 0.8
MAX_PER_SHAPE = 3
# "four" stays a word of the shipped tokenizer (and of the training heads sized by this table), but
# no question asks it: the world never holds four of a shape (see count_pair).
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

MME_SUFFIX = " Please answer yes or no."
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MME_FAMILIES = ("existence", "count", "color", "position")
POPE_SPLITS = ("random", "popular", "adversarial")

# Generator purposes: every (seed, purpose, index) triple names one independent random stream.
_PURPOSE = {"mme": 1, "pope": 2, "instruct": 3, "stats": 4, "train": 5, "extra": 6}


@dataclass
class Obj:
    shape: str
    color: str
    cx: float
    cy: float
    size: float  # edge of the bounding box in pixels

    @property
    def small(self) -> bool:
        return self.size < 38


@dataclass
class Scene:
    objects: list[Obj]
    theme: int
    style: dict = field(default_factory=dict)

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def present(self) -> list[str]:
        return [s for s in SHAPES if self.count(s) > 0]

    def absent(self) -> list[str]:
        return [s for s in SHAPES if self.count(s) == 0]


def rng_for(seed: int, purpose: str, index: int) -> np.random.Generator:
    """The independent random stream of one item."""
    return np.random.default_rng([int(seed), _PURPOSE[purpose], int(index)])


# ----------------------------------------------------------------------------- scenes


def _pick_shape(rng: np.random.Generator, theme: int) -> str:
    pool = THEMES[theme] if rng.random() < THEME_PROB else SHAPES
    w = np.array([POPULARITY[s] for s in pool])
    return pool[rng.choice(len(pool), p=w / w.sum())]


def _place(rng: np.random.Generator, objects: list[Obj], size: float, tries: int = 200):
    """A centre for a new object of bounding box ``size`` that overlaps nothing placed so far."""
    half = size / 2
    for _ in range(tries):
        cx = rng.uniform(half + 4, IMAGE_SIZE - half - 4)
        cy = rng.uniform(half + 4, IMAGE_SIZE - half - 4)
        if all(abs(cx - o.cx) > half + o.size / 2 + 8 or abs(cy - o.cy) > half + o.size / 2 + 8
               for o in objects):
            return cx, cy
    return None


def _size(rng: np.random.Generator, p_small: float = 0.45) -> float:
    return float(rng.uniform(26, 36) if rng.random() < p_small else rng.uniform(42, 84))


def sample_scene(rng: np.random.Generator, force_count: tuple[str, int] | None = None,
                 pinned_sizes: list[float] | None = None) -> Scene:
    """Sample a scene: a theme, 2-5 objects (``force_count=(shape, n)`` pins one shape's count;
    ``pinned_sizes``, n bounding-box edges, fixes the sizes of those pinned instances: the training
    lab's area-matched counting scenes)."""
    theme = int(rng.integers(len(THEMES)))
    n = int(rng.integers(2, 6))
    shapes: list[str] = []
    if force_count is not None:
        shapes += [force_count[0]] * force_count[1]
        n = max(n, force_count[1] + int(rng.integers(1, 3)))
    while len(shapes) < n:
        s = _pick_shape(rng, theme)
        if shapes.count(s) >= MAX_PER_SHAPE or (force_count is not None and s == force_count[0]):
            continue
        shapes.append(s)
    objects: list[Obj] = []
    fixed = list(pinned_sizes) if force_count is not None and pinned_sizes is not None else []
    for s in shapes:
        pinned = force_count is not None and s == force_count[0]
        given = pinned and bool(fixed)
        size = fixed.pop() if given else _size(rng)
        pos = _place(rng, objects, size)
        if pos is None and not given:  # crowded: retry small, else skip (only non-pinned objects may be skipped)
            size = _size(rng, 1.0)
            pos = _place(rng, objects, size)
        if pos is None:
            if pinned:
                return sample_scene(rng, force_count, pinned_sizes)
            continue
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        objects.append(Obj(s, color, pos[0], pos[1], size))
    order = rng.permutation(len(objects))
    style = {
        "base": [float(v) for v in rng.uniform(110, 215) + rng.uniform(-22, 22, 3)],
        "grad": [float(v) for v in rng.uniform(-30, 30, 2)],
        "blotch": int(rng.integers(1 << 30)),
        "strokes": int(rng.integers(6, 16)),
        "stroke_seed": int(rng.integers(1 << 30)),
        "noise_seed": int(rng.integers(1 << 30)),
    }
    return Scene([objects[i] for i in order], theme, style)


# ----------------------------------------------------------------------------- rendering


def shape_mask(shape: str, cx: float, cy: float, size: float):
    """A binary ("L") mask of one shape on a local box; returns (mask, (x0, y0)): the pixels
    ``render`` paints with the object's fill."""
    x0, y0 = int(cx - size / 2) - 2, int(cy - size / 2) - 2
    w = int(size) + 6
    m = Image.new("L", (w, w), 0)
    d = ImageDraw.Draw(m)
    cx, cy, r = cx - x0, cy - y0, size / 2
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = r * 0.86
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=255)
    elif shape == "cross":
        w_ = 0.36 * r
        d.rectangle([cx - r, cy - w_, cx + r, cy + w_], fill=255)
        d.rectangle([cx - w_, cy - r, cx + w_, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)], fill=255)
    elif shape == "moon":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy, ri = cx + 0.5 * r, cy - 0.25 * r, 0.82 * r
        d.ellipse([ox - ri, oy - ri, ox + ri, oy + ri], fill=0)
    elif shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16.5, cy - (y + 2.5) * r / 16.5))
        d.polygon(pts, fill=255)
    else:
        raise ValueError(shape)
    return m, (x0, y0)


def _fill(pattern: str, w: int, cx: float, cy: float) -> np.ndarray:
    """A [w, w] 0/1 map: 1 = object colour, 0 = its darker shade (period 6 px)."""
    y, x = np.mgrid[0:w, 0:w]
    if pattern == "solid":
        return np.ones((w, w), bool)
    if pattern == "hstripes":
        return (y // 3) % 2 == 0
    if pattern == "vstripes":
        return (x // 3) % 2 == 0
    if pattern == "diag1":
        return ((x + y) // 3) % 2 == 0
    if pattern == "diag2":
        return ((x - y) // 3) % 2 == 0
    if pattern == "checker":
        return ((x // 3) + (y // 3)) % 2 == 0
    if pattern == "dots":
        return ~(((x % 6) < 3) & ((y % 6) < 3))
    if pattern == "grid":
        return ((x % 6) > 1) & ((y % 6) > 1)
    if pattern == "concentric":
        return (np.hypot(x - cx, y - cy) // 3) % 2 == 0
    raise ValueError(pattern)


def _background(style: dict) -> Image.Image:
    """Textured background (smooth colour field + gradient) with faint distractor strokes."""
    s = IMAGE_SIZE
    base = np.array(style["base"], dtype=np.float32)
    n = 8
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    brng = np.random.default_rng(style["blotch"])
    low = base + (style["grad"][0] * xx + style["grad"][1] * yy)[..., None]
    low = low + brng.normal(0, 16, (n, n, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((s, s), Image.BICUBIC)
    # faint, desaturated strokes: lines and arcs in tones close to the background
    draw = ImageDraw.Draw(img, "RGBA")
    srng = np.random.default_rng(style["stroke_seed"])
    for _ in range(style["strokes"]):
        tone = float(np.clip(base.mean() + srng.uniform(-55, 55), 0, 255))
        col = tuple(int(np.clip(tone + srng.uniform(-10, 10), 0, 255)) for _ in range(3))
        width = int(srng.integers(1, 3))
        alpha = int(srng.uniform(70, 140))
        x0, y0 = srng.uniform(0, s, 2)
        if srng.random() < 0.6:
            x1, y1 = x0 + srng.uniform(-150, 150), y0 + srng.uniform(-150, 150)
            draw.line([(x0, y0), (x1, y1)], fill=col + (alpha,), width=width)
        else:
            rad = srng.uniform(20, 90)
            a0 = srng.uniform(0, 360)
            draw.arc([x0 - rad, y0 - rad, x0 + rad, y0 + rad], a0, a0 + srng.uniform(40, 160),
                     fill=col + (alpha,), width=width)
    return img


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a uint8 HxWx3 array."""
    img = _background(scene.style)
    jitter = np.random.default_rng(scene.style["noise_seed"] + 1)
    for o in scene.objects:
        m, (x0, y0) = shape_mask(o.shape, o.cx, o.cy, o.size)
        col = np.clip(np.array(COLORS[o.color], np.float32) + jitter.uniform(-14, 14, 3), 0, 255)
        w = m.size[0]
        pattern = _fill(FILLS[o.shape], w, o.cx - x0, o.cy - y0)
        fill = np.where(pattern[..., None], col, col * 0.55).astype(np.uint8)
        img.paste(Image.fromarray(fill), (x0, y0), m)
    nrng = np.random.default_rng(scene.style["noise_seed"])
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + nrng.integers(-9, 10, arr.shape, dtype=np.int16)  # triangular pixel noise, std ~7.7
    arr += nrng.integers(-9, 10, arr.shape, dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG-encode an image deterministically (no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- questions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def q_exists(shape: str) -> str:
    return f"Is there {_article(shape)} {shape} in the image?"


def q_count(shape: str, n: int) -> str:
    if n == 1:
        return f"Is there exactly one {shape} in the image?"
    return f"Are there exactly {NUMBER_WORDS[n]} {PLURALS[shape]} in the image?"


def _count_neighbours(n: int, max_count: int = MAX_PER_SHAPE) -> list[int]:
    return [m for m in (n - 1, n + 1) if 1 <= m <= max_count]


def draw_pinned_count(rng: np.random.Generator) -> int:
    """How many of a shape a count scene pins: n in 1..MAX_PER_SHAPE, weighted by n's neighbours.

    With the wrong count of :func:`count_pair` a neighbour of the true one, this weighting (1:2:1 for
    counts 1..3) makes every number word the right answer exactly as often as the wrong one, so the
    question text alone answers count pairs at chance.
    """
    weights = np.array([len(_count_neighbours(n)) for n in range(1, MAX_PER_SHAPE + 1)], dtype=float)
    return 1 + int(rng.choice(MAX_PER_SHAPE, p=weights / weights.sum()))


def count_pair(shape: str, n: int, rng: np.random.Generator, max_count: int = MAX_PER_SHAPE) -> tuple[str, str]:
    """``(yes, no)`` count questions about ``shape`` shown ``n`` times; the wrong count is n - 1 or
    n + 1, never above ``max_count``: by default never a count the world cannot hold, which the text
    alone would give away."""
    wrong = _count_neighbours(n, max_count)
    return q_count(shape, n), q_count(shape, wrong[int(rng.integers(len(wrong)))])


def q_color(shape: str, color: str) -> str:
    return f"Is there {_article(color)} {color} {shape} in the image?"


_SIDES = {"left": "on the left side", "right": "on the right side",
          "top": "in the upper part", "bottom": "in the lower part"}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def q_position(shape: str, side: str) -> str:
    return f"Is the {shape} {_SIDES[side]} of the image?"


def _sides(o: Obj, margin: float = 36.0) -> list[str]:
    """The sides of the image an object is clearly on (its centre at least ``margin`` off-centre)."""
    c = IMAGE_SIZE / 2
    out = []
    if abs(o.cx - c) >= margin:
        out.append("left" if o.cx < c else "right")
    if abs(o.cy - c) >= margin:
        out.append("top" if o.cy < c else "bottom")
    return out


def yes_no_pair(scene: Scene, family: str, rng: np.random.Generator, max_count: int = MAX_PER_SHAPE):
    """One MME-style pair ``(yes_question, no_question)`` for ``family``, or None if impossible
    (``max_count``: see :func:`count_pair`)."""
    present, absent = scene.present(), scene.absent()
    if family == "existence":
        if not present or not absent:
            return None
        if rng.random() < 0.5:  # favour the smallest object: what careless token dropping loses
            yes = min(scene.objects, key=lambda o: o.size).shape
        else:
            yes = present[int(rng.integers(len(present)))]
        mates = [s for s in absent if any(s in t and p in t for t in THEMES for p in present)]
        pool = mates if (mates and rng.random() < 0.5) else absent
        no = pool[int(rng.integers(len(pool)))]
        return q_exists(yes), q_exists(no)
    if family == "count":
        if not present:
            return None
        shape = present[int(rng.integers(len(present)))]
        return count_pair(shape, scene.count(shape), rng, max_count)
    if family == "color":
        if not scene.objects:
            return None
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        used = {p.color for p in scene.objects if p.shape == o.shape}
        other = [c for c in COLOR_NAMES if c not in used]
        return q_color(o.shape, o.color), q_color(o.shape, other[int(rng.integers(len(other)))])
    if family == "position":
        cands = [(o, s) for o in scene.objects if scene.count(o.shape) == 1 for s in _sides(o)]
        if not cands:
            return None
        o, side = cands[int(rng.integers(len(cands)))]
        return q_position(o.shape, side), q_position(o.shape, _OPPOSITE[side])
    raise ValueError(family)


def mme_scene(rng: np.random.Generator, family: str) -> tuple[Scene, tuple[str, str]]:
    """A scene plus a valid question pair for one MME family (resampled until one exists)."""
    while True:
        force = None
        if family == "count":
            force = (SHAPES[int(rng.integers(len(SHAPES)))], draw_pinned_count(rng))
        scene = sample_scene(rng, force)
        if family == "count":  # ask about the pinned shape, so the number words stay balanced
            return scene, count_pair(force[0], scene.count(force[0]), rng)
        pair = yes_no_pair(scene, family, rng)
        if pair is not None:
            return scene, pair


# ----------------------------------------------------------------------------- POPE statistics


def world_statistics(seed: int, n: int = 3000) -> dict:
    """Object frequency and co-occurrence counts over ``n`` sampled scenes (annotations only)."""
    freq = {s: 0 for s in SHAPES}
    cooc = {a: {b: 0 for b in SHAPES} for a in SHAPES}
    for i in range(n):
        present = sample_scene(rng_for(seed, "stats", i)).present()
        for a in present:
            freq[a] += 1
            for b in present:
                if a != b:
                    cooc[a][b] += 1
    return {"frequency": freq, "cooccurrence": cooc}


def pope_negatives(present: list[str], split: str, k: int, stats: dict, rng: np.random.Generator):
    """``k`` absent shapes chosen by POPE's rule for ``split``."""
    absent = [s for s in SHAPES if s not in present]
    if split == "random":
        return [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
    if split == "popular":
        key = lambda s: (-stats["frequency"][s], SHAPES.index(s))  # noqa: E731
    elif split == "adversarial":
        key = lambda s: (-sum(stats["cooccurrence"][p][s] for p in present), SHAPES.index(s))  # noqa: E731
    else:
        raise ValueError(split)
    return sorted(absent, key=key)[:k]


def pope_questions(scene: Scene, rng: np.random.Generator, stats: dict, n_pos: int = 3):
    """POPE probes for one scene: ``{split: [(shape, "yes"|"no"), ...]}`` balanced per image."""
    present = scene.present()
    pos = [present[i] for i in rng.permutation(len(present))[:n_pos]]
    out = {}
    for split in POPE_SPLITS:
        neg = pope_negatives(present, split, len(pos), stats, rng)
        out[split] = [(s, "yes") for s in pos] + [(s, "no") for s in neg]
    return out


# ----------------------------------------------------------------------------- conversations


def _where(o: Obj) -> str:
    c, m = IMAGE_SIZE / 2, 36
    v = "upper " if o.cy < c - m else ("lower " if o.cy > c + m else "")
    h = "left" if o.cx < c - m else ("right" if o.cx > c + m else "")
    if not v and not h:
        return "in the center of the image"
    if not h:
        return f"in the {v}part of the image"
    return f"in the {v}{h} part of the image"


def describe(scene: Scene) -> str:
    """A one-sentence description listing the objects from left to right."""
    groups: dict[tuple[str, str], int] = {}
    for o in sorted(scene.objects, key=lambda o: o.cx):
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    parts = [f"{_article(c)} {c} {s}" if n == 1 else f"{NUMBER_WORDS[n]} {c} {PLURALS[s]}"
             for (c, s), n in groups.items()]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The image shows {listing}."


def conversation_turns(scene: Scene, rng: np.random.Generator, n_turns: int | None = None,
                       max_count: int = MAX_PER_SHAPE):
    """A multi-turn conversation about a scene: list of ``(question, answer)`` (``max_count``: see
    :func:`count_pair`)."""
    present, absent = scene.present(), scene.absent()
    makers = []

    def describe_t():
        q = ["What shapes are in the image?", "Describe the image briefly.",
             "What objects can you see?"][int(rng.integers(3))]
        return q, describe(scene)

    def count_t():
        s = SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.3 else present[int(rng.integers(len(present)))]
        n = scene.count(s)
        a = (f"There are no {PLURALS[s]}." if n == 0 else
             f"There is one {s}." if n == 1 else f"There are {NUMBER_WORDS[n]} {PLURALS[s]}.")
        return f"How many {PLURALS[s]} are there?", a

    def color_t():
        uniq = [o for o in scene.objects if scene.count(o.shape) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return f"What color is the {o.shape}?", f"The {o.shape} is {o.color}."

    def where_t():
        uniq = [o for o in scene.objects if scene.count(o.shape) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return f"Where is the {o.shape}?", f"The {o.shape} is {_where(o)}."

    def yesno_sentence_t():
        if rng.random() < 0.5 and present:
            s = present[int(rng.integers(len(present)))]
            o = next(o for o in scene.objects if o.shape == s)
            return q_exists(s), f"Yes, there is {_article(o.color)} {o.color} {s} in the image."
        s = absent[int(rng.integers(len(absent)))]
        return q_exists(s), f"No, there is no {s} in the image."

    def yesno_short_t():
        fam = MME_FAMILIES[int(rng.integers(len(MME_FAMILIES)))]
        pair = yes_no_pair(scene, fam, rng, max_count)
        if pair is None:
            return None
        k = int(rng.integers(2))
        return pair[k] + SHORT_ANSWER, ("Yes", "No")[k]

    makers = [describe_t, count_t, color_t, where_t, yesno_sentence_t, yesno_short_t]
    n_turns = n_turns or int(rng.integers(2, 5))
    turns = []
    for _ in range(50):
        if len(turns) >= n_turns:
            break
        t = makers[int(rng.integers(len(makers)))]()
        if t is not None and t[0] not in [q for q, _ in turns]:
            turns.append(t)
    return turns


def to_llava_record(rec_id: str, image: str, turns) -> dict:
    """LLaVA-Instruct record; ``<image>`` opens the first human turn."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rec_id, "image": image, "conversations": conv}


# ----------------------------------------------------------------------------- the world on disk


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def mme_scenes(seed: int, n_mme_images: int):
    """Yield ``(family, "NNNN", scene, (yes_question, no_question))`` for every MME-style image of
    the world of ``seed``, in the order (and so with the draws) ``generate_world`` writes them."""
    counter = 0
    for family in MME_FAMILIES:
        for i in range(n_mme_images):
            scene, questions = mme_scene(rng_for(seed, "mme", counter), family)
            counter += 1
            yield family, f"{i:04d}", scene, questions


def generate_world(root: str | os.PathLike, seed: int = 0, n_mme_images: int = 30,
                   n_pope_images: int = 50, n_instruct: int = 100) -> dict:
    """Write a synthetic MME / POPE / instruction set under ``root``; return the paths.

    ``n_mme_images`` images per MME subtask (two questions each), ``n_pope_images`` images probed
    by each of the three POPE splits, ``n_instruct`` conversation records.
    """
    root = Path(root)
    mme_root = root / "MME_Benchmark_release_version"
    pope_root = root / "pope"
    pope_images = pope_root / "val2014"
    instruct_root = root / "instruct"

    for family, name, scene, (yes_q, no_q) in mme_scenes(seed, n_mme_images):
        _write(mme_root / family / f"{name}.jpg", jpeg_bytes(render(scene)))
        txt = f"{yes_q}{MME_SUFFIX}\tYes\n{no_q}{MME_SUFFIX}\tNo\n"
        _write(mme_root / family / f"{name}.txt", txt.encode())

    stats = world_statistics(seed)
    lines = {s: [] for s in POPE_SPLITS}
    for i in range(n_pope_images):
        rng = rng_for(seed, "pope", i)
        scene = sample_scene(rng)
        while len(scene.present()) < 2:
            scene = sample_scene(rng)
        image = f"COCO_val2014_{i + 1:012d}.jpg"
        _write(pope_images / image, jpeg_bytes(render(scene)))
        for split, probes in pope_questions(scene, rng, stats).items():
            for shape, label in probes:
                lines[split].append({"question_id": len(lines[split]) + 1, "image": image,
                                     "text": q_exists(shape), "label": label})
    pope_files = {}
    for split in POPE_SPLITS:
        p = pope_root / f"coco_pope_{split}.json"
        _write(p, "".join(json.dumps(r) + "\n" for r in lines[split]).encode())
        pope_files[split] = str(p)

    records = []
    for i in range(n_instruct):
        rng = rng_for(seed, "instruct", i)
        scene = sample_scene(rng)
        rel = f"images/synth_{i:06d}.jpg"
        _write(instruct_root / rel, jpeg_bytes(render(scene)))
        records.append(to_llava_record(f"synth_{i:06d}", rel, conversation_turns(scene, rng)))
    instruct_json = instruct_root / "synth_instruct.json"
    _write(instruct_json, json.dumps(records, indent=1).encode())

    meta = {"seed": seed, "shapes": list(SHAPES), "colors": COLORS, "themes": THEMES,
            "popularity": POPULARITY, "n_mme_images": n_mme_images,
            "n_pope_images": n_pope_images, "n_instruct": n_instruct, "statistics": stats}
    _write(root / "world.json", json.dumps(meta, indent=1).encode())
    return {
        "root": str(root),
        "mme_root": str(mme_root),
        "pope_root": str(pope_root),
        "pope_image_folder": str(pope_images),
        "pope_files": pope_files,
        "instruct_json": str(instruct_json),
        "instruct_image_folder": str(instruct_root),
        "world_json": str(root / "world.json"),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/generated/synth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-mme-images", type=int, default=30, help="images per MME subtask")
    p.add_argument("--n-pope-images", type=int, default=50)
    p.add_argument("--n-instruct", type=int, default=100)
    a = p.parse_args(argv)
    paths = generate_world(a.out, a.seed, a.n_mme_images, a.n_pope_images, a.n_instruct)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
