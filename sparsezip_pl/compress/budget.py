"""How many dominant patches each image keeps (dynamic K) and which ones (docs/design.md sections 2-3).

K is a [B] long tensor computed on the device: no host sync, no data-dependent shapes. The
selection takes one ``topk`` of the largest possible budget and masks the ranks beyond each
image's K.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SparseZipOptions

DEFAULT_OFFSET = {"seed": 8.0, "attention_entropy": 0.0}


class DominantSelection(NamedTuple):
    """Result of :func:`select_dominant`.

    indices: [B, slots] long, kept patch indices in spatial order, ``N`` in unused slots.
    keep:    [B, N] bool, True for kept patches.
    count:   [B] long, K per image.
    soft:    [B, N] float32, ``sigmoid((s - thr) / tau)``, the differentiable keep indicator.
    """

    indices: torch.Tensor
    keep: torch.Tensor
    count: torch.Tensor
    soft: torch.Tensor


class TokenBudget(nn.Module):
    """Dynamic-K rule with a trainable offset ``c`` (``offset``).

    ``seed``: ``K = log(var(s) + eps) + c`` (var over patches, no Bessel correction).
    ``attention_entropy``: ``K = scale * exp(H(a)) + c`` with ``a`` the CLS attention over patches.
    The result is continuous; :func:`select_dominant` rounds and clamps it.
    """

    def __init__(self, config: SparseZipOptions):
        super().__init__()
        dynk = config.dynk
        offset = DEFAULT_OFFSET[dynk.rule] if dynk.c is None else dynk.c
        self.rule = dynk.rule
        self.eps = dynk.eps
        self.scale = dynk.scale
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, scores: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """scores [B, N], attention [B, N] (a distribution)  ->  continuous K [B] float32."""
        offset = self.offset.float()
        if self.rule == "seed":
            return torch.log(scores.var(dim=-1, correction=0) + self.eps) + offset
        entropy = -torch.xlogy(attention, attention).sum(dim=-1)
        return self.scale * entropy.exp() + offset


def soft_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Smooth clamp to [low, high]: about ``x`` inside the range, with a non-zero slope everywhere."""
    if high <= low:
        return torch.full_like(x, float(low))
    return low + F.softplus(x - low) - F.softplus(x - high)


def select_dominant(
    scores: torch.Tensor,
    k_continuous: torch.Tensor | None,
    k_low: int,
    k_high: int,
    slots: int,
    tau: float,
) -> DominantSelection:
    """Keep the top-K patches of each image, K = clamp(round(k_continuous), k_low, k_high).

    ``k_continuous=None`` means the fixed budget ``K = k_high``. The caller clamps the bounds to
    ``0 <= k_low <= k_high <= N``; ``slots >= k_high`` is the static width of the output.
    The threshold of the soft indicator is the score at rank K, interpolated linearly between
    the sorted scores at floor/ceil of the soft-clamped continuous K, so that the offset ``c``
    receives a gradient; the hard selection uses the rounded K.
    """
    batch, n = scores.shape
    if k_continuous is None:
        count = torch.full((batch,), k_high, dtype=torch.long, device=scores.device)
        k_soft = torch.full((batch,), float(k_high), device=scores.device)
    else:
        # NaN only comes from NaN inputs (with check_inputs off): keep indices valid regardless.
        k_continuous = torch.nan_to_num(k_continuous, nan=float(k_low))
        count = torch.round(k_continuous).clamp(k_low, k_high).long()
        k_soft = soft_clamp(k_continuous, k_low, k_high)

    top_values, top_indices = scores.topk(min(k_high + 1, n), dim=1)
    last = top_values.shape[1] - 1
    position = (k_soft - 1.0).clamp(0.0, float(last))
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=last)
    frac = (position - lower.to(position.dtype)).unsqueeze(1)
    v_lower = top_values.gather(1, lower.unsqueeze(1))
    v_upper = top_values.gather(1, upper.unsqueeze(1))
    threshold = v_lower + frac * (v_upper - v_lower)
    soft = torch.sigmoid((scores - threshold) / tau)

    ranks = torch.arange(k_high, device=scores.device)
    chosen = torch.where(ranks < count.unsqueeze(1), top_indices[:, :k_high], n)
    if slots > k_high:
        chosen = F.pad(chosen, (0, slots - k_high), value=n)
    indices = chosen.sort(dim=1).values  # spatial order, unused (= n) last
    keep = torch.zeros(batch, n + 1, dtype=torch.bool, device=scores.device)
    keep = keep.scatter(1, indices, True)[:, :n]
    return DominantSelection(indices, keep, count, soft)
