"""Contextual tokens: the leftover (non-dominant) patches merged into at most ``C_ctx`` tokens.

Two merges, both batched over images with per-image leftover sets given as a boolean mask:

* :func:`hierarchical_plan` (SparseZip, docs/design.md section 2): weighted spherical k-means on the
  unit head-averaged keys with deterministic k-means++ seeding, optional agglomerative merging of
  the centroids down to ``C_ctx``, and score-weighted averages of the members' hidden states.
* :func:`anchor_plan` (VisionZip): uniformly spaced anchors among the leftovers, argmax
  assignment of the others, anchor hidden state plus the mean of its members.

Both return a :class:`ContextualPlan` (which patch goes to which token, with which weight): the
compressor computes all output tokens from it in a single pass over the hidden states
(:func:`output.assemble_output`); :func:`hierarchical_merge` and :func:`anchor_merge` compute the
contextual tokens alone.

Sequential steps (k-means++ picks, Lloyd iterations, agglomerative merges) are Python loops of a
static length; every step is batched over images and clusters. An empty cluster never yields a
token: its slot is masked out and its values are zero.

CPU speed notes (all measured at LLaVA-1.5 shapes, one thread): per-point sums use ``index_add``
(a one-hot matrix product costs k times the arithmetic), argmax over the short cluster axis is a
max / compare / max of vectorized passes (:func:`_first_argmax`), and token sums use
``embedding_bag`` (each needed row read once, no [B, N, C] temporary).
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


class ContextualPlan(NamedTuple):
    """Contextual tokens before they are computed: token ``s`` of image ``b`` is
    ``sum_n weight[b, n] * hidden[b, n]`` over the patches with ``slot[b, n] == s``.

    slot [B, N] long (-1: the patch is in no contextual token; this is the cluster map),
    weight [B, N] float32, mask [B, C_ctx] bool (slots that make a token), count [B] long.
    """

    slot: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor
    count: torch.Tensor


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


_NOISE_CACHE: dict[tuple[int, int, int, str], torch.Tensor] = {}


def _exponential_noise(rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """``-log(hash_uniform(...))``: Exp(1) noise [rows, cols], memoized (outside ``torch.compile``)
    since it depends on nothing but its arguments."""
    if torch.compiler.is_compiling():
        return -hash_uniform(rows, cols, seed, device).log()
    key = (rows, cols, seed, str(device))
    noise = _NOISE_CACHE.get(key)
    if noise is None:
        if len(_NOISE_CACHE) >= 64:
            _NOISE_CACHE.clear()
        noise = _NOISE_CACHE[key] = -hash_uniform(rows, cols, seed, device).log()
    return noise


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


def _first_argmax(
    sim: torch.Tensor, hits: torch.Tensor | None = None, countdown: torch.Tensor | None = None
) -> torch.Tensor:
    """``sim.argmax(dim=1)`` for sim [B, k, N]: [B, N] long, ties going to the lowest index.

    On CPU ``argmax`` over a short axis is several times slower than this: the maximum, a compare
    and a second maximum of ``hit * (k - index)``, all vectorized along N. ``hits`` (a float buffer
    shaped like ``sim``) and ``countdown`` (:func:`_countdown`) may be passed to reuse them. A
    column without a maximum (NaN) gets index k - 1.
    """
    k = sim.shape[1]
    return (k - _countdown_of_max(sim, hits, countdown)).long().clamp_(max=k - 1)


def _countdown_of_max(
    sim: torch.Tensor, hits: torch.Tensor | None = None, countdown: torch.Tensor | None = None
) -> torch.Tensor:
    """``k - argmax`` over dim 1 of sim [B, k, N] as a float [B, N] (ties: lowest index), 0 for a
    column without a maximum (NaN). See :func:`_first_argmax`."""
    k = sim.shape[1]
    best = sim.amax(dim=1, keepdim=True)
    hits = torch.eq(sim, best, out=hits) if hits is not None else torch.eq(sim, best).to(sim.dtype)
    countdown = _countdown(k, sim) if countdown is None else countdown
    return hits.mul_(countdown).amax(dim=1)


def _countdown(k: int, like: torch.Tensor) -> torch.Tensor:
    """[k, 1] float: k, k - 1, ..., 1."""
    return torch.arange(k, 0, -1, dtype=like.dtype, device=like.device).unsqueeze(-1)


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
    batch, n, dim = points.shape
    # Exponential race (the Gumbel-max trick without logs): argmax_n p_n / E_n with E_n ~ Exp(1)
    # i.i.d. is a sample from the distribution proportional to p.
    noise = _exponential_noise(k, n, seed, points.device)  # [k, N]
    race = (weights.unsqueeze(0) / noise.unsqueeze(1)).unbind(0)  # k views [B, N]
    # D^2(x, c) = |x|^2 + |c|^2 - 2 x.c, one product of augmented vectors [x, |x|^2, 1].[-2c, 1, |c|^2].
    sq_norms = torch.linalg.vector_norm(points, dim=-1, keepdim=True).square_()
    ones = torch.ones_like(sq_norms)
    # [B, d + 2, N], contiguous: a row times it is one fast product per step (a transposed view
    # or a matrix-vector product are both slower, and there are k - 1 of them).
    lhs_t = torch.cat([points, sq_norms, ones], dim=-1).transpose(1, 2).contiguous()
    rhs = torch.cat([points * -2.0, ones, sq_norms], dim=-1).view(batch * n, dim + 2)
    first_row = torch.arange(0, batch * n, n, device=points.device)  # [B]
    chosen, best = [], []
    min_d2 = None
    for step in range(k):
        value, index = (race[0] if min_d2 is None else race[step] * min_d2).max(dim=1)  # [B]
        chosen.append(index)
        best.append(value)
        if step == k - 1:
            break
        d2 = torch.bmm(rhs.index_select(0, index + first_row).unsqueeze(1), lhs_t).squeeze(1)  # [B, N]
        d2 = torch.threshold_(d2, _DUPLICATE_D2, 0.0)
        min_d2 = d2 if min_d2 is None else torch.minimum(min_d2, d2, out=min_d2)
    return _gather_rows(points, torch.stack(chosen, dim=1)), torch.stack(best, dim=1) > 0


def assign_nearest(points: torch.Tensor, centroids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar live centroid for every point: [B, N] long (ties: lowest)."""
    sim = torch.baddbmm(_dead_bias(alive).unsqueeze(-1), centroids, points.transpose(1, 2))  # [B, k, N]
    return _first_argmax(sim)


def _sum_by_index_add(device: torch.device) -> bool:
    """Per-cluster sums by ``index_add`` (CPU: every point added once, where a one-hot matrix
    product costs k times more) or by that product (elsewhere: a GPU's ``index_add`` adds with
    atomics, in a varying order, so results would not be reproducible)."""
    return device.type == "cpu"


def weighted_kmeans(
    points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, alive: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` weighted spherical Lloyd steps, then a final assignment.

    Returns the clusters' weighted point sums [B, k, d] (``sum_n w_n x_n`` over members: the
    mass-weighted, unnormalized centroid), alive [B, k] (False also for centroids left without
    members) and the final assignment [B, N].

    Every step is one product (similarities), one argmax over the clusters and one sum of the
    rows ``[w x, w]`` per cluster (the mass rides along as a last column), so the centroids and
    the final masses come from the same pass.
    """
    batch, k, dim = centroids.shape
    n = points.shape[1]
    values = torch.cat([points * weights.unsqueeze(-1), weights.unsqueeze(-1)], dim=-1)  # [B, N, d + 1]
    points_t = points.transpose(1, 2)  # a view: the matmul reads it transposed, no copy
    bias = _dead_bias(alive).unsqueeze(-1)  # [B, k, 1]
    # Buffers reused by every iteration (fresh large allocations cost page faults on CPU).
    sim = points.new_empty(batch, k, n)
    hits = torch.empty_like(sim)
    countdown = _countdown(k, sim)
    if _sum_by_index_add(points.device):
        # Row b * (k + 1) + j of a flat buffer sums cluster j of image b; row b * (k + 1) + k is a
        # trash row for points without a maximum (NaN similarities), so no clamp is needed.
        rows = k + 1
        last_row = torch.arange(1, batch + 1, device=points.device).mul_(rows).sub_(1).unsqueeze(1).to(sim.dtype)
        flat_values = values.view(batch * n, dim + 1)
        buffer = values.new_empty(batch * rows, dim + 1)

        def assign_and_sum() -> tuple[torch.Tensor, torch.Tensor]:
            """(per-cluster sums of [w x, w] [B, k, d + 1], k - assignment [B, N] float)."""
            torch.baddbmm(bias, centroids, points_t, out=sim)  # [B, k, N]
            countdown_hit = _countdown_of_max(sim, hits, countdown)  # k - argmax, 0 for none
            target = torch.sub(last_row, countdown_hit).long().view(-1)
            sums = buffer.zero_().index_add_(0, target, flat_values).view(batch, rows, dim + 1)
            return sums[:, :k], countdown_hit

    else:

        def assign_and_sum() -> tuple[torch.Tensor, torch.Tensor]:
            torch.baddbmm(bias, centroids, points_t, out=sim)
            countdown_hit = _countdown_of_max(sim, hits, countdown)
            assignment = (k - countdown_hit).long().clamp_(max=k - 1)
            one_hot = torch.zeros_like(sim).scatter_(1, assignment.unsqueeze(1), 1.0)
            return torch.bmm(one_hot, values), countdown_hit

    for _ in range(iters):
        sums = assign_and_sum()[0][..., :dim]
        norm = torch.linalg.vector_norm(sums, dim=-1, keepdim=True)
        # A cluster without (weighted) members keeps its previous centroid.
        centroids = torch.where(norm > 0, sums / norm.clamp_min(1e-30), centroids)
    sums, countdown_hit = assign_and_sum()
    assignment = (k - countdown_hit).long().clamp_(max=k - 1)
    return sums[..., :dim], alive & (sums[..., dim] > 0), assignment


_PAIR_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _pair_tables(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a k x k similarity matrix: the -inf diagonal bias [k, k] and, per flat index, the
    (lower, higher) of (row, col) [k * k + 1, 2], the last row (k, k) for "nothing to merge".
    Memoized outside ``torch.compile`` (constants of k)."""
    key = (k, str(device))
    if not torch.compiler.is_compiling() and key in _PAIR_CACHE:
        return _PAIR_CACHE[key]
    not_self = torch.zeros(k, k, device=device).fill_diagonal_(float("-inf"))
    index = torch.arange(k, device=device)
    pairs = torch.stack(torch.broadcast_tensors(index.unsqueeze(1), index.unsqueeze(0)), dim=-1).view(k * k, 2)
    pairs = torch.cat([pairs.sort(dim=1).values, pairs.new_full((1, 2), k)])
    if not torch.compiler.is_compiling():
        if len(_PAIR_CACHE) >= 64:
            _PAIR_CACHE.clear()
        _PAIR_CACHE[key] = (not_self, pairs)
    return not_self, pairs


def agglomerate(sums: torch.Tensor, alive: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the two most cosine-similar live clusters until at most ``target`` remain.

    sums [B, k, d]: each cluster's weighted point sum, so that merging two clusters adds their
    sums and the merged centroid is the mass-weighted mean of both (renormalized). The merged
    cluster keeps the lower slot. An image already at ``<= target`` live clusters is left
    unchanged by a step. Runs ``k - target`` steps (static), each batched over images.
    Returns the merged sums [B, k, d] and alive [B, k].
    """
    batch, k, dim = sums.shape
    steps = k - target
    if steps <= 0:
        return sums, alive
    device = sums.device
    rows = k + 1  # row k of each image is a trash slot: with nothing to merge, trash merges into trash
    sums = F.pad(sums, (0, 0, 0, 1))  # a fresh tensor, updated in place below
    not_self, pairs = _pair_tables(rows, device)
    # Half of the similarity bias, kept up to date in place: row j is -inf once cluster j is dead
    # (the trash row k too), the diagonal is -inf; ``half + half^T`` is -inf exactly on the pairs
    # that may not merge (a dead cluster or a cluster with itself), 0 elsewhere.
    half = _dead_bias(F.pad(alive, (0, 1), value=False)).unsqueeze(2) + not_self  # [B, k + 1, k + 1]
    sums_flat, half_rows, live_sums = sums.view(batch * rows, dim), half.view(batch * rows, rows), sums[:, :k]
    half_live = half[:, :k, :k]
    image = torch.arange(batch, device=device)
    # flat index of image b's k x k matrix (k * k: nothing to merge) -> flat rows of (lower, higher)
    pairs = torch.cat([_pair_tables(k, device)[1][:-1], pairs.new_full((1, 2), k)])
    pair_rows = (pairs.unsqueeze(0) + (image * rows).view(batch, 1, 1)).view(-1, 2)  # [B * (k * k + 1), 2]
    first_pair = image * (k * k + 1)
    trash = first_pair + k * k
    # Every merge removes one live cluster: image b merges in its first (live_b - target) steps.
    active = ((alive.sum(dim=1, keepdim=True) - target) > torch.arange(steps, device=device)).unbind(1)
    for step in range(steps):
        norm = torch.linalg.vector_norm(live_sums, dim=-1, keepdim=True)
        centroids = live_sums / norm.clamp_min(1e-12)  # F.normalize
        bias = half_live + half_live.transpose(1, 2)
        flat = torch.baddbmm(bias, centroids, centroids.transpose(1, 2)).view(batch, k * k).argmax(dim=1)
        first, second = pair_rows[torch.where(active[step], flat + first_pair, trash)].unbind(1)  # flat rows
        sums_flat.index_add_(0, first, sums_flat.index_select(0, second))
        half_rows.index_fill_(0, second, float("-inf"))
    return sums[:, :k], half[:, :k, k] == 0


def _bag_sums(patches: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``sum_n weights_n * patches_n`` per slot: [B, num_slots, C] float32; slot -1 drops a patch.

    One ``embedding_bag`` over the patches grouped by (image, slot): every patch row is read once
    and scaled on the fly, with no [B, N, C] temporary and no one-hot matrix product.
    """
    batch, n, width = patches.shape
    bags = num_slots + 1  # the last bag of each image collects the dropped patches
    image = torch.arange(batch, device=slot.device).unsqueeze(1)
    key = (torch.where(slot >= 0, slot, num_slots) + image * bags).view(-1)
    counts = torch.zeros(batch * bags, dtype=torch.long, device=slot.device).index_add_(0, key, torch.ones_like(key))
    order = key.argsort(stable=True)  # grouped by bag, patch order inside a bag
    table, first_row = _row_table(patches.float())
    rows = order + first_row.index_select(0, torch.div(order, n, rounding_mode="floor"))
    offsets = counts.cumsum(0) - counts
    sums = F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])
    return sums.view(batch, bags, width)[:, :num_slots]


def _row_table(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [R, C] view of the patch rows (no copy for ``hidden[:, 1:]`` and the like) and, per image,
    the offset to add to the flat patch index ``b * N + n`` to get its row: [B] long."""
    batch, n, width = patches.shape
    image_stride, row_stride, col_stride = patches.stride()
    spare = torch.arange(batch, device=patches.device)
    if row_stride == width and col_stride == 1 and image_stride % width == 0 and image_stride >= n * width:
        rows_per_image = image_stride // width
        table = patches.as_strided(((batch - 1) * rows_per_image + n, width), (width, 1))
        return table, spare * (rows_per_image - n)
    return patches.reshape(batch * n, width), spare * 0


def _slot_totals(values: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Sum of ``values`` [B, N] per slot: [B, num_slots + 1], the last column for slot -1."""
    target = torch.where(slot >= 0, slot, num_slots)
    return values.new_zeros(values.shape[0], num_slots + 1).scatter_add(1, target, values)


def _empty_plan(unit_keys: torch.Tensor) -> ContextualPlan:
    batch, n, _ = unit_keys.shape
    device = unit_keys.device
    return ContextualPlan(
        torch.full((batch, n), -1, dtype=torch.long, device=device),
        torch.zeros(batch, n, device=device),
        torch.zeros(batch, 0, dtype=torch.bool, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
    )


def contextual_tokens(plan: ContextualPlan, patches: torch.Tensor) -> ContextualTokens:
    """Compute the tokens of a plan: patches [B, N, C] -> :class:`ContextualTokens` (patches' dtype).

    (The compressor does not call this: :func:`output.assemble_output` computes every output
    token, dominant and contextual, in one pass over the hidden states.)
    """
    num_slots = plan.mask.shape[1]
    if num_slots == 0:
        tokens = patches.new_zeros(patches.shape[0], 0, patches.shape[2])
    else:
        tokens = _bag_sums(patches, plan.weight, plan.slot, num_slots).to(patches.dtype)
    return ContextualTokens(tokens, plan.mask, plan.slot, plan.count)


def hierarchical_plan(
    unit_keys: torch.Tensor,
    leftover: torch.Tensor,
    scores: torch.Tensor,
    num_slots: int,
    init_factor: float,
    iters: int,
    agglomerative: bool,
    weight_tau: float,
    seed: int,
) -> ContextualPlan:
    """SparseZip's contextual tokens, as a :class:`ContextualPlan`.

    unit_keys [B, N, d] (float32), leftover [B, N] bool, scores [B, N] (float32; gradients flow
    through the aggregation weights, the clustering itself is discrete). k0 =
    ceil(init_factor * num_slots) centroids when ``agglomerative`` (merged down to
    ``num_slots``), else ``num_slots``; k0 is capped at N. Each token is the w-weighted mean of
    its members, w = softmax(s / weight_tau) over the leftovers.
    """
    n = unit_keys.shape[1]
    if num_slots == 0:
        return _empty_plan(unit_keys)
    k0 = max(math.ceil(init_factor * num_slots), num_slots) if agglomerative else num_slots
    k0 = min(k0, n)

    weights = leftover_weights(scores, leftover, weight_tau)
    points, cluster_weights = unit_keys.detach(), weights.detach()
    centroids, alive = kmeans_pp_init(points, cluster_weights, k0, seed)
    sums, alive, assignment = weighted_kmeans(points, cluster_weights, centroids, alive, iters)
    if k0 > num_slots:
        sums, alive = agglomerate(sums, alive, num_slots)
        # At most num_slots clusters are left: pack them (in slot order) into num_slots rows, so the
        # final assignment compares every point with num_slots centroids instead of k0, and its
        # argmax is the slot itself (ties still go to the lowest slot).
        order = torch.argsort((~alive).to(torch.uint8), dim=1, stable=True)[:, :num_slots]
        centroids = F.normalize(_gather_rows(sums, order), dim=-1, eps=1e-12)
        slot = torch.where(leftover, assign_nearest(points, centroids, alive.gather(1, order)), -1)
    else:
        rank = alive.long().cumsum(dim=1) - 1  # slot of each live centroid, < num_slots
        slot = torch.where(leftover, rank.gather(1, assignment), -1)
    target = torch.where(slot >= 0, slot, num_slots)
    totals = _slot_totals(weights, slot, num_slots)
    normalized = weights / totals.gather(1, target).clamp_min(torch.finfo(weights.dtype).tiny)
    # An empty slot has no member, hence no token (and an exactly zero row in the output).
    mask = _slot_totals(leftover.to(weights.dtype), slot, num_slots)[:, :num_slots] > 0
    return ContextualPlan(slot, normalized, mask, mask.sum(dim=1))


def anchor_plan(unit_keys: torch.Tensor, leftover: torch.Tensor, num_slots: int) -> ContextualPlan:
    """VisionZip's contextual tokens on a per-image leftover set, as a :class:`ContextualPlan`.

    Among the R leftovers (spatial order), ``step = max(1, R // num_slots)`` and the leftovers of
    rank 0, step, 2*step, ... (at most ``num_slots``) are anchors; every other leftover joins the
    anchor of highest dot product of unit keys; token = anchor hidden + mean of the members'
    hidden states (weights 1 and 1 / members). Slots without an anchor (R < num_slots) are masked.
    """
    batch, n, _ = unit_keys.shape
    if num_slots == 0:
        return _empty_plan(unit_keys)
    device = unit_keys.device
    rank = leftover.long().cumsum(dim=1) - 1
    total = leftover.sum(dim=1, keepdim=True)
    step = torch.div(total, num_slots, rounding_mode="floor").clamp_min(1)
    anchor_slot = torch.div(rank, step, rounding_mode="floor")
    is_anchor = leftover & (rank % step == 0) & (anchor_slot < num_slots)

    positions = torch.arange(n, device=device).expand(batch, n)
    target = torch.where(is_anchor, anchor_slot, num_slots)
    anchor_pos = torch.full((batch, num_slots + 1), n, dtype=torch.long, device=device)
    anchor_pos = anchor_pos.scatter(1, target, positions)[:, :num_slots]  # column num_slots: discard
    has_anchor = anchor_pos < n
    anchor_pos = anchor_pos.clamp(max=n - 1)

    anchor_keys = _gather_rows(unit_keys, anchor_pos)
    assignment = assign_nearest(unit_keys, anchor_keys, has_anchor)
    member = leftover & ~is_anchor
    member_slot = torch.where(member, assignment, -1)
    members = _slot_totals(member.to(torch.float32), member_slot, num_slots).clamp_min(1.0)
    member_weight = 1.0 / members.gather(1, torch.where(member, assignment, num_slots))
    weight = torch.where(is_anchor, 1.0, torch.where(member, member_weight, 0.0))
    cluster_map = torch.where(is_anchor, anchor_slot, member_slot)
    return ContextualPlan(cluster_map, weight, has_anchor, has_anchor.sum(dim=1))


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
    """SparseZip's contextual tokens (:func:`hierarchical_plan`) computed from hidden [B, N, C]."""
    plan = hierarchical_plan(
        unit_keys, leftover, scores, num_slots, init_factor, iters, agglomerative, weight_tau, seed
    )
    return contextual_tokens(plan, hidden)


def anchor_merge(
    unit_keys: torch.Tensor, hidden: torch.Tensor, leftover: torch.Tensor, num_slots: int
) -> ContextualTokens:
    """VisionZip's contextual tokens (:func:`anchor_plan`) computed from hidden [B, N, C]."""
    return contextual_tokens(anchor_plan(unit_keys, leftover, num_slots), hidden)
