"""The synthetic world: deterministic, truthful, and written in the official MME / POPE / LLaVA layouts."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsezip_pl.data import synthetic as S

SMALL = dict(n_mme_images=3, n_pope_images=4, n_instruct=3)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return S.generate_world(root, seed=0, **SMALL)


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = S.generate_world(tmp_path / "again", seed=0, **SMALL)
    other = S.generate_world(tmp_path / "other", seed=5, **SMALL)
    a, b, c = _digest(Path(world["root"])), _digest(Path(again["root"])), _digest(Path(other["root"]))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in images)


def test_mme_layout(world):
    root = Path(world["mme_root"])
    assert root.name == "MME_Benchmark_release_version"
    assert sorted(p.name for p in root.iterdir()) == sorted(S.MME_FAMILIES)
    for fam in S.MME_FAMILIES:
        txts = sorted((root / fam).glob("*.txt"))
        assert len(txts) == SMALL["n_mme_images"]
        for txt in txts:
            img = Image.open(txt.with_suffix(".jpg"))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (336, 336)
            lines = txt.read_text().splitlines()
            assert len(lines) == 2
            rows = [line.split("\t") for line in lines]
            assert all(len(r) == 2 for r in rows)
            assert sorted(a for _, a in rows) == ["No", "Yes"]  # a pair: one yes, one no
            assert all(q.endswith(" Please answer yes or no.") for q, _ in rows)


def test_pope_layout_and_negative_rules(world):
    stats = json.loads(Path(world["world_json"]).read_text())["statistics"]
    positives = {}
    for split in S.POPE_SPLITS:
        path = Path(world["pope_files"][split])
        assert path.name == f"coco_pope_{split}.json"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["question_id"] for r in recs] == list(range(1, len(recs) + 1))
        by_image: dict = {}
        for r in recs:
            assert set(r) == {"question_id", "image", "text", "label"}
            assert re.fullmatch(r"COCO_val2014_\d{12}\.jpg", r["image"])
            assert (Path(world["pope_image_folder"]) / r["image"]).is_file()
            m = re.fullmatch(r"Is there an? (\w+) in the image\?", r["text"])
            assert m and m.group(1) in S.SHAPES and r["label"] in ("yes", "no")
            by_image.setdefault(r["image"], []).append((m.group(1), r["label"]))
        for image, probes in by_image.items():
            yes = [s for s, lab in probes if lab == "yes"]
            no = [s for s, lab in probes if lab == "no"]
            assert len(yes) == len(no) >= 2 and not set(yes) & set(no)
            positives.setdefault(image, []).append(sorted(yes))
            if split == "popular":  # the most frequent shapes among the absent ones
                absent_rank = [s for s in sorted(S.SHAPES, key=lambda s: -stats["frequency"][s])]
                assert all(absent_rank.index(s) <= absent_rank.index(t)
                           for s in no for t in absent_rank if t not in no and t not in yes)
    assert all(len({tuple(p) for p in v}) == 1 for v in positives.values())  # same positives per split


def test_instruction_layout(world):
    recs = json.loads(Path(world["instruct_json"]).read_text())
    assert isinstance(recs, list) and len(recs) == SMALL["n_instruct"]
    for r in recs:
        assert set(r) == {"id", "image", "conversations"}
        assert (Path(world["instruct_image_folder"]) / r["image"]).is_file()
        conv = r["conversations"]
        assert len(conv) >= 4 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])


def test_questions_are_true_to_the_scene():
    for i in range(200):
        rng = S.rng_for(3, "extra", i)
        scene = S.sample_scene(rng)
        for fam in S.MME_FAMILIES:
            pair = S.yes_no_pair(scene, fam, rng)
            if pair is None:
                continue
            for q, truth in zip(pair, (True, False)):
                if fam == "existence":
                    shape = re.search(r"an? (\w+) in", q).group(1)
                    assert (scene.count(shape) > 0) == truth
                elif fam == "count":
                    m = re.search(r"exactly (\w+) (\w+) in", q)
                    n = {v: k for k, v in S.NUMBER_WORDS.items()}[m.group(1)]
                    shape = m.group(2) if n == 1 else {v: k for k, v in S.PLURALS.items()}[m.group(2)]
                    assert (scene.count(shape) == n) == truth
                elif fam == "color":
                    color, shape = re.search(r"an? (\w+) (\w+) in", q).groups()
                    assert any(o.shape == shape and o.color == color for o in scene.objects) == truth
                else:
                    shape = re.search(r"the (\w+) (on|in)", q).group(1)
                    o = next(o for o in scene.objects if o.shape == shape)
                    side = ("left" if "left" in q else "right" if "right" in q else
                            "top" if "upper" in q else "bottom")
                    actual = {"left": o.cx < 168, "right": o.cx > 168, "top": o.cy < 168, "bottom": o.cy > 168}
                    assert actual[side] == truth


def _count_words(question: str) -> tuple[str, str]:
    m = re.search(r"exactly (\w+) (\w+) in", question)
    return m.group(1), m.group(2)


def test_count_pairs_cannot_be_answered_from_the_text():
    """Each number word is the right answer as often as the wrong one, and no count the world cannot
    hold is asked (a question about four was always "No", whatever the image)."""
    asked = {w: {"Yes": 0, "No": 0} for w in S.NUMBER_WORDS.values()}
    for i in range(3000):
        scene, (yes_q, no_q) = S.mme_scene(S.rng_for(5, "extra", i), "count")
        (yes_word, shape), (no_word, _) = _count_words(yes_q), _count_words(no_q)
        n = {v: k for k, v in S.NUMBER_WORDS.items()}[yes_word]
        assert scene.count(shape if n == 1 else {v: k for k, v in S.PLURALS.items()}[shape]) == n
        asked[yes_word]["Yes"] += 1
        asked[no_word]["No"] += 1
    assert asked["four"] == {"Yes": 0, "No": 0}
    for word in ("one", "two", "three"):
        share_yes = asked[word]["Yes"] / (asked[word]["Yes"] + asked[word]["No"])
        assert abs(share_yes - 0.5) < 0.04, (word, asked[word])
    # the best text-only answerer (the majority answer of each number word) is at chance
    majority = sum(max(c.values()) for c in asked.values())
    assert majority / (2 * 3000) < 0.53


def test_question_pairs_never_ask_a_count_beyond_what_the_world_holds():
    for i in range(400):
        rng = S.rng_for(6, "extra", i)
        pair = S.yes_no_pair(S.sample_scene(rng), "count", rng)
        if pair is not None:
            assert all(_count_words(q)[0] != S.NUMBER_WORDS[S.MAX_PER_SHAPE + 1] for q in pair)


def _object_pixels(scene) -> np.ndarray:
    """[336, 336] bool: the pixels ``render`` paints with an object's fill."""
    out = np.zeros((S.IMAGE_SIZE, S.IMAGE_SIZE), bool)
    for o in scene.objects:
        m, (x0, y0) = S.shape_mask(o.shape, o.cx, o.cy, o.size)
        mask = np.zeros((S.IMAGE_SIZE + 200, S.IMAGE_SIZE + 200), bool)  # a mask box may cross the border
        mask[y0 + 100: y0 + 100 + m.size[1], x0 + 100: x0 + 100 + m.size[0]] = np.asarray(m) > 127
        out |= mask[100:-100, 100:-100]
    return out


def test_world_has_small_objects_clutter_and_cooccurrence():
    scene = S.sample_scene(S.rng_for(0, "extra", 0))
    arr = S.render(scene)
    assert arr.shape == (336, 336, 3) and arr.dtype == np.uint8
    sizes = [o.size for i in range(60) for o in S.sample_scene(S.rng_for(0, "extra", i)).objects]
    assert min(sizes) < 30 and sum(s < 38 for s in sizes) / len(sizes) > 0.25  # a few patches only
    # background is not flat: clutter everywhere, even where there is no object
    bg = arr[~_object_pixels(scene)]
    assert bg.std(0).mean() > 8
    stats = S.world_statistics(0, 600)
    c = stats["cooccurrence"]
    same = np.mean([c[a][b] for t in S.THEMES for a in t for b in t if a != b])
    cross = np.mean([c[a][b] for a in S.SHAPES for b in S.SHAPES
                     if a != b and not any(a in t and b in t for t in S.THEMES)])
    assert same > 2 * cross


def test_cli(tmp_path, capsys):
    S.main(["--out", str(tmp_path / "w"), "--seed", "2", "--n-mme-images", "1", "--n-pope-images", "2",
            "--n-instruct", "1"])
    paths = json.loads(capsys.readouterr().out)
    assert Path(paths["pope_files"]["adversarial"]).is_file()
