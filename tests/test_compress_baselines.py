"""The baselines: ``visionzip`` against a per-image loop of VisionZip's published algorithm, ``none``."""

import math

import pytest
import torch

from sparsezip_pl.compress import MergingConfig, SparseZipCompressor, SparseZipConfig
from sparsezip_pl.compress.testing import random_capture, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # tiny tensors: see single_thread's docstring
        yield


def visionzip_one_image(hidden, q, k, dominant_num, contextual):
    """VisionZip for one image, following the published code step by step.

    hidden [L, C], q [h, d], k [h, L, d]. ``dominant_num`` is what the published code receives:
    ``visionzip(model, dominant, contextual)`` passes ``dominant - 1`` (CLS is the last dominant
    token). Returns (tokens [1 + dominant_num + contextual, C], kept patch indices).
    """
    length = hidden.shape[0]
    attn = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(k.shape[-1]), dim=-1)  # [h, L]
    cls_attention_sum = attn[:, 1:].sum(dim=0)
    topk_indices = cls_attention_sum.topk(dominant_num).indices + 1
    all_indices = torch.cat([torch.zeros(1, dtype=torch.long), topk_indices])
    mask = torch.ones(length, dtype=torch.bool)
    mask[all_indices] = False
    dominant_tokens = hidden[~mask]

    metric = k.mean(dim=0)
    metric_filtered = metric[mask]
    hidden_filtered = hidden[mask]
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[0] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[0], step)[:contextual]
    target_tokens = metric_normalized[target_indices]
    merge = ~torch.isin(torch.arange(metric_normalized.shape[0]), target_indices)
    similarity = metric_normalized[merge] @ target_tokens.T
    assign_one_hot = torch.zeros(int(merge.sum()), contextual)
    assign_one_hot.scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
    counts = assign_one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    aggregated = assign_one_hot.T @ hidden_filtered[merge] / counts
    contextual_tokens = hidden_filtered[target_indices] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens]), (all_indices[1:] - 1).sort().values


@pytest.mark.parametrize("n,dominant,contextual", [(64, 20, 6), (100, 54, 10), (30, 3, 9), (30, 1, 4)])
def test_visionzip_equals_published_algorithm(n, dominant, contextual):
    cfg = SparseZipConfig(method="visionzip", dominant=dominant, merging=MergingConfig(contextual_num=contextual))
    comp = SparseZipCompressor(cfg, num_heads=4, head_dim=16).eval()
    cap = random_capture(batch=3, num_patches=n, hidden_dim=24, num_heads=4, head_dim=16, peak=[0.0, 8.0, 20.0])
    out = comp(cap)
    # VisionZip's convention: ``dominant`` counts CLS.
    assert out.tokens.shape == (3, dominant + contextual, 24) == (3, comp.max_tokens, 24)
    assert out.mask.all()
    for b in range(3):
        ref_tokens, ref_kept = visionzip_one_image(
            cap.hidden[b], cap.queries[0, b], cap.keys[0, b], dominant - 1, contextual
        )
        assert torch.equal(out.kept_indices[b], ref_kept)
        torch.testing.assert_close(out.tokens[b], ref_tokens, rtol=1e-5, atol=1e-5)
    assert (out.num_dominant == dominant - 1).all() and (out.num_contextual == contextual).all()


def test_visionzip_54_plus_10_gives_64_tokens_like_the_paper():
    cfg = SparseZipConfig(method="visionzip", dominant=54, merging=MergingConfig(contextual_num=10))
    comp = SparseZipCompressor(cfg, num_heads=4, head_dim=16).eval()
    out = comp(random_capture(batch=2, num_patches=576, num_heads=4, head_dim=16, peak=10.0))
    assert comp.max_tokens == 64 and out.tokens.shape[1] == 64
    assert out.num_tokens.tolist() == [64, 64]
    assert out.num_dominant.tolist() == [53, 53]  # 53 patches + CLS = 54 dominant tokens


def test_visionzip_with_fewer_leftovers_than_contextual_masks_empty_slots():
    # dominant 19 = CLS + 18 of the 20 patches
    cfg = SparseZipConfig(method="visionzip", dominant=19, merging=MergingConfig(contextual_num=5))
    comp = SparseZipCompressor(cfg, num_heads=4, head_dim=16).eval()
    out = comp(random_capture(batch=2, num_patches=20, num_heads=4, head_dim=16))
    assert (out.num_contextual == 2).all()  # 2 leftovers: 2 anchors, no members
    assert out.num_tokens.tolist() == [21, 21]
    assert (out.tokens[~out.mask] == 0).all()


def test_none_returns_every_patch_without_cls():
    comp = SparseZipCompressor(SparseZipConfig(method="none"), num_heads=4, head_dim=16)
    with pytest.raises(RuntimeError, match="num_patches"):
        comp.max_tokens
    cap = random_capture(batch=2, num_patches=30, num_heads=4, head_dim=16)
    out = comp(type(cap)(cap.hidden, None, None))  # queries/keys are not needed
    assert torch.equal(out.tokens, cap.hidden[:, 1:])
    assert out.mask.all() and out.mask.shape == (2, 30)
    assert torch.equal(out.kept_indices, torch.arange(30).expand(2, 30))
    assert (out.num_dominant == 30).all() and (out.num_contextual == 0).all()
    assert (out.cluster_map == -1).all()
    assert comp.max_tokens == 30
    assert SparseZipCompressor(SparseZipConfig(method="none"), 4, 16, num_patches=576).max_tokens == 576
