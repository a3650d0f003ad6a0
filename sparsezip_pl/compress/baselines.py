"""The baselines of the same harness: ``none`` (all patches) and ``visionzip``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import CompressionOutput
from .merge import anchor_plan
from .output import assemble_output
from .scoring import UNIT_EPS, cls_attention


def compress_none(hidden: torch.Tensor) -> CompressionOutput:
    """The stock model: the N patch tokens, no CLS (LLaVA-1.5's 'default' feature select)."""
    batch, length, _ = hidden.shape
    n = length - 1
    device = hidden.device
    return CompressionOutput(
        tokens=hidden[:, 1:],
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
    hidden: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, dominant: int, contextual_num: int
) -> CompressionOutput:
    """VisionZip (Yang et al., 2024) on one layer's capture.

    hidden [B, L, C]; queries [B, h, d]; keys [B, h, L, d].
    ``dominant`` counts CLS, as VisionZip's ``visionzip(model, dominant, contextual)`` does (its
    code keeps ``dominant_num = dominant - 1`` patches): dominant tokens = CLS + the
    ``dominant - 1`` patches of highest CLS attention summed over heads, in spatial order.
    Contextual: uniform anchors among the remaining patches on unit head-averaged keys, argmax
    assignment, anchor + mean of members (see :func:`merge.anchor_plan`). At most
    ``dominant + contextual_num`` tokens; ``dominant - 1`` is clamped to N, slots it cannot fill
    are masked.
    """
    batch, length, _ = hidden.shape
    n = length - 1
    patches = dominant - 1
    k = min(patches, n)
    attention = cls_attention(queries.float(), keys.float())[:, :, 1:].sum(dim=1)  # [B, N]
    top = attention.topk(k, dim=1).indices
    if patches > k:
        top = F.pad(top, (0, patches - k), value=n)
    indices = top.sort(dim=1).values
    keep = torch.zeros(batch, n + 1, dtype=torch.bool, device=hidden.device)
    leftover = ~keep.scatter(1, indices, True)[:, :n]

    metric = F.normalize(keys.float().mean(dim=1)[:, 1:], dim=-1, eps=UNIT_EPS)
    contextual = anchor_plan(metric, leftover, contextual_num)
    num_dominant = torch.full((batch,), k, dtype=torch.long, device=hidden.device)
    expected = (1 + num_dominant + contextual.count).to(torch.float32)
    return assemble_output(hidden, indices, num_dominant, contextual, attention, expected)
