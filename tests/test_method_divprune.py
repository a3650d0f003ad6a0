"""``divprune``: a hand-worked example, the official greedy transcribed as a loop, exact budgets
(and the published 0.098 default), batching, reruns, towers without CLS."""

import dataclasses
import math

import pytest
import torch

from method_helpers import assert_batched_equals_alone, assert_same_output, build, capture
from sparsezip_pl.compress.methods.divprune import max_min_diversity
from sparsezip_pl.compress.testing import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def divprune_one_image(features, count):
    """DivPrune's greedy for one image as the official code runs it: distance matrix 1 - cos; the
    first pick maximises each column's second-smallest entry (its smallest is the self-distance),
    later picks the column minimum over the picked rows; picks in order."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picks = []
    for i in range(count):
        if i == 0:
            scores = distance.topk(2, dim=0, largest=False).values[1]
        else:
            scores = distance[torch.tensor(picks)].min(dim=0).values
        picks.append(int(scores.argmax()))
    return picks


def test_hand_worked_example():
    # unit vectors at these angles (degrees); cosine distance grows with the angle between them
    angles = torch.tensor([0.0, 5.0, 10.0, 100.0, 200.0]) * math.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=1).unsqueeze(0)
    # 200 deg is the most isolated (nearest: 100 deg away); then the farthest from it, 10 deg
    # (170 deg away); then 100 deg (90 from 10 deg); then 0 deg (10 from 10 deg; 5 deg is 5 away)
    assert max_min_diversity(points, 4)[0].tolist() == [4, 2, 3, 0]


@pytest.mark.parametrize("n,count,dim", [(64, 16, 24), (30, 29, 8), (40, 1, 5)])
def test_equals_the_official_greedy(n, count, dim):
    features = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(n))
    picks = max_min_diversity(features, count)
    for b in range(3):
        assert picks[b].tolist() == divprune_one_image(features[b], count)


def test_method_scores_the_projector_outputs_and_keeps_the_features():
    cap = capture()
    out = build("divprune", 16)(cap)
    for b in range(3):
        expected = sorted(divprune_one_image(cap.project(cap.hidden[b, 1:]), 16))
        assert out.kept_indices[b].tolist() == expected
        assert torch.equal(out.tokens[b], cap.hidden[b, 1:][expected])  # pre-projector features
        assert torch.equal(out.positions[b], out.kept_indices[b])


@pytest.mark.parametrize("budget,tokens", [(16, 16), (0.25, 16), (63, 63), (None, 6)])
def test_budget_is_met_exactly(budget, tokens):
    method = build("divprune", budget)
    out = method(capture())
    assert method.output_length(64) == tokens and out.num_tokens.tolist() == [tokens] * 3
    assert (out.kept_indices[:, 1:] > out.kept_indices[:, :-1]).all()  # distinct, spatial order


def test_published_default_ratio_keeps_56_of_576():
    assert build("divprune", None, num_patches=576).output_length(576) == 56
    with pytest.raises(ValueError, match="divprune.ratio"):
        build("divprune", None, ratio=0.0)


def test_batched_equals_alone_reruns_and_no_cls():
    method = build("divprune", 12)
    cap = capture(batch=4)
    out = assert_batched_equals_alone(method, cap)
    assert_same_output(out, method(cap))
    cap = capture(has_cls=False)
    no_cls = build("divprune", 12, has_cls=False)(cap)
    assert no_cls.kept_indices[1].tolist() == sorted(divprune_one_image(cap.project(cap.hidden[1]), 12))


def test_without_the_projector_is_an_error_naming_it():
    with pytest.raises(ValueError, match="capture.project"):
        build("divprune", 16)(dataclasses.replace(capture(), project=None))


def test_duplicates_are_never_kept_twice():
    features = torch.randn(1, 4, 8).repeat(1, 5, 1)  # 4 distinct points, each 5 times
    picks = max_min_diversity(features, 6)[0]
    assert len(set(picks.tolist())) == 6
    assert len({int(p) % 4 for p in picks[:4]}) == 4  # the 4 distinct points come first
