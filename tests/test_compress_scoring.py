"""Scoring terms against naive float64 implementations of docs/design.md section 2."""

import math

import pytest
import torch

from sparsezip_pl.compress import Alphas, SparseZipCompressor, SparseZipConfig
from sparsezip_pl.compress import scoring
from sparsezip_pl.compress.scoring import (
    feature_entropy,
    mutual_information_proxy,
    patch_attention,
    text_relevance,
    zscore,
)
from sparsezip_pl.compress.testing import random_capture, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # tiny tensors: see single_thread's docstring
        yield


def naive_zscore(x):
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, correction=0, keepdim=True) + 1e-6)


def test_patch_attention_is_the_cls_row_of_full_attention():
    cap = random_capture(batch=3, num_patches=20, num_heads=4, head_dim=8, peak=5.0)
    q, k = cap.queries[0].double(), cap.keys[0].double()  # [B, h, d], [B, h, L, d]
    # Full attention with the CLS query at row 0 and random queries elsewhere.
    full_q = torch.randn(k.shape, dtype=torch.float64)
    full_q[:, :, 0] = q
    attn = torch.softmax(full_q @ k.transpose(-1, -2) / math.sqrt(k.shape[-1]), dim=-1)
    expected = attn[:, :, 0, 1:].mean(dim=1)
    expected = expected / expected.sum(-1, keepdim=True)
    got = patch_attention(cap.queries[0], cap.keys[0])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_feature_entropy_matches_naive():
    z = torch.nn.functional.normalize(torch.randn(2, 10, 8, dtype=torch.float64), dim=-1)
    p = torch.softmax(z / 0.2, dim=-1)
    expected = -(p * p.log()).sum(-1) / math.log(8)
    torch.testing.assert_close(feature_entropy(z.float(), 0.2).double(), expected, rtol=1e-5, atol=1e-6)


def naive_mutual_information(z, tau):
    n = z.shape[1]
    s = z.double() @ z.double().transpose(1, 2) / tau
    s.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    q = torch.softmax(s, dim=-1)
    entropy = -torch.nan_to_num(q * q.log()).sum(-1)
    return 1 - entropy / math.log(n - 1)


# tau 0.1: the symmetric fixed-shift path; 0.01: the row-maximum path (tau below its safe range).
# n = 700 with batch 2 is split into several blocks / row chunks on CPU, of uneven sizes.
@pytest.mark.parametrize("tau", [0.1, 0.01])
@pytest.mark.parametrize("n", [3, 17, 700])
def test_mutual_information_matches_naive(n, tau):
    z = torch.nn.functional.normalize(torch.randn(2, n, 8, dtype=torch.float64), dim=-1)
    if n == 700:
        z[1, 5] = 0.0  # a zero key: uniform row, MI 0
        z[0, 9] = z[0, 10]  # an exact duplicate
    expected = naive_mutual_information(z, tau)
    got = mutual_information_proxy(z.float(), tau)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(got).all()


def test_mutual_information_blocks_rows_and_autograd_paths_agree():
    torch.manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(3, 650, 16), dim=-1)
    tau = 0.05
    symmetric = scoring._similarity_entropy_symmetric(z, tau)
    rows = scoring._similarity_entropy_rows(z, tau)
    leaf = z.clone().requires_grad_(True)
    autograd = scoring._similarity_entropy_autograd(leaf, tau)
    torch.testing.assert_close(symmetric, rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(symmetric, autograd.detach(), rtol=1e-5, atol=1e-5)
    # Keys that need a gradient take the differentiable path and get one.
    mi = mutual_information_proxy(leaf, tau)
    mi.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_feature_entropy_is_differentiable():
    z = torch.nn.functional.normalize(torch.randn(2, 10, 8, dtype=torch.float64), dim=-1).float().requires_grad_(True)
    h = feature_entropy(z, 0.2)
    (g,) = torch.autograd.grad(h.sum(), z)
    # against autograd through the textbook formula
    z2 = z.detach().clone().requires_grad_(True)
    p = torch.softmax(z2 / 0.2, dim=-1)
    (g2,) = torch.autograd.grad((-(p * p.log()).sum(-1) / math.log(8)).sum(), z2)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-5)


def test_mutual_information_is_high_for_patches_resembling_few_others():
    # Patches 0 and 1 are near-copies of each other; the other 18 resemble nobody in particular.
    torch.manual_seed(0)
    z = torch.randn(1, 20, 16)
    z[0, 1] = z[0, 0] + 0.01 * torch.randn(16)
    mi = mutual_information_proxy(torch.nn.functional.normalize(z, dim=-1), 0.1)[0]
    assert mi[:2].min() > mi[2:].max()


def test_zscore_of_constant_is_zero_not_nan():
    out = zscore(torch.full((2, 7), 3.25))
    assert torch.isfinite(out).all() and out.abs().max() < 1e-3


def test_text_relevance_matches_naive():
    text = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    keys = torch.randn(2, 11, 8)
    got = text_relevance(text, mask, keys)
    probs = torch.softmax(text @ keys.transpose(1, 2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(got[0], probs[0, mask[0]].mean(0))
    assert torch.equal(got[1], torch.zeros(11))  # no valid question token: no relevance signal


def _naive_scores(comp, cap, text=None, text_mask=None):
    """docs/design.md's fused score, written out term by term in float64."""
    cfg = comp.config
    per_layer = []
    for layer in range(cap.queries.shape[0]):
        q, k = cap.queries[layer].double(), cap.keys[layer].double()
        logits = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(k.shape[-1])
        a = torch.softmax(logits, -1)[..., 1:].mean(1)
        z = torch.nn.functional.normalize(k[:, :, 1:].mean(1), dim=-1)
        p = torch.softmax(z / cfg.tau_feat, -1)
        ent = -(p * p.log()).sum(-1) / math.log(z.shape[-1])
        s = z @ z.transpose(1, 2) / cfg.tau_sim
        s.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        qs = torch.softmax(s, -1)
        mi = 1 + torch.nan_to_num(qs * qs.log()).sum(-1) / math.log(z.shape[1] - 1)
        al = comp.scorer.alphas.detach().double()
        per_layer.append(al[0] * naive_zscore(a) + al[1] * naive_zscore(ent) + al[2] * naive_zscore(mi))
    gates = torch.softmax(comp.scorer.gate_logits.detach().double(), 0)
    fused = sum(g * naive_zscore(s) for g, s in zip(gates, per_layer)) if len(per_layer) > 1 else per_layer[0]
    if cfg.cross_beta > 0:
        proj = comp.scorer.text_proj
        t = text.double() @ proj.weight.detach().double().T + proj.bias.detach().double()
        keys = cap.keys[0].double()[:, :, 1:].mean(1)
        probs = torch.softmax(t @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1]), -1)
        m = text_mask.double().unsqueeze(-1)
        r = (probs * m).sum(1) / m.sum(1)
        fused = fused + cfg.cross_beta * comp.scorer.text_gate.detach().double() * naive_zscore(r)
    return fused


def test_fused_multilayer_text_aware_score_matches_design():
    cfg = SparseZipConfig(layers=[-2, -6, -12], cross_beta=0.7, alphas=Alphas(attn=0.9, entropy=-0.3, mutual=0.5))
    comp = SparseZipCompressor(cfg, num_heads=4, head_dim=8, text_dim=6).eval()
    with torch.no_grad():
        comp.scorer.gate_logits.copy_(torch.tensor([0.3, -1.0, 0.5]))
        comp.scorer.text_gate.fill_(0.8)
    cap = random_capture(batch=2, num_patches=30, num_heads=4, head_dim=8, num_layers=3, peak=4.0)
    text = torch.randn(2, 5, 6)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = comp(cap, text, mask)
    torch.testing.assert_close(out.scores.double(), _naive_scores(comp, cap, text, mask), rtol=1e-4, atol=1e-4)


def test_attention_only_ablation_scores_by_attention():
    cfg = SparseZipConfig(hybrid_scoring=False)
    comp = SparseZipCompressor(cfg, num_heads=4, head_dim=8).eval()
    cap = random_capture(batch=2, num_patches=30, num_heads=4, head_dim=8, peak=4.0)
    out = comp(cap)
    expected = zscore(patch_attention(cap.queries[0], cap.keys[0]))
    torch.testing.assert_close(out.scores, expected)


def test_text_term_starts_gated_off_and_its_gate_learns():
    """An untuned text-aware compressor scores like the text-blind one; the gate gets a gradient."""
    blind = SparseZipCompressor(SparseZipConfig(layers=[-2, -6]), num_heads=4, head_dim=8).eval()
    aware = SparseZipCompressor(SparseZipConfig(layers=[-2, -6], cross_beta=0.5), num_heads=4, head_dim=8,
                                text_dim=6).eval()
    cap = random_capture(batch=2, num_patches=30, num_heads=4, head_dim=8, num_layers=2, peak=4.0)
    text = torch.randn(2, 5, 6)
    assert aware.scorer.text_gate.item() == 0.0
    torch.testing.assert_close(aware(cap, text).scores, blind(cap).scores)
    aware.train()
    (aware(cap, text).scores * torch.randn(2, 30)).sum().backward()
    assert aware.scorer.text_gate.grad.abs() > 0
    with torch.no_grad():
        aware.scorer.text_gate.fill_(1.0)
    assert not torch.allclose(aware.eval()(cap, text).scores, blind(cap).scores)
