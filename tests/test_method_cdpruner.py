"""``cdpruner``: the fast greedy MAP against a greedy over brute-force log-determinants, the
substitute relevance worked by hand, exact budgets, batching, reruns, towers without CLS, and
kernels of low rank."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from method_helpers import assert_batched_equals_alone, assert_same_output, build, capture
from sparsezip_pl.compress.methods.cdpruner import greedy_map, question_relevance
from sparsezip_pl.compress.testing import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def greedy_by_determinants(kernel, count):
    """Greedy MAP the slow way: each step adds the item whose addition gives the largest
    det(L_S) (float64 determinants of the submatrices)."""
    kernel = kernel.double()
    picks = []
    for _ in range(count):
        candidates = [j for j in range(kernel.shape[0]) if j not in picks]
        dets = [torch.linalg.det(kernel[picks + [j]][:, picks + [j]]) for j in candidates]
        picks.append(candidates[int(torch.stack(dets).argmax())])
    return picks


def random_kernel(batch, n, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    unit = F.normalize(torch.randn(batch, n, dim, generator=gen), dim=-1)
    relevance = torch.rand(batch, n, generator=gen) + 0.05
    return relevance.unsqueeze(2) * (unit @ unit.transpose(1, 2)) * relevance.unsqueeze(1)


@pytest.mark.parametrize("n,count,dim", [(8, 3, 16), (10, 6, 12), (12, 4, 4)])
def test_fast_greedy_equals_greedy_by_determinants(n, count, dim):
    kernel = random_kernel(3, n, dim, seed=n)
    picks = greedy_map(kernel, count)
    for b in range(3):
        assert picks[b].tolist() == greedy_by_determinants(kernel[b], count)


def test_the_first_pick_is_the_global_optimum_of_one_item_and_the_search_is_exhaustive_for_two():
    """For K = 1 greedy is exact; for K = 2 compare with all pairs on a kernel where the best
    pair contains the best single item (one very relevant patch)."""
    kernel = random_kernel(1, 9, 16, seed=3)[0]
    kernel[0] *= 3.0
    kernel[:, 0] *= 3.0
    assert greedy_map(kernel[None], 1)[0].tolist() == [int(kernel.diagonal().argmax())] == [0]
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
    best = max(pairs, key=lambda p: float(torch.linalg.det(kernel[list(p)][:, list(p)].double())))
    assert sorted(greedy_map(kernel[None], 2)[0].tolist()) == list(best)


def test_low_rank_kernel_gives_distinct_picks_and_no_nan():
    unit = F.normalize(torch.randn(1, 3, 8), dim=-1).repeat(1, 4, 1)  # rank 3, 12 items
    picks = greedy_map(unit @ unit.transpose(1, 2), 7)[0]
    assert len(set(picks.tolist())) == 7
    assert len({int(p) % 3 for p in picks[:3]}) == 3  # the three directions first


def test_relevance_worked_by_hand():
    unit = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    text = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])  # the masked token must not count
    mask = torch.tensor([[True, True, False]])
    # mean of the valid tokens: (1, 0); cosines 1, 0, 0.6; min-max: (c - 0 + 1e-6) / 1
    relevance = question_relevance(unit, text, mask)
    torch.testing.assert_close(relevance, torch.tensor([[1.0, 0.0, 0.6]]) + 1e-6)
    negated = question_relevance(unit, text, mask, negate=True)  # cosines -1, 0, -0.6
    torch.testing.assert_close(negated, torch.tensor([[0.0, 1.0, 0.4]]) + 1e-6)
    no_question = question_relevance(unit, text, torch.zeros_like(mask))
    assert torch.equal(no_question, torch.ones(1, 3))


def test_method_builds_the_conditional_kernel_from_projector_outputs_and_question():
    cap = capture()
    method = build("cdpruner", 16)
    out = method(cap)
    for b in range(3):
        unit = F.normalize(cap.project(cap.hidden[b, 1:]), dim=-1)
        text = cap.text_embeds[b][cap.text_mask[b]].mean(dim=0)
        cosine = unit @ F.normalize(text, dim=0)
        relevance = (cosine - cosine.min() + 1e-6) / (cosine.max() - cosine.min())
        kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
        expected = sorted(greedy_by_determinants(kernel, 16))
        assert out.kept_indices[b].tolist() == expected
        assert torch.equal(out.tokens[b], cap.hidden[b, 1:][expected])
        torch.testing.assert_close(out.scores[b], relevance)


def test_masked_question_tokens_do_not_count_and_theta_reweights():
    cap = capture()
    base = build("cdpruner", 16)(cap)
    text = cap.text_embeds.clone()
    text[0, -1] = 100.0  # masked out in row 0
    changed = build("cdpruner", 16)(dataclasses.replace(cap, text_embeds=text))
    assert torch.equal(changed.kept_indices, base.kept_indices)
    method = build("cdpruner", 16, theta=0.5)
    kernel, relevance = method.kernel(cap)
    _, linear = build("cdpruner", 16).kernel(cap)
    torch.testing.assert_close(relevance, torch.exp(0.5 * linear))  # alpha = 0.5 / (2 * 0.5)
    with pytest.raises(ValueError, match="cdpruner.theta"):
        build("cdpruner", 16, theta=1.0)


@pytest.mark.parametrize("budget,tokens", [(16, 16), (0.25, 16), (64, 64), (None, 64)])
def test_budget_is_met_exactly(budget, tokens):
    method = build("cdpruner", budget)
    out = method(capture())
    assert method.output_length(64) == tokens and out.num_tokens.tolist() == [tokens] * 3
    assert (out.kept_indices[:, 1:] > out.kept_indices[:, :-1]).all()


def test_batched_equals_alone_reruns_and_no_cls():
    method = build("cdpruner", 14)
    cap = capture(batch=4)
    out = assert_batched_equals_alone(method, cap)
    assert_same_output(out, method(cap))
    cap = capture(has_cls=False)
    assert_batched_equals_alone(build("cdpruner", 14, has_cls=False), cap)


def test_missing_question_or_projector_is_an_error_naming_it():
    method = build("cdpruner", 16)
    with pytest.raises(ValueError, match="capture.text_embeds"):
        method(dataclasses.replace(capture(), text_embeds=None))
    with pytest.raises(ValueError, match="capture.project"):
        method(dataclasses.replace(capture(), project=None))
    assert method.needs_text and method.needs_projected
