"""Assembling a :class:`CompressionOutput` from dominant patches and a contextual plan."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .types import CompressionOutput
from .merge import ContextualPlan


def assemble_output(
    hidden: torch.Tensor,
    dominant_indices: torch.Tensor,
    num_dominant: torch.Tensor,
    contextual: ContextualPlan,
    scores: torch.Tensor,
    expected_tokens: torch.Tensor,
    dominant_scale: torch.Tensor | None = None,
    has_cls: bool = True,
    grid: tuple[int, int] | None = None,
) -> CompressionOutput:
    """Lay out ``[CLS, dominant slots, contextual slots]`` (no CLS slot when ``has_cls`` is False).

    hidden [B, L, C] with the CLS token at 0 when ``has_cls`` (then N = L - 1 patches), else L = N
    patches; dominant_indices [B, slots] patch indices in spatial order with ``N`` in unused
    slots; dominant_scale [B, N] optional per-patch factor applied to the dominant tokens (the
    straight-through ``1 + m - m.detach()``). Padding slots hold zeros and are masked.

    Every output token is a weighted sum of rows of ``hidden`` (CLS and a dominant patch: one row
    of weight 1 or the straight-through factor; a contextual token: its plan's members), so the
    whole output is one ``embedding_bag`` over the rows grouped by output slot: each needed row is
    read once and the result is written in place, with no gather, concatenation or zero fill
    (an empty slot is an empty bag, which sums to exactly 0).
    """
    batch, length, width = hidden.shape
    head = int(has_cls)  # rows before the first patch, and slots before the first dominant one
    n = length - head
    slots = dominant_indices.shape[1]
    t_max = head + slots + contextual.mask.shape[1]
    device = hidden.device
    image = torch.arange(batch, device=device).unsqueeze(1)
    first_bag, first_row = image * t_max, image * length
    unused = batch * t_max  # one extra bag, after the output's, collects every unused entry

    used = dominant_indices < n
    safe = dominant_indices.clamp(max=n - 1)
    in_context = contextual.slot >= 0
    bags = [
        torch.where(used, first_bag + head + torch.arange(slots, device=device), unused),
        torch.where(in_context, first_bag + head + slots + contextual.slot, unused),
    ]
    # Unused entries read row 0 with weight 0: the same cached row, no traffic.
    rows = [
        torch.where(used, first_row + head + safe, 0),
        torch.where(in_context, first_row + head + torch.arange(n, device=device), 0),
    ]
    ones = torch.ones(batch, 1, device=device)
    dominant_weight = ones.expand(batch, slots) if dominant_scale is None else dominant_scale.gather(1, safe).float()
    weights = [dominant_weight, contextual.weight.float()]
    if has_cls:
        bags.insert(0, first_bag)
        rows.insert(0, first_row)
        weights.insert(0, ones)
    bag, row, weight = (torch.cat(parts, dim=1).view(-1) for parts in (bags, rows, weights))

    order = bag.argsort(stable=True)  # grouped by output slot; patch order inside a slot
    counts = torch.zeros(unused + 1, dtype=torch.long, device=device).index_add_(0, bag, torch.ones_like(bag))
    offsets = counts.cumsum(0) - counts
    table = hidden.reshape(batch * length, width).float()  # a view for contiguous float32 hidden states
    tokens = F.embedding_bag(row[order], table, offsets, mode="sum", per_sample_weights=weight[order])
    tokens = tokens[:unused].view(batch, t_max, width).to(hidden.dtype)

    masks = [used, contextual.mask]
    positions = [torch.where(used, safe, 0), contextual_positions(contextual, n, grid)]
    if has_cls:
        masks.insert(0, torch.ones(batch, 1, dtype=torch.bool, device=device))
        positions.insert(0, torch.zeros(batch, 1, dtype=torch.long, device=device))
    return CompressionOutput(
        tokens=tokens,
        mask=torch.cat(masks, dim=1),
        kept_indices=torch.where(used, dominant_indices, -1),
        num_dominant=num_dominant,
        num_contextual=contextual.count,
        cluster_map=contextual.slot,
        scores=scores,
        expected_tokens=expected_tokens,
        positions=torch.cat(positions, dim=1),
    )


def contextual_positions(
    contextual: ContextualPlan, num_patches: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """[B, C_ctx] long: for each contextual token, the patch nearest the centroid of its members
    on the image's ``grid`` (rows, cols), weighted by the members' |weight| (row-major index;
    without ``grid``, a square grid, or one row). Empty slots get 0."""
    batch, slots = contextual.mask.shape
    if slots == 0:
        return contextual.slot.new_zeros(batch, 0)
    if grid is not None and grid[0] * grid[1] == num_patches:
        width = grid[1]
    else:
        side = math.isqrt(num_patches)
        width = side if side * side == num_patches else num_patches
    index = torch.arange(num_patches, device=contextual.slot.device)
    coords = torch.stack([index // width, index % width], dim=-1).float()  # [N, 2] row, col
    in_context = contextual.slot >= 0
    weight = torch.where(in_context, contextual.weight.float().abs(), 0.0)  # [B, N]
    target = torch.where(in_context, contextual.slot, 0)
    sums = weight.new_zeros(batch, slots, 3)
    values = torch.cat([weight.unsqueeze(-1) * coords, weight.unsqueeze(-1)], dim=-1)  # [B, N, 3]
    sums.scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, 3), values)
    centroid = sums[..., :2] / sums[..., 2:].clamp_min(torch.finfo(sums.dtype).tiny)
    row = centroid[..., 0].round().clamp(0, num_patches // width - 1)
    col = centroid[..., 1].round().clamp(0, width - 1)
    return torch.where(contextual.mask, (row * width + col).long(), 0)
