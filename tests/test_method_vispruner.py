"""``vispruner``: a per-image loop of the official procedure (attention from the raw CLS query and
keys), odd residual lists, exact budgets, batching, reruns, the substitute attention without CLS."""

import dataclasses
import math

import pytest
import torch

from method_helpers import assert_batched_equals_alone, assert_same_output, build, capture
from sparsezip_pl.compress.testing import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def vispruner_one_image(features, attention, total, ratio=0.5, per_pass=8):
    """VisPruner for one image, step by step as the official code does it, with Python lists.

    features [N, C], attention [h, N] the CLS row to the patches. Returns the kept indices sorted.
    """
    score = attention.mean(dim=0).tolist()
    order = sorted(range(len(score)), key=lambda i: -score[i])  # stable: ties keep patch order
    important_num = int(total * ratio)
    diverse_num = total - important_num
    important, residual = order[:important_num], order[important_num:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse_num > 0:
        r = min(per_pass, len(residual) - diverse_num)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        sims = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        by_score = sorted(range(len(a)), key=lambda k: -sims[k])
        residual = [a[k] for k in by_score[r:]] + b
    return sorted(important + (residual if diverse_num > 0 else []))


def cls_attention(query, keys):
    """[h, N]: softmax over all L tokens of the CLS query (q [h, d], keys [h, L, d]), CLS column dropped."""
    return torch.softmax(keys @ query.unsqueeze(-1) / math.sqrt(query.shape[-1]), dim=1).squeeze(-1)[:, 1:]


@pytest.mark.parametrize("total,ratio,per_pass", [(16, 0.5, 8), (15, 0.5, 8), (20, 0.75, 8), (9, 0.0, 3),
                                                  (12, 1.0, 8), (40, 0.5, 8), (63, 0.5, 8)])
def test_equals_the_official_procedure(total, ratio, per_pass):
    cap = capture(peak=[0.0, 8.0, 20.0])
    out = build("vispruner", total, important_ratio=ratio, per_pass=per_pass)(cap)
    assert out.num_tokens.tolist() == [total] * 3
    for b in range(3):
        attention = cls_attention(cap.queries[0, b], cap.keys[0, b])
        expected = vispruner_one_image(cap.hidden[b, 1:], attention, total, ratio, per_pass)
        assert out.kept_indices[b].tolist() == expected
        assert torch.equal(out.tokens[b], cap.hidden[b, 1:][expected])
        torch.testing.assert_close(out.scores[b], attention.mean(dim=0))


@pytest.mark.parametrize("budget,tokens", [(16, 16), (0.25, 16), (1, 1), (None, 64)])
def test_budget_is_met_exactly(budget, tokens):
    method = build("vispruner", budget)
    out = method(capture())
    assert method.output_length(64) == tokens and out.num_tokens.tolist() == [tokens] * 3
    assert (out.kept_indices[:, 1:] > out.kept_indices[:, :-1]).all()


def test_batched_equals_alone_and_reruns():
    method = build("vispruner", 18)
    cap = capture(batch=4, peak=[0.0, 5.0, 10.0, 20.0])
    out = assert_batched_equals_alone(method, cap)
    assert_same_output(out, method(cap))


def test_tower_without_cls_ranks_by_the_substitute_attention():
    cap = capture(has_cls=False)
    out = build("vispruner", 16, has_cls=False)(cap)
    for b in range(3):
        assert out.kept_indices[b].tolist() == vispruner_one_image(cap.hidden[b], cap.attention[0, b], 16)
    with pytest.raises(ValueError, match="capture.attention"):
        build("vispruner", 16, has_cls=False)(dataclasses.replace(cap, attention=None))


def test_reads_the_feature_layer_and_checks_its_options():
    assert build("vispruner", 16).scoring_layers == [-2]
    assert build("vispruner", 16, layer=-3).scoring_layers == [-3]
    with pytest.raises(ValueError, match="vispruner.important_ratio"):
        build("vispruner", 16, important_ratio=1.5)
