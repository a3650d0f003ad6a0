"""Dynamic K: the two rules, clamping, the differentiable threshold, the fixed budget."""

import dataclasses
import math

import pytest
import torch

from sparsezip_pl.compress import DynKConfig, MergingConfig, SparseZipCompressor, SparseZipConfig
from sparsezip_pl.compress.budget import select_dominant, soft_clamp
from sparsezip_pl.compress.scoring import patch_attention
from sparsezip_pl.compress.testing import random_capture, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # tiny tensors: see single_thread's docstring
        yield


# (peak, hot patches): from CLS attention spread over all patches to attention on one patch.
VARIED = [(0.0, 4), (5.0, 4), (10.0, 4), (20.0, 4), (40.0, 2), (60.0, 1), (0.0, 8), (30.0, 8)]


def _ks(rule):
    comp = SparseZipCompressor(SparseZipConfig(k_min=2, k_max=60, dynk=DynKConfig(rule=rule)), 4, 16).eval()
    ks = []
    for seed, (peak, hot) in enumerate(VARIED):
        cap = random_capture(batch=2, num_patches=64, num_heads=4, head_dim=16, peak=peak, num_hot=hot, seed=seed)
        ks.append(comp(cap).num_dominant)
    return torch.cat(ks)


def test_seed_rule_barely_moves_but_attention_entropy_rule_does():
    seed_k, entropy_k = _ks("seed"), _ks("attention_entropy")
    # var of a sum of z-scored terms is nearly constant, so log(var) + 8 stays near 8.
    assert int(seed_k.max() - seed_k.min()) <= 2
    assert int(entropy_k.max() - entropy_k.min()) >= 20
    # Concentrated attention (last images) keeps fewer patches than spread attention (first).
    assert entropy_k[:2].float().mean() > entropy_k[8:12].float().mean() + 15


def test_attention_entropy_rule_formula():
    cfg = SparseZipConfig(k_min=1, k_max=64, dynk=DynKConfig(rule="attention_entropy", scale=0.5, c=1.5))
    comp = SparseZipCompressor(cfg, 4, 16).eval()
    cap = random_capture(batch=3, num_patches=64, num_heads=4, head_dim=16, peak=[0.0, 15.0, 40.0])
    a = patch_attention(cap.queries[0], cap.keys[0]).double()
    n_eff = torch.exp(-(a * a.log()).sum(-1))
    expected = torch.round(0.5 * n_eff + 1.5).clamp(1, 64).long()
    assert torch.equal(comp(cap).num_dominant, expected)


def test_seed_rule_formula():
    cfg = SparseZipConfig(k_min=0, k_max=64, dynk=DynKConfig(rule="seed"))
    comp = SparseZipCompressor(cfg, 4, 16).eval()
    out = comp(random_capture(batch=2, num_patches=64, num_heads=4, head_dim=16, peak=10.0))
    var = out.scores.double().var(dim=-1, correction=0)
    assert torch.equal(out.num_dominant, torch.round(torch.log(var + 1e-6) + 8.0).long())
    assert comp.budget.offset.item() == 8.0  # the rule's default c


@pytest.mark.parametrize(
    "cfg",
    [
        SparseZipConfig(k_min=50, k_max=80),  # K >= N with dynamic K
        SparseZipConfig(dynamic_k=False, dominant=100),  # fixed budget (99 patches + CLS) > N
        SparseZipConfig(k_min=10, k_max=12, dynk=DynKConfig(c=1000.0)),  # K far above k_max
        SparseZipConfig(k_min=3, k_max=40, dynk=DynKConfig(c=-1000.0)),  # K far below k_min
    ],
    ids=["k_min>N", "dominant>N", "above_k_max", "below_k_min"],
)
def test_budget_is_clamped_not_crashing(cfg):
    n = 20
    cfg.merging = MergingConfig(contextual_num=4)
    comp = SparseZipCompressor(cfg, 4, 16).eval()
    out = comp(random_capture(batch=2, num_patches=n, num_heads=4, head_dim=16))
    if cfg.dynamic_k:
        low, high = min(cfg.k_min, n), min(cfg.k_max, n)
        slots = cfg.k_max
    else:
        low = high = min(cfg.dominant - 1, n)  # dominant counts CLS
        slots = cfg.dominant - 1
    assert ((out.num_dominant >= low) & (out.num_dominant <= high)).all()
    assert out.tokens.shape[1] == comp.max_tokens == 1 + slots + 4
    if int(out.num_dominant.min()) == n:  # everything kept: no leftovers, no contextual tokens
        assert (out.num_contextual == 0).all() and (out.cluster_map == -1).all()
        assert torch.equal(out.kept_indices[:, :n], torch.arange(n).expand(2, n))
    if cfg.dynk.c == 1000.0:
        assert (out.num_dominant == 12).all()
    if cfg.dynk.c == -1000.0:
        assert (out.num_dominant == 3).all()


def test_select_dominant_keeps_top_k_in_spatial_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.5, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    k = torch.tensor([2.6, 1.2])  # rounds to 3 and 1
    sel = select_dominant(scores, k, k_low=1, k_high=4, slots=5, tau=0.1)
    assert torch.equal(sel.count, torch.tensor([3, 1]))
    assert torch.equal(sel.indices, torch.tensor([[1, 3, 4, 6, 6], [0, 6, 6, 6, 6]]))
    assert torch.equal(sel.keep[0], torch.tensor([False, True, False, True, True, False]))


def test_threshold_interpolates_and_gives_k_a_gradient():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    k = torch.tensor([2.25], requires_grad=True)
    sel = select_dominant(scores, k, k_low=0, k_high=5, slots=5, tau=0.5)
    # soft-clamped K ~ 2.25 -> threshold between rank 2 (3.0) and rank 3 (2.0)
    k_soft = soft_clamp(k.detach(), 0, 5)
    threshold = 3.0 - (k_soft - 2.0)
    torch.testing.assert_close(sel.soft, torch.sigmoid((scores - threshold) / 0.5))
    sel.soft.sum().backward()
    assert k.grad is not None and k.grad.item() > 0  # larger K, lower threshold, more tokens


def test_soft_clamp_is_close_inside_and_bounded_outside():
    x = torch.tensor([-100.0, 10.0, 32.0, 500.0])
    y = soft_clamp(x, 8, 64)
    assert y[0] >= 8 and y[-1] <= 64
    assert abs(y[2].item() - 32.0) < 1e-6
    assert math.isclose(soft_clamp(torch.tensor(3.0), 5, 5).item(), 5.0)


def test_fixed_budget_keeps_dominant_patches():
    # VisionZip's convention: dominant = 8 tokens = CLS + 7 patches.
    cfg = SparseZipConfig(dynamic_k=False, dominant=8, merging=MergingConfig(contextual_num=5))
    comp = SparseZipCompressor(cfg, 4, 16).eval()
    out = comp(random_capture(batch=3, num_patches=40, num_heads=4, head_dim=16, peak=8.0))
    assert (out.num_dominant == 7).all()
    assert comp.max_tokens == 8 + 5 and out.tokens.shape[1] == 13 and out.num_tokens.tolist() == [13, 13, 13]
    top = out.scores.topk(7, dim=1).indices.sort(dim=1).values
    assert torch.equal(out.kept_indices, top)


@pytest.mark.parametrize("dynamic_k", [False, True])
@pytest.mark.parametrize("has_cls", [True, False])
def test_budget_counts_a_cls_token_only_when_the_tower_has_one(dynamic_k, has_cls):
    # A tower without CLS (SigLIP, Qwen's ViT) has no CLS slot, so the whole budget goes to patches
    # and contextual tokens: a fixed K meets it exactly, a dynamic K never exceeds it.
    from method_helpers import build, capture

    cap = capture(batch=3, num_patches=64, has_cls=True)
    if not has_cls:  # SparseZip merges on the keys; the family gives them without the CLS row
        cap = capture(batch=3, num_patches=64, has_cls=False)
        cap = dataclasses.replace(cap, keys=random_capture(batch=3, num_patches=64, hidden_dim=32, num_heads=4,
                                                           head_dim=16, seed=0).keys[..., 1:, :])
    method = build("sparsezip", budget=20, has_cls=has_cls, dynamic_k=dynamic_k).eval()
    with torch.no_grad():
        out = method(cap)
    assert method.max_tokens == 20
    if dynamic_k:
        assert (out.num_tokens <= 20).all()
    else:
        assert out.num_tokens.tolist() == [20, 20, 20]
