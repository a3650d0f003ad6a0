"""The baselines of the same harness: ``none`` (all patches) and ``visionzip``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import CompressionOutput
from .merge import anchor_plan
from .output import assemble_output
from .scoring import UNIT_EPS, cls_attention


def compress_none(patches: torch.Tensor) -> CompressionOutput:
    """The stock model: all N patch tokens [B, N, C], as LLaVA-1.5's 'default' feature select
    sends them (no CLS)."""
    batch, n, _ = patches.shape
    device = patches.device
    return CompressionOutput(
        tokens=patches,
        mask=torch.ones(batch, n, dtype=torch.bool, device=device),
        kept_indices=torch.arange(n, device=device).expand(batch, n),
        num_dominant=torch.full((batch,), n, dtype=torch.long, device=device),
        num_contextual=torch.zeros(batch, dtype=torch.long, device=device),
        cluster_map=torch.full((batch, n), -1, dtype=torch.long, device=device),
        scores=torch.zeros(batch, n, device=device),
        expected_tokens=torch.full((batch,), float(n), device=device),
        positions=torch.arange(n, device=device).expand(batch, n),
    )


def compress_visionzip(
    hidden: torch.Tensor,
    attention: torch.Tensor,
    keys: torch.Tensor,
    dominant_patches: int,
    contextual_num: int,
    has_cls: bool = True,
    grid: tuple[int, int] | None = None,
) -> CompressionOutput:
    """VisionZip (Yang et al., CVPR 2025) on one layer's capture.

    hidden [B, L, C] (CLS at 0 when ``has_cls``); attention [B, h, N] the CLS row to the patches
    (softmax over all L tokens, the CLS column dropped), or the family's substitute; keys
    [B, h, N, d] the patches' keys. Dominant tokens: CLS (when present) and the
    ``dominant_patches`` patches of highest attention summed over heads, in spatial order.
    Contextual: uniform anchors among the remaining patches on unit head-averaged keys, argmax
    assignment, anchor + mean of members (:func:`merge.anchor_plan`). ``dominant_patches`` is
    clamped to N; slots it cannot fill are masked.
    """
    batch = hidden.shape[0]
    n = attention.shape[-1]
    k = min(dominant_patches, n)
    score = attention.float().sum(dim=1)  # [B, N]
    top = score.topk(k, dim=1).indices
    if dominant_patches > k:
        top = F.pad(top, (0, dominant_patches - k), value=n)
    indices = top.sort(dim=1).values
    keep = torch.zeros(batch, n + 1, dtype=torch.bool, device=hidden.device)
    leftover = ~keep.scatter(1, indices, True)[:, :n]

    metric = F.normalize(keys.float().mean(dim=1), dim=-1, eps=UNIT_EPS)
    contextual = anchor_plan(metric, leftover, contextual_num)
    num_dominant = torch.full((batch,), k, dtype=torch.long, device=hidden.device)
    expected = (int(has_cls) + num_dominant + contextual.count).to(torch.float32)
    return assemble_output(hidden, indices, num_dominant, contextual, score, expected, has_cls=has_cls, grid=grid)


def cls_patch_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The CLS row's attention to the patches per head: queries [..., h, d], keys [..., h, L, d]
    (CLS at 0) -> [..., h, N], softmax over all L tokens with the CLS column dropped."""
    return cls_attention(queries.float(), keys.float())[..., 1:]
