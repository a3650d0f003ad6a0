"""oracle_selection.py: the scenes it regenerates are the world's, its selection is the oracle's."""

import numpy as np
import pytest

import training_world as W
from sparsezip_pl.data import synthetic as S


@pytest.fixture
def oracle():
    import oracle_selection

    return oracle_selection


def test_world_scenes_are_the_ones_the_world_was_drawn_from(oracle, tmp_path):
    world = S.generate_world(tmp_path / "w", seed=11, n_mme_images=2, n_pope_images=1, n_instruct=0)
    root = tmp_path / "w" / "MME_Benchmark_release_version"
    assert world["mme_root"].endswith("MME_Benchmark_release_version")
    scenes = oracle.world_scenes(root, seed=11)
    assert sorted(scenes) == sorted(f"{f}/{i:04d}.jpg" for f in S.MME_FAMILIES for i in range(2))
    assert all(S.jpeg_bytes(S.render(scene)) == (root / key).read_bytes() for key, scene in scenes.items())
    with pytest.raises(ValueError, match="seed 12"):
        oracle.world_scenes(root, seed=12)


def test_oracle_keeps_object_patches_first_then_spreads_the_rest(oracle):
    scene = S.Scene([S.Obj("circle", "red", 60, 60, 40), S.Obj("star", "blue", 250, 250, 30)], theme=0)
    on_objects = set(np.flatnonzero(W.instance_map(scene) >= 0).tolist())
    keep = oracle.oracle_patches(scene, 64)
    assert len(keep) == 64 == len(set(keep.tolist())) and np.all(np.diff(keep) > 0)
    assert on_objects <= set(keep.tolist())
    background = sorted(set(keep.tolist()) - on_objects)
    assert background[0] < 100 and background[-1] > 475  # spread over the whole grid, not bunched
    few = oracle.oracle_patches(scene, 8)
    assert len(few) == 8 and set(few.tolist()) < set(keep.tolist())
