"""SparseZip learns the mix: the diversity and instruction-relevance terms (gated, off by default)."""

import pytest
import torch
import torch.nn.functional as F

from sparsezip_pl.compress import SparseZipCompressor, SparseZipConfig, VisionCapture
from sparsezip_pl.compress.scoring import instruction_relevance, max_min_diversity
from sparsezip_pl.compress.testing import random_capture, single_thread

FIELDS = (
    "tokens", "mask", "kept_indices", "num_dominant", "num_contextual", "cluster_map", "scores", "expected_tokens",
    "positions",
)
NEW_PARAMETERS = {
    "scorer.diversity_gate", "scorer.diversity_log_tau", "scorer.instruction_gate", "scorer.instruction_log_tau",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # tiny tensors: see single_thread's docstring
        yield


def _capture(batch=3, n=40, width=12, text_dim=6, seed=0):
    cap = random_capture(batch, n, hidden_dim=width, num_heads=4, head_dim=8, peak=[6.0, 12.0, 18.0][:batch], seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    projector = torch.nn.Linear(width, text_dim)
    with torch.no_grad():
        projector.weight.copy_(torch.randn(text_dim, width, generator=gen))
        projector.bias.zero_()
    text = torch.randn(batch, 5, text_dim, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[-1, 2:] = False
    return VisionCapture(cap.hidden, cap.queries, cap.keys, text_embeds=text, text_mask=mask, project=projector)


def _compressor(**options):
    cfg = SparseZipConfig(k_min=2, k_max=20, **options)
    return SparseZipCompressor(cfg, num_heads=4, head_dim=8, text_dim=6)


def test_defaults_register_nothing_new_and_gates_at_zero_change_nothing():
    cap = _capture()
    plain = _compressor().eval()
    assert not NEW_PARAMETERS & {name for name, _ in plain.named_parameters()}
    mixed = _compressor(diversity_beta=0.8, instruction_beta=0.6).eval()
    assert NEW_PARAMETERS <= {name for name, _ in mixed.named_parameters()}
    assert mixed.needs_projected and mixed.needs_text and not plain.needs_projected
    out, ref = mixed(cap), plain(cap)
    for field in FIELDS:
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    # Once a gate moves, the score moves.
    with torch.no_grad():
        mixed.scorer.diversity_gate.fill_(1.0)
    assert not torch.allclose(mixed(cap).scores, ref.scores)


@pytest.mark.parametrize("term", ["diversity", "instruction"])
def test_gradients_reach_the_gate_and_then_the_terms_parameters_through_the_selection(term):
    cap = _capture()
    comp = _compressor(**{f"{term}_beta": 1.0}).train()
    gate, log_tau = getattr(comp.scorer, f"{term}_gate"), getattr(comp.scorer, f"{term}_log_tau")
    target = torch.randn(3, comp.output_length(40), 12, generator=torch.Generator().manual_seed(3))

    def loss():  # the output tokens only: the score reaches them through the straight-through selection
        out = comp(cap)
        return (out.tokens * target * out.mask.unsqueeze(-1)).sum()

    loss().backward()
    assert gate.grad is not None and torch.isfinite(gate.grad) and gate.grad.abs() > 0
    assert log_tau.grad is None or log_tau.grad == 0  # a closed gate passes nothing to the term yet
    with torch.no_grad():
        gate.fill_(0.7)
    comp.zero_grad()
    loss().backward()
    for param in (gate, log_tau, comp.scorer.alphas):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def _naive_max_min(unit, scores):
    batch, n, _ = unit.shape
    out = torch.empty(batch, n)
    for b in range(batch):
        for i in range(n):
            above = [j for j in range(n) if j != i and scores[b, j] > scores[b, i]]
            out[b, i] = 1 - max(float(unit[b, i] @ unit[b, j]) for j in above) if above else float("nan")
    return out


def test_diversity_is_the_max_min_distance_at_low_temperatures():
    torch.manual_seed(0)
    unit = F.normalize(torch.randn(2, 12, 5), dim=-1)
    scores = torch.randn(2, 12) * 5
    got = max_min_diversity(unit, scores, torch.tensor(1e-3), rank_tau=1e-7)
    ref = _naive_max_min(unit, scores)
    has_above = ~torch.isnan(ref)
    torch.testing.assert_close(got[has_above], ref[has_above], atol=2e-2, rtol=0)
    # A near-copy of a more important patch scores low, a patch unlike everything high.
    unit = F.normalize(torch.tensor([[[1.0, 0, 0], [0.99, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]]]), dim=-1)
    div = max_min_diversity(unit, torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor(0.05), rank_tau=0.1)
    assert div[0, 1] < 0.05 and div[0, 3] > 0.9
    assert max_min_diversity(unit[:, :1], torch.zeros(1, 1), torch.tensor(0.1), 0.1).tolist() == [[1.0]]


def test_instruction_relevance_between_mean_and_max_cosine():
    torch.manual_seed(1)
    projected, text = torch.randn(2, 7, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    cos = F.normalize(projected, dim=-1) @ F.normalize(text, dim=-1).transpose(1, 2)
    mean = instruction_relevance(projected, text, mask, torch.tensor(1e3))
    torch.testing.assert_close(mean[0], cos[0, :, :3].mean(-1), atol=1e-3, rtol=0)
    best = instruction_relevance(projected, text, mask, torch.tensor(1e-3))
    torch.testing.assert_close(best[0], cos[0, :, :3].amax(-1), atol=2e-3, rtol=0)
    assert torch.equal(mean[1], torch.zeros(7))  # no valid question token: no signal
    tau = torch.tensor(0.5, requires_grad=True)
    instruction_relevance(projected, text, mask, tau).sum().backward()
    assert torch.isfinite(tau.grad)


def test_bad_settings_and_missing_inputs_name_the_field():
    with pytest.raises(ValueError, match="diversity_beta"):
        _compressor(diversity_beta=-1.0)
    with pytest.raises(ValueError, match="instruction_tau"):
        _compressor(instruction_tau=0.0)
    with pytest.raises(ValueError, match="instruction_beta > 0 needs the compressor's text_dim"):
        SparseZipCompressor(SparseZipConfig(instruction_beta=1.0), num_heads=4, head_dim=8)
    comp = _compressor(instruction_beta=1.0).eval()
    cap = _capture()
    with pytest.raises(ValueError, match="capture.project"):
        comp(VisionCapture(cap.hidden, cap.queries, cap.keys, text_embeds=cap.text_embeds))
    with pytest.raises(ValueError, match="instruction_beta > 0 needs text_embeds"):
        comp(VisionCapture(cap.hidden, cap.queries, cap.keys, project=cap.project))
