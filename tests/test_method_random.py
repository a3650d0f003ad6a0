"""``random``: exact budgets, a seeded draw that is the same wherever an image sits, uniform
inclusion over seeds, and towers without CLS."""

import pytest
import torch

from method_helpers import assert_batched_equals_alone, assert_same_output, build, capture
from sparsezip_pl.compress.merge import hash_uniform
from sparsezip_pl.compress.testing import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("budget,tokens", [(16, 16), (1, 1), (64, 64), (0.25, 16), (0.1, 6)])
def test_budget_is_met_exactly(budget, tokens):
    method = build("random", budget)
    out = method(capture())
    assert method.output_length(64) == tokens
    assert out.tokens.shape[1] == tokens and out.num_tokens.tolist() == [tokens] * 3
    kept = out.kept_indices
    assert (kept[:, 1:] > kept[:, :-1]).all()  # distinct, in spatial order
    assert torch.equal(out.positions, kept)


def test_kept_patches_are_the_largest_hash_draws_and_their_features():
    cap = capture()
    out = build("random", 10, seed=5)(cap)
    expected = hash_uniform(1, 64, 5)[0].topk(10).indices.sort().values
    for b in range(3):
        assert torch.equal(out.kept_indices[b], expected)
        assert torch.equal(out.tokens[b], cap.hidden[b, 1:][expected])  # CLS dropped, features untouched


def test_batched_equals_alone_and_reruns_are_identical():
    cap = capture(batch=4)
    method = build("random", 12, seed=3)
    out = assert_batched_equals_alone(method, cap)
    assert_same_output(out, method(cap))
    assert_same_output(out, build("random", 12, seed=3)(cap))  # a new instance, same seed


def test_seeds_draw_different_subsets_with_uniform_inclusion():
    cap = capture(batch=1)
    counts = torch.zeros(64)
    subsets = set()
    for seed in range(400):
        kept = build("random", 16, seed=seed)(cap).kept_indices[0]
        counts[kept] += 1
        subsets.add(tuple(kept.tolist()))
    assert len(subsets) == 400
    # each patch kept with probability 1/4: 100 of 400 expected, binomial sd 8.7
    assert counts.min() > 100 - 5 * 8.7 and counts.max() < 100 + 5 * 8.7


def test_tower_without_cls_selects_among_all_tokens():
    cap = capture(has_cls=False)
    out = build("random", 16, has_cls=False, seed=1)(cap)
    expected = hash_uniform(1, 64, 1)[0].topk(16).indices.sort().values
    assert torch.equal(out.kept_indices[0], expected)
    assert torch.equal(out.tokens[0], cap.hidden[0][expected])


def test_budget_larger_than_the_image_is_an_error():
    with pytest.raises(ValueError, match="more than the 64"):
        build("random", 65)
    method = build("random", 40, num_patches=None)
    with pytest.raises(ValueError, match="more than the 36"):
        method(capture(num_patches=36))
