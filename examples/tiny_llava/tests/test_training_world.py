"""What the lab reads from the synthetic world's scenes: labels, each object's patches and anchor,
area-matched counting scenes (training_world.py)."""

from __future__ import annotations

import numpy as np

import training_world as W
from sparsezip_pl.data import synthetic as S


def test_labelled_render_is_the_worlds_image():
    """The labels come from the objects' masks; the image is the package's own render, byte for byte."""
    for index in range(4):
        scene = S.sample_scene(S.rng_for(2, "train", index))
        arr, labels = W.render_with_labels(scene)
        assert np.array_equal(arr, S.render(scene))
        assert labels["shape"].shape == (S.GRID, S.GRID) and labels["occ"].shape == (S.GRID, S.GRID, 49)
        assert (labels["shape"] > 0).sum() == (labels["color"] > 0).sum() == (labels["count"] > 0).sum() > 0
        assert labels["center"].sum() <= len(scene.objects)


def test_anchor_patch_lies_on_its_object_even_where_the_centre_is_a_hole():
    scene = S.sample_scene(S.rng_for(0, "train", 7))
    ring = S.Obj("ring", "red", 100.0, 150.0, 70.0)
    for obj in [ring, *scene.objects]:
        _, labels = W.render_with_labels(S.Scene([obj], scene.theme, scene.style))
        patch_shapes = labels["shape"].reshape(-1)
        assert patch_shapes[W.anchor_patch(obj)] == S.SHAPES.index(obj.shape) + 1, obj
    _, labels = W.render_with_labels(S.Scene([ring], scene.theme, scene.style))
    assert labels["center"].reshape(-1)[W.centre_patch(ring)] == 1
    assert labels["shape"].reshape(-1)[W.centre_patch(ring)] == 0  # the hole, where the centre target pointed


def test_first_patches_are_each_objects_top_left_patch_of_its_own():
    """A square's first patch holds its top-left corner; where a later object hides part of an
    earlier one, the earlier one's first patch is the first it still shows."""
    square = S.Obj("square", "red", 100.0, 100.0, 56.0)
    x0 = y0 = 100.0 - 28.0
    assert W.first_patches(S.Scene([square], theme=0)) == [int(y0 // S.PATCH) * S.GRID + int(x0 // S.PATCH)]
    hider = S.Obj("circle", "blue", 90.0, 90.0, 40.0)
    scene = S.Scene([square, hider], theme=0)
    owner = W.instance_map(scene)
    firsts = W.first_patches(scene)
    for i, patch in enumerate(firsts):
        assert owner[patch] == i and not (owner[:patch] == i).any()
    assert firsts[0] > W.first_patches(S.Scene([square], theme=0))[0]


def test_object_patches_are_the_patches_the_labels_give_each_object():
    scene = S.sample_scene(S.rng_for(4321, "extra", 3))
    _, labels = W.render_with_labels(scene)
    union = np.concatenate([W.object_patches(o) for o in scene.objects])
    assert sorted(union.tolist()) == np.flatnonzero(labels["shape"].reshape(-1) > 0).tolist()


def test_instance_map_gives_each_patch_the_object_its_labels_show():
    for index in range(6):
        scene = S.sample_scene(S.rng_for(5, "train", index))
        _, labels = W.render_with_labels(scene)
        owner = W.instance_map(scene)
        colours = np.array([S.COLOR_NAMES.index(o.color) + 1 for o in scene.objects])
        shapes = np.array([S.SHAPES.index(o.shape) + 1 for o in scene.objects])
        assert np.array_equal(np.where(owner >= 0, shapes[owner], 0), labels["shape"].reshape(-1))
        assert np.array_equal(np.where(owner >= 0, colours[owner], 0), labels["color"].reshape(-1))


def test_area_matched_count_scenes_hide_the_count_in_area():
    """--count-area-match scenes: the counted shape's total area has the same spread for one, two
    and three instances (in natural scenes it grows with the count), and the scene holds exactly
    the requested sizes."""
    medians = {}
    for n in (1, 2, 3):
        totals = []
        for i in range(300):
            rng = np.random.default_rng([7, n, i])
            sizes = W.area_matched_sizes(rng, n)
            scene = S.sample_scene(rng, ("star", n), sizes)
            placed = sorted(o.size for o in scene.objects if o.shape == "star")
            assert placed == sorted(sizes) and all(26 <= s <= 84 for s in sizes)
            totals.append(sum(s * s for s in placed))
        medians[n] = float(np.median(totals))
    assert max(medians.values()) < 1.15 * min(medians.values())
    natural = [sum(o.size ** 2 for o in S.sample_scene(np.random.default_rng([7, 3, i]), ("star", 3)).objects
                   if o.shape == "star") for i in range(300)]
    assert np.median(natural) > 1.3 * medians[3]
