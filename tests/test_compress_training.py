"""Trainability: every parameter gets a gradient; training mode changes gradients, never values."""

import pytest
import torch

from sparsezip_pl.compress import DynKConfig, MergingConfig, SparseZipCompressor, SparseZipConfig
from sparsezip_pl.compress.testing import random_capture, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # tiny tensors: see single_thread's docstring
        yield


def _setup(rule="attention_entropy", hierarchical=True):
    cfg = SparseZipConfig(
        layers=[-2, -6],
        k_min=2,
        k_max=30,
        cross_beta=0.5,
        dynk=DynKConfig(rule=rule),
        merging=MergingConfig(contextual_num=5, hierarchical=hierarchical),
    )
    comp = SparseZipCompressor(cfg, num_heads=4, head_dim=16, text_dim=12)
    with torch.no_grad():
        comp.scorer.text_gate.fill_(0.5)  # as after some tuning: at 0 the projection gets no gradient yet
    # Attention concentrated enough that K lands strictly inside [k_min, k_max].
    cap = random_capture(batch=3, num_patches=64, num_heads=4, head_dim=16, num_layers=2, peak=[12.0, 16.0, 20.0])
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(3, 7, 12, generator=gen)
    mask = torch.rand(3, 7, generator=gen) > 0.3
    mask[:, 0] = True
    return comp, cap, text, mask


def _loss(out):
    target = torch.randn(out.tokens.shape, generator=torch.Generator().manual_seed(2))
    return (out.tokens * target * out.mask.unsqueeze(-1)).sum() + 0.1 * out.expected_tokens.sum()


@pytest.mark.parametrize("rule", ["attention_entropy", "seed"])
@pytest.mark.parametrize("hierarchical", [True, False])
def test_every_trainable_parameter_gets_a_finite_nonzero_gradient(rule, hierarchical):
    comp, cap, text, mask = _setup(rule, hierarchical)
    comp.train()
    out = comp(cap, text, mask)
    k = out.num_dominant
    assert ((k > comp.config.k_min) & (k < comp.config.k_max)).all(), "K should not sit on a clamp"
    _loss(out).backward()
    names = {name for name, _ in comp.named_parameters()}
    assert names == {
        "scorer.alphas",
        "scorer.gate_logits",
        "scorer.text_proj.weight",
        "scorer.text_proj.bias",
        "scorer.text_gate",
        "budget.offset",
    }
    for name, param in comp.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_training_forward_equals_eval_forward():
    comp, cap, text, mask = _setup()
    comp.train()
    train_out = comp(cap, text, mask)
    comp.eval()
    with torch.no_grad():
        eval_out = comp(cap, text, mask)
    fields = ("tokens", "mask", "kept_indices", "num_dominant", "num_contextual", "cluster_map", "scores")
    for field in fields + ("expected_tokens",):
        assert torch.equal(getattr(train_out, field), getattr(eval_out, field)), field


def test_expected_tokens_tracks_the_real_count_and_is_differentiable():
    comp, cap, text, mask = _setup()
    out = comp.train()(cap, text, mask)
    # sum of sigmoids around the K-th score: within a few tokens of the hard count.
    assert ((out.expected_tokens - out.num_tokens.float()).abs() < 3).all()
    offset_grad = torch.autograd.grad(out.expected_tokens.sum(), comp.budget.offset)[0]
    assert offset_grad > 0  # a larger offset means a larger budget


def test_budget_penalty_moves_k_down():
    comp, cap, text, mask = _setup()
    opt = torch.optim.SGD([comp.budget.offset], lr=2.0)
    k_before = comp.eval()(cap, text, mask).num_dominant.float().mean()
    comp.train()
    for _ in range(5):
        opt.zero_grad()
        comp(cap, text, mask).expected_tokens.mean().backward()
        opt.step()
    k_after = comp.eval()(cap, text, mask).num_dominant.float().mean()
    assert k_after < k_before


@pytest.mark.parametrize("hierarchical", [True, False])
def test_hidden_states_get_the_gradient_of_their_weights(hierarchical):
    # Every output token is a weighted sum of rows of hidden: d(sum of tokens)/d(row) is the
    # row's total weight: 1 for CLS and dominant patches, its aggregation weight in a contextual token.
    comp, cap, text, mask = _setup(hierarchical=hierarchical)
    comp.train()
    hidden = cap.hidden.clone().requires_grad_(True)
    out = comp(type(cap)(hidden, cap.queries, cap.keys), text, mask)
    out.tokens.sum().backward()
    grad = hidden.grad[..., 0]  # identical over channels
    assert torch.equal(hidden.grad, grad.unsqueeze(-1).expand_as(hidden.grad))
    assert (grad[:, 0] == 1).all()
    for b in range(grad.shape[0]):
        kept = out.kept_indices[b][out.kept_indices[b] >= 0]
        assert (grad[b, 1 + kept] == 1).all()
        in_context = out.cluster_map[b] >= 0
        if hierarchical:  # weighted means: each token's weights sum to 1
            totals = torch.zeros(comp.config.merging.contextual_num).index_add_(
                0, out.cluster_map[b][in_context], grad[b, 1:][in_context]
            )
            torch.testing.assert_close(totals[out.mask[b, -totals.shape[0]:]], torch.ones(int(out.num_contextual[b])))
        assert (grad[b, 1:][~in_context & ~torch.isin(torch.arange(grad.shape[1] - 1), kept)] == 0).all()
