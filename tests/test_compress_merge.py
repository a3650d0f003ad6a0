"""Contextual merging: hash noise, k-means++, agglomeration, weighted means, anchor merge."""

import pytest
import torch
import torch.nn.functional as F

from sparsezip_pl.compress.merge import (
    _first_argmax,
    agglomerate,
    assign_nearest,
    anchor_merge,
    hash_uniform,
    hierarchical_merge,
    kmeans_pp_init,
    leftover_weights,
    weighted_kmeans,
)
from sparsezip_pl.compress import merge as merge_module
from sparsezip_pl.compress.testing import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # tiny tensors: see single_thread's docstring
        yield


def test_hash_uniform_is_a_pure_function_of_position_and_seed():
    a = hash_uniform(8, 600, seed=3)
    assert torch.equal(a, hash_uniform(8, 600, seed=3))
    assert torch.equal(a[:, :100], hash_uniform(8, 100, seed=3))  # independent of N
    assert not torch.equal(a, hash_uniform(8, 600, seed=4))
    assert (a > 0).all() and (a < 1).all()
    assert abs(a.mean().item() - 0.5) < 0.02 and abs(a.var().item() - 1 / 12) < 0.005
    # neighbouring counters are not correlated
    assert abs(torch.corrcoef(torch.stack([a[:, :-1].flatten(), a[:, 1:].flatten()]))[0, 1]) < 0.05


def test_kmeans_pp_samples_proportionally_to_weight():
    # First pick is proportional to w: over many seeds, the heavy point wins about 80% of the time.
    points = F.normalize(torch.randn(1, 4, 8), dim=-1)
    weights = torch.tensor([[8.0, 1.0, 0.5, 0.5]])
    picks = torch.stack([kmeans_pp_init(points, weights, k=1, seed=s)[0][0, 0] for s in range(400)])
    heavy = (picks - points[0, 0]).abs().sum(-1) < 1e-6
    assert 0.72 < heavy.float().mean().item() < 0.88


def test_kmeans_pp_picks_distinct_points_and_marks_missing_ones_dead():
    torch.manual_seed(0)
    # 3 distinct directions, each repeated: at most 3 distinct seeds exist.
    dirs = F.normalize(torch.randn(3, 8), dim=-1)
    points = dirs[torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])].unsqueeze(0)
    weights = torch.ones(1, 8)
    centroids, alive = kmeans_pp_init(points, weights, k=5, seed=0)
    assert alive.tolist() == [[True, True, True, False, False]]
    live = centroids[0, :3]
    assert (live @ live.T - torch.eye(3)).abs().max() < 1 - 1e-3  # three different directions
    # Zero-weight points are never picked.
    weights = torch.tensor([[0.0, 1, 1, 1, 1, 1, 1, 1]])
    points = F.normalize(torch.randn(1, 8, 8), dim=-1)
    centroids, alive = kmeans_pp_init(points, weights, k=8, seed=1)
    assert alive.sum() == 7
    assert not ((centroids[0, alive[0]] - points[0, 0]).abs().sum(-1) < 1e-6).any()


def test_agglomerate_merges_the_most_similar_pair_mass_weighted():
    c = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.99, 0.1, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    mass = torch.tensor([1.0, 1.0, 3.0, 1.0])
    sums = (mass[:, None] * c).unsqueeze(0)  # clusters' weighted point sums
    alive = torch.ones(1, 4, dtype=torch.bool)
    merged, alive_out = agglomerate(sums, alive, target=3)
    assert alive_out.tolist() == [[True, True, False, True]]  # 0 and 2 merged into slot 0
    torch.testing.assert_close(F.normalize(merged[0, 0], dim=-1), F.normalize(1.0 * c[0] + 3.0 * c[2], dim=-1))
    torch.testing.assert_close(merged[0, [1, 3]], sums[0, [1, 3]])
    # Second step: the (0+2) cluster leans towards 1 (it has a y component), so 1 joins slot 0.
    merged2, alive2 = agglomerate(sums, alive, target=2)
    assert alive2.tolist() == [[True, False, False, True]]
    torch.testing.assert_close(merged2[0, 0], sums[0, 0] + sums[0, 1] + sums[0, 2])
    # An image already at the target is left alone, in the same batch as one that is not.
    both_alive = torch.tensor([[True, True, True, True], [True, False, True, False]])
    merged3, alive3 = agglomerate(sums.expand(2, -1, -1), both_alive, target=2)
    assert torch.equal(alive3[1], both_alive[1]) and torch.equal(merged3[1], sums[0])
    assert alive3[0].sum() == 2


def test_hierarchical_tokens_are_weighted_means_of_their_members():
    torch.manual_seed(0)
    b, n, d, width = 3, 50, 8, 12
    keys = F.normalize(torch.randn(b, n, d), dim=-1)
    hidden = torch.randn(b, n, width)
    scores = torch.randn(b, n, requires_grad=True)
    leftover = torch.rand(b, n) > 0.3
    out = hierarchical_merge(keys, hidden, leftover, scores, 6, 2.0, 5, True, 0.7, 0)
    w = leftover_weights(scores, leftover, 0.7).detach()
    for i in range(b):
        assert ((out.cluster_map[i] >= 0) == leftover[i]).all()
        for slot in range(6):
            members = out.cluster_map[i] == slot
            assert bool(members.any()) == bool(out.mask[i, slot])
            if members.any():
                ww = w[i, members] / w[i, members].sum()
                torch.testing.assert_close(out.tokens[i, slot], (ww[:, None] * hidden[i, members]).sum(0))
            else:
                assert (out.tokens[i, slot] == 0).all()
    assert torch.equal(out.count, out.mask.sum(1))
    out.tokens.sum().backward()  # the aggregation weights carry the score gradient
    assert scores.grad is not None and scores.grad[leftover].abs().sum() > 0
    assert (scores.grad[~leftover] == 0).all()


def test_hierarchical_without_agglomeration_and_with_few_leftovers():
    keys = F.normalize(torch.randn(2, 10, 4), dim=-1)
    hidden = torch.randn(2, 10, 5)
    leftover = torch.zeros(2, 10, dtype=torch.bool)
    leftover[0, [2, 7]] = True  # 2 leftovers for 4 slots; image 1 has none
    out = hierarchical_merge(keys, hidden, leftover, torch.randn(2, 10), 4, 2.0, 3, False, 1.0, 0)
    assert out.count.tolist() == [2, 0]
    assert (out.tokens[~out.mask] == 0).all()
    real = out.tokens[0, out.mask[0]]
    torch.testing.assert_close(real.sort(0).values, hidden[0, [2, 7]].sort(0).values)


def _anchor_reference(keys, hidden, leftover, slots):
    """VisionZip's contextual merge on one image's leftovers, written as a plain loop."""
    idx = leftover.nonzero().squeeze(1)
    z, h = keys[idx], hidden[idx]
    r = len(idx)
    step = max(1, r // slots)
    anchors = list(range(0, r, step))[:slots]
    tokens = []
    members = [i for i in range(r) if i not in anchors]
    assign = {}
    for i in members:
        sims = torch.stack([z[i] @ z[a] for a in anchors])
        assign[i] = int(sims.argmax())
    for s, a in enumerate(anchors):
        mine = [i for i in members if assign[i] == s]
        mean = h[mine].sum(0) / max(len(mine), 1) if mine else torch.zeros_like(h[0])
        tokens.append(h[a] + mean)
    return torch.stack(tokens) if tokens else hidden.new_zeros(0, hidden.shape[1])


def test_anchor_merge_matches_loop_reference_on_variable_leftovers():
    torch.manual_seed(1)
    b, n, d, width, slots = 4, 40, 8, 6, 5
    keys = F.normalize(torch.randn(b, n, d), dim=-1)
    hidden = torch.randn(b, n, width)
    leftover = torch.rand(b, n) > torch.tensor([[0.2], [0.6], [0.95], [1.0]])  # 0 .. many leftovers
    leftover[2, :3] = True  # 3 leftovers (< slots)
    out = anchor_merge(keys, hidden, leftover, slots)
    for i in range(b):
        ref = _anchor_reference(keys[i], hidden[i], leftover[i], slots)
        assert int(out.count[i]) == len(ref)
        torch.testing.assert_close(out.tokens[i, : len(ref)], ref)
        assert not out.mask[i, len(ref) :].any() and (out.tokens[i, len(ref) :] == 0).all()
        assert ((out.cluster_map[i] >= 0) == leftover[i]).all()


def test_leftover_weights_never_underflow_to_zero():
    scores = torch.tensor([[0.0, -1e4, 5.0, 3.0]])
    leftover = torch.tensor([[True, True, False, True]])
    w = leftover_weights(scores, leftover, tau=0.01)
    assert (w[leftover] > 0).all() and w[0, 2] == 0
    assert torch.isfinite(w).all()
    none_left = leftover_weights(scores, torch.zeros_like(leftover), tau=1.0)
    assert (none_left == 0).all()


def test_first_argmax_equals_argmax_with_ties_to_the_lowest_index():
    torch.manual_seed(0)
    sim = torch.randn(3, 7, 50)
    sim[0, 2, :10] = sim[0, 5, :10] = 9.0  # exact ties: the lower index wins, like torch.argmax
    sim[1, :, 20] = float("-inf")
    sim[1, 6, 20] = -1e30
    sim[2, 3] = float("-inf")  # a dead row never wins
    assert torch.equal(_first_argmax(sim), sim.argmax(dim=1))
    assert (_first_argmax(sim)[0, :10] == 2).all()
    nan = sim.clone()
    nan[0, :, 0] = float("nan")
    assert 0 <= int(_first_argmax(nan)[0, 0]) < 7  # never out of range


def _lloyd_reference(points, weights, centroids, alive, iters):
    """Weighted spherical Lloyd steps written plainly (argmax assignment, per-cluster sums)."""
    k = centroids.shape[1]
    bias = torch.zeros(alive.shape).masked_fill(~alive, float("-inf"))
    for _ in range(iters + 1):
        assignment = (points @ centroids.transpose(1, 2) + bias.unsqueeze(1)).argmax(dim=-1)
        one_hot = F.one_hot(assignment, k).to(points.dtype) * weights.unsqueeze(-1)  # [B, N, k]
        sums = one_hot.transpose(1, 2) @ points
        norm = sums.norm(dim=-1, keepdim=True)
        new = torch.where(norm > 0, sums / norm.clamp_min(1e-30), centroids)
        centroids = new
    return sums, alive & (one_hot.sum(1) > 0), assignment


def test_weighted_kmeans_matches_plain_lloyd():
    torch.manual_seed(2)
    points = F.normalize(torch.randn(3, 80, 8, dtype=torch.float64), dim=-1).float()
    weights = torch.rand(3, 80)
    weights[:, :10] = 0.0
    centroids, alive = kmeans_pp_init(points, weights, 6, seed=0)
    alive[2, 4:] = False
    sums, alive_out, assignment = weighted_kmeans(points, weights, centroids, alive, 4)
    ref_sums, ref_alive, ref_assignment = _lloyd_reference(points, weights, centroids, alive, 4)
    assert torch.equal(assignment, ref_assignment)
    assert torch.equal(alive_out, ref_alive)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-6)
    assert torch.equal(assign_nearest(points, F.normalize(sums, dim=-1), alive_out), assignment)


def test_weighted_kmeans_gpu_style_sums_match_index_add(monkeypatch):
    # Off CPU the cluster sums are a one-hot matrix product (deterministic on a GPU).
    torch.manual_seed(5)
    points = F.normalize(torch.randn(2, 60, 8), dim=-1)
    weights = torch.rand(2, 60)
    centroids, alive = kmeans_pp_init(points, weights, 5, seed=1)
    on_cpu = weighted_kmeans(points, weights, centroids, alive, 3)
    monkeypatch.setattr(merge_module, "_sum_by_index_add", lambda device: False)
    product = weighted_kmeans(points, weights, centroids, alive, 3)
    assert torch.equal(on_cpu[1], product[1]) and torch.equal(on_cpu[2], product[2])
    torch.testing.assert_close(on_cpu[0], product[0], rtol=1e-5, atol=1e-6)


def test_merges_read_strided_patch_views_without_changing_results():
    torch.manual_seed(4)
    b, n, d, width = 3, 30, 8, 12
    keys = F.normalize(torch.randn(b, n, d), dim=-1)
    hidden = torch.randn(b, n + 1, width)  # CLS first, as in the compressor
    scores = torch.randn(b, n)
    leftover = torch.rand(b, n) > 0.3
    view, copy = hidden[:, 1:], hidden[:, 1:].contiguous()
    for merge in (
        lambda h: hierarchical_merge(keys, h, leftover, scores, 5, 2.0, 3, True, 1.0, 0),
        lambda h: anchor_merge(keys, h, leftover, 5),
    ):
        out_view, out_copy = merge(view), merge(copy)
        assert torch.equal(out_view.tokens, out_copy.tokens)
        assert torch.equal(out_view.cluster_map, out_copy.cluster_map)
