"""Contextual tokens: the leftover (non-dominant) patches merged into at most ``C_ctx`` tokens.

Two merges, both batched over images with per-image leftover sets given as a boolean mask:

* :func:`hierarchical_merge` (SparseZip, DESIGN.md section 2): weighted spherical k-means on the
  unit head-averaged keys with deterministic k-means++ seeding, optional agglomerative merging of
  the centroids down to ``C_ctx``, and score-weighted averages of the members' hidden states.
* :func:`anchor_merge` (VisionZip): uniformly spaced anchors among the leftovers, argmax
  assignment of the others, anchor hidden state plus the mean of its members.

Sequential steps (k-means++ picks, Lloyd iterations, agglomerative merges) are Python loops of a
static length; every step is batched over images and clusters. An empty cluster never yields a
token: its slot is masked out and its values are zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_HASH_MULT = 0x045D9F3B
# Squared distances below this count as duplicates: k-means++ never seeds on them, so identical
# keys collapse into one cluster instead of several copies of the same centroid.
_DUPLICATE_D2 = 1e-6
_MIN_WEIGHT = 1e-30


class ContextualTokens(NamedTuple):
    """tokens [B, C_ctx, C] (hidden's dtype), mask [B, C_ctx] bool, cluster_map [B, N] long
    (slot of each leftover patch, -1 elsewhere), count [B] long (non-empty slots)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    cluster_map: torch.Tensor
    count: torch.Tensor


def hash_uniform(rows: int, cols: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform noise on (0, 1), ``[rows, cols]``, that is a pure function of (row, col, seed).

    A counter-based integer hash (no generator state), so the noise of patch ``n`` at k-means++
    step ``j`` is the same whatever the batch size, the image's position in the batch or the
    device's random state.
    """
    row = torch.arange(rows, device=device, dtype=torch.long).unsqueeze(1)
    col = torch.arange(cols, device=device, dtype=torch.long).unsqueeze(0)
    salt = (seed * 0x27D4EB2F + 0x165667B1) & _MASK32
    x = (col * 0x9E3779B1 + row * 0x85EBCA77 + salt) & _MASK32
    for _ in range(3):
        x = (((x >> 16) ^ x) * _HASH_MULT) & _MASK32
    x = (x >> 16) ^ x
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 bits, strictly inside (0, 1)


def leftover_weights(scores: torch.Tensor, leftover: torch.Tensor, tau: float) -> torch.Tensor:
    """w proportional to softmax(s / tau) over each image's leftovers, 0 elsewhere.

    Only ratios of w matter (weighted means, k-means++ sampling), so w is left unnormalized:
    ``exp((s - max) / tau)``, floored at a tiny positive value so that a leftover's weight never
    underflows to 0 (which could make a non-empty cluster weightless).
    """
    masked = scores.masked_fill(~leftover, float("-inf"))
    top = masked.amax(dim=1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp((scores - top) / tau).clamp_min(_MIN_WEIGHT)
    return torch.where(leftover, weights, torch.zeros_like(weights))


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, K] -> [B, K, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _dead_bias(alive: torch.Tensor) -> torch.Tensor:
    """0 for live, -inf for dead entries (added to similarities so dead ones never win)."""
    return torch.zeros(alive.shape, device=alive.device).masked_fill(~alive, float("-inf"))


def kmeans_pp_init(
    points: torch.Tensor, weights: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means++ seeding, sampled with hash noise.

    points [B, N, d], weights [B, N] (>= 0; 0 excludes a point). Pick j samples a point with
    probability proportional to ``w`` (j = 0) or ``w * D^2`` to the nearest chosen centroid; squared
    distances below a small tolerance count as 0, so duplicates are never seeded twice.
    Returns centroids [B, k, d] and alive [B, k]: False where no candidate was left (fewer
    distinct weighted points than k).
    """
    batch, n, _ = points.shape
    # Exponential race (the Gumbel-max trick without logs): argmax_n p_n / E_n with E_n ~ Exp(1)
    # i.i.d. is a sample from the distribution proportional to p.
    race = weights.unsqueeze(0) / -hash_uniform(k, n, seed, points.device).log().unsqueeze(1)  # [k, B, N]
    # D^2(x, y) = |x|^2 + |y|^2 - 2 x.y as one product of augmented vectors.
    sq_norms = (points * points).sum(dim=-1, keepdim=True)
    ones = torch.ones_like(sq_norms)
    lhs_t = torch.cat([points, sq_norms, ones], dim=-1).transpose(1, 2)  # [B, d + 2, N], a view
    rhs = torch.cat([-2.0 * points, ones, sq_norms], dim=-1)  # [B, N, d + 2]
    chosen, best = [], []
    min_d2 = None
    for step in range(k):
        value, index = (race[0] if min_d2 is None else race[step] * min_d2).max(dim=1, keepdim=True)
        chosen.append(index)
        best.append(value)
        if step == k - 1:
            break
        d2 = torch.bmm(_gather_rows(rhs, index), lhs_t).squeeze(1)  # row times matrix: no slow gemv
        d2 = torch.threshold(d2, _DUPLICATE_D2, 0.0)
        min_d2 = d2 if min_d2 is None else torch.minimum(min_d2, d2)
    return _gather_rows(points, torch.cat(chosen, dim=1)), torch.cat(best, dim=1) > 0


def assign_nearest(points: torch.Tensor, centroids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar live centroid for every point: [B, N] long."""
    sim = torch.baddbmm(_dead_bias(alive).unsqueeze(1), points, centroids.transpose(1, 2))
    return sim.argmax(dim=-1)


def weighted_kmeans(
    points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, alive: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` weighted spherical Lloyd steps, then a final assignment.

    Returns the clusters' weighted point sums [B, k, d] (``sum_n w_n x_n`` over members: the
    mass-weighted, unnormalized centroid), alive [B, k] (False also for centroids left without
    members) and the final assignment [B, N].
    """
    batch, k, dim = centroids.shape
    weighted = points * weights.unsqueeze(-1)
    points_t = points.transpose(1, 2)  # a view: the matmul reads it transposed, no copy
    bias = _dead_bias(alive).unsqueeze(-1)  # [B, k, 1]
    # Buffers reused by every iteration (fresh large allocations cost page faults on CPU).
    sim = points.new_empty(batch, k, points.shape[1])
    members = torch.empty_like(sim)
    for _ in range(iters):
        # Membership as "similarity equals the best one": a max and a compare, then a matmul, are
        # much cheaper on CPU than argmax + scatter over [B, N, k]. A point exactly equidistant
        # from two centroids would count for both in this step; the final assignment is exact.
        torch.baddbmm(bias, centroids, points_t, out=sim)  # [B, k, N]
        # (a float ``out`` also skips a separate bool -> float conversion)
        torch.eq(sim, sim.amax(dim=1, keepdim=True), out=members)
        sums = torch.bmm(members, weighted)
        norm = sums.norm(dim=-1, keepdim=True)
        # A cluster without (weighted) members keeps its previous centroid.
        centroids = torch.where(norm > 0, sums / norm.clamp_min(1e-30), centroids)
    assignment = assign_nearest(points, centroids, alive)
    sums = weighted.new_zeros(batch, k, dim).scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, dim), weighted)
    mass = weights.new_zeros(batch, k).scatter_add_(1, assignment, weights)
    return sums, alive & (mass > 0), assignment


def agglomerate(sums: torch.Tensor, alive: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the two most cosine-similar live clusters until at most ``target`` remain.

    sums [B, k, d]: each cluster's weighted point sum, so that merging two clusters adds their
    sums and the merged centroid is the mass-weighted mean of both (renormalized). The merged
    cluster keeps the lower slot. An image already at ``<= target`` live clusters is left
    unchanged by a step. Runs ``k - target`` steps (static), each batched over images.
    Returns the merged sums [B, k, d] and alive [B, k].
    """
    batch, k, dim = sums.shape
    # Row k is a trash slot: inactive images "merge" trash into trash.
    sums = F.pad(sums, (0, 0, 0, 1))
    alive = F.pad(alive, (0, 1))
    not_self = ~torch.eye(k, dtype=torch.bool, device=sums.device)
    # flat index of a k x k matrix -> (lower, higher) of (row, col); index k * k -> (trash, trash)
    pairs = torch.cartesian_prod(torch.arange(k, device=sums.device), torch.arange(k, device=sums.device))
    pairs = torch.cat([pairs.sort(dim=1).values, pairs.new_full((1, 2), k)])
    for _ in range(k - target):
        live = alive[:, :k]
        centroids = F.normalize(sums[:, :k], dim=-1, eps=1e-12)
        valid = live.unsqueeze(2) & live.unsqueeze(1) & not_self
        bias = torch.zeros(valid.shape, device=sums.device).masked_fill(~valid, float("-inf"))
        flat = torch.baddbmm(bias, centroids, centroids.transpose(1, 2)).flatten(1).argmax(dim=1)
        flat = torch.where(live.sum(dim=1) > target, flat, k * k)
        first, second = pairs[flat].unsqueeze(-1).unbind(dim=1)  # [B, 1] each, first < second
        sums = sums.scatter_add(1, first.unsqueeze(-1).expand(-1, -1, dim), _gather_rows(sums, second))
        alive = alive.scatter(1, second, False)
    return sums[:, :k], alive[:, :k]


def _slot_counts(slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Members per slot: slot [B, N] (-1 = none) -> [B, num_slots] long."""
    target = torch.where(slot >= 0, slot, num_slots)
    counts = torch.zeros(slot.shape[0], num_slots + 1, dtype=torch.long, device=slot.device)
    return counts.scatter_add(1, target, torch.ones_like(target))[:, :num_slots]


def _slot_sums(patches: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``sum_n weights_n * patches_n`` per slot: [B, num_slots, C] float32; slot -1 drops a patch.

    A product with a [B, num_slots, N] one-hot weight matrix: more arithmetic than an index_add
    over rows, but no [B, N, C] temporary (same speed on CPU, better on GPU).
    """
    batch, n, _ = patches.shape
    target = torch.where(slot >= 0, slot, num_slots).unsqueeze(1)
    one_hot = weights.new_zeros(batch, num_slots + 1, n).scatter_(1, target, weights.unsqueeze(1))
    return torch.bmm(one_hot[:, :num_slots], patches.float())


def _weighted_means(
    patches: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor, num_slots: int
) -> torch.Tensor:
    """Per-slot weighted mean of hidden states: [B, num_slots, C] float32 (exactly 0 for empty slots)."""
    target = torch.where(slot >= 0, slot, num_slots)
    totals = weights.new_zeros(weights.shape[0], num_slots + 1).scatter_add(1, target, weights)
    normalized = weights / totals.gather(1, target).clamp_min(torch.finfo(weights.dtype).tiny)
    return _slot_sums(patches, normalized, slot, num_slots)


def _empty(hidden: torch.Tensor) -> ContextualTokens:
    batch, n, width = hidden.shape
    return ContextualTokens(
        hidden.new_zeros(batch, 0, width),
        torch.zeros(batch, 0, dtype=torch.bool, device=hidden.device),
        torch.full((batch, n), -1, dtype=torch.long, device=hidden.device),
        torch.zeros(batch, dtype=torch.long, device=hidden.device),
    )


def hierarchical_merge(
    unit_keys: torch.Tensor,
    hidden: torch.Tensor,
    leftover: torch.Tensor,
    scores: torch.Tensor,
    num_slots: int,
    init_factor: float,
    iters: int,
    agglomerative: bool,
    weight_tau: float,
    seed: int,
) -> ContextualTokens:
    """SparseZip's contextual tokens.

    unit_keys [B, N, d] (float32), hidden [B, N, C], leftover [B, N] bool, scores [B, N]
    (float32; gradients flow through the aggregation weights, the clustering itself is
    discrete). k0 = ceil(init_factor * num_slots) centroids when ``agglomerative`` (merged down
    to ``num_slots``), else ``num_slots``; k0 is capped at N.
    """
    batch, n, _ = hidden.shape
    if num_slots == 0:
        return _empty(hidden)
    k0 = max(math.ceil(init_factor * num_slots), num_slots) if agglomerative else num_slots
    k0 = min(k0, n)

    weights = leftover_weights(scores, leftover, weight_tau)
    points, cluster_weights = unit_keys.detach(), weights.detach()
    centroids, alive = kmeans_pp_init(points, cluster_weights, k0, seed)
    sums, alive, assignment = weighted_kmeans(points, cluster_weights, centroids, alive, iters)
    if k0 > num_slots:
        sums, alive = agglomerate(sums, alive, num_slots)
        assignment = assign_nearest(points, F.normalize(sums, dim=-1, eps=1e-12), alive)
    rank = alive.long().cumsum(dim=1) - 1  # slot of each live centroid, < num_slots
    slot = torch.where(leftover, rank.gather(1, assignment), -1)
    # An empty slot has an all-zero weight column, hence an exactly zero mean.
    tokens = _weighted_means(hidden, weights, slot, num_slots).to(hidden.dtype)
    mask = _slot_counts(slot, num_slots) > 0
    return ContextualTokens(tokens, mask, slot, mask.sum(dim=1))


def anchor_merge(
    unit_keys: torch.Tensor, hidden: torch.Tensor, leftover: torch.Tensor, num_slots: int
) -> ContextualTokens:
    """VisionZip's contextual tokens on a per-image leftover set.

    Among the R leftovers (spatial order), ``step = max(1, R // num_slots)`` and the leftovers of
    rank 0, step, 2*step, ... (at most ``num_slots``) are anchors; every other leftover joins the
    anchor of highest dot product of unit keys; token = anchor hidden + mean of the members'
    hidden states (count clamped to >= 1). Slots without an anchor (R < num_slots) are masked.
    """
    batch, n, _ = hidden.shape
    if num_slots == 0:
        return _empty(hidden)
    rank = leftover.long().cumsum(dim=1) - 1
    total = leftover.sum(dim=1, keepdim=True)
    step = torch.div(total, num_slots, rounding_mode="floor").clamp_min(1)
    anchor_slot = torch.div(rank, step, rounding_mode="floor")
    is_anchor = leftover & (rank % step == 0) & (anchor_slot < num_slots)

    positions = torch.arange(n, device=hidden.device).expand(batch, n)
    target = torch.where(is_anchor, anchor_slot, num_slots)
    anchor_pos = torch.full((batch, num_slots + 1), n, dtype=torch.long, device=hidden.device)
    anchor_pos = anchor_pos.scatter(1, target, positions)[:, :num_slots]  # column num_slots: discard
    has_anchor = anchor_pos < n
    anchor_pos = anchor_pos.clamp(max=n - 1)

    anchor_keys = _gather_rows(unit_keys, anchor_pos)
    assignment = assign_nearest(unit_keys, anchor_keys, has_anchor)
    member = leftover & ~is_anchor
    member_slot = torch.where(member, assignment, -1)
    sums = _slot_sums(hidden, member.to(torch.float32), member_slot, num_slots)
    counts = _slot_counts(member_slot, num_slots).clamp_min(1).unsqueeze(-1)
    tokens = _gather_rows(hidden, anchor_pos).float() + sums / counts
    tokens = tokens.masked_fill_(~has_anchor.unsqueeze(-1), 0.0).to(hidden.dtype)
    cluster_map = torch.where(is_anchor, anchor_slot, member_slot)
    return ContextualTokens(tokens, has_anchor, cluster_map, has_anchor.sum(dim=1))
