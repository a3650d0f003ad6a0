"""Assembling a :class:`CompressionOutput` from dominant patches and contextual tokens."""

from __future__ import annotations

import torch

from .config import CompressionOutput
from .merge import ContextualTokens


def assemble_output(
    hidden: torch.Tensor,
    dominant_indices: torch.Tensor,
    num_dominant: torch.Tensor,
    contextual: ContextualTokens,
    scores: torch.Tensor,
    expected_tokens: torch.Tensor,
    dominant_scale: torch.Tensor | None = None,
) -> CompressionOutput:
    """Lay out ``[CLS, dominant slots, contextual slots]``.

    hidden [B, L, C]; dominant_indices [B, slots] patch indices in spatial order with ``N`` in
    unused slots; dominant_scale [B, N] optional per-patch factor applied to the dominant tokens
    (the straight-through ``1 + m - m.detach()``). Padding slots hold zeros and are masked.
    """
    batch, length, width = hidden.shape
    n = length - 1
    used = dominant_indices < n
    safe = dominant_indices.clamp(max=n - 1)
    # Rows of the flattened [B * L, C] hidden states: index_select is much faster than a gather
    # with an expanded [B, slots, C] index.
    rows = safe + 1 + torch.arange(batch, device=hidden.device).unsqueeze(1) * length
    dominant = hidden.reshape(batch * length, width).index_select(0, rows.flatten()).view(batch, -1, width)
    if dominant_scale is not None:
        dominant = dominant * dominant_scale.gather(1, safe).unsqueeze(-1).to(dominant.dtype)
    dominant = dominant.masked_fill_(~used.unsqueeze(-1), 0.0)  # a fresh tensor: in place is safe

    tokens = torch.cat([hidden[:, :1], dominant, contextual.tokens], dim=1)
    cls_mask = torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
    mask = torch.cat([cls_mask, used, contextual.mask], dim=1)
    return CompressionOutput(
        tokens=tokens,
        mask=mask,
        kept_indices=torch.where(used, dominant_indices, -1),
        num_dominant=num_dominant,
        num_contextual=contextual.count,
        cluster_map=contextual.cluster_map,
        scores=scores,
        expected_tokens=expected_tokens,
    )
