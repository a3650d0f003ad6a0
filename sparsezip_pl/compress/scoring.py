"""Per-patch importance scores (docs/design.md section 2).

All functions work on float32 tensors and are batched; several scoring layers are handled by
folding the layer axis into the batch axis. Nothing here builds an L x L attention map: the CLS
attention row is computed from the captured CLS query and keys in O(L) per head. The quadratic
objects are N x N patch similarities: the mutual-information proxy's, which without autograd is
reduced block by block and never stored whole (:func:`mutual_information_proxy`), and, only when
that optional term is on, the diversity term's (:func:`max_min_diversity`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SparseZipOptions

ZSCORE_EPS = 1e-6
UNIT_EPS = 1e-12
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# Base-2 logit of a masked entry: 2^y is exactly 0 and 0 * y stays 0 (no NaN, unlike -inf).
_MASKED_LOGIT = -1.0e4
# Fixed-shift path of the MI proxy: its logits reach -2 log2(e) / tau, which must stay well above
# float32's smallest normal exponent (-126).
_FIXED_SHIFT_MIN_TAU = 2.0 * _LOG2E / 120.0
# Elements per block of the N x N similarity on CPU (two float32 buffers of at most 2 MiB, reused
# by every block, so they stay in cache and are never page-faulted back in; at LLaVA's N = 576 and
# B = 8 this makes 3 x 3 blocks of 192 rows, the fastest of the sizes measured).
_BLOCK_ELEMENTS = 1 << 19


def zscore(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Standardize over ``dim``; a constant input maps to (near) zero instead of NaN."""
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, keepdim=True, correction=0)
    return (x - mean) / (std + ZSCORE_EPS)


def head_sum(keys: torch.Tensor) -> torch.Tensor:
    """Sum over the heads of keys [M, h, N, d] -> [M, N, d].

    One product of a row of ones with each image's [h, N * d] block: it reads the keys once at
    memory speed, where a reduction over the (strided) head axis is several times slower on CPU.
    """
    m, heads, n, d = keys.shape
    if heads == 1:
        return keys[:, 0]
    ones = keys.new_ones(1, 1, heads).expand(m, 1, heads)
    return torch.bmm(ones, keys.reshape(m, heads, n * d)).view(m, n, d)


def cls_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """CLS-query attention probabilities over all L tokens, per head.

    queries: [..., h, d] (unscaled), keys: [..., h, L, d]  ->  [..., h, L], rows sum to 1.
    """
    # q^T K^T (a row vector times a transposed matrix) is several times faster on CPU than the
    # matrix-vector product K q, which gets a poor batched gemv path.
    flat_q = queries.reshape(-1, 1, queries.shape[-1])
    flat_k = keys.reshape(-1, *keys.shape[-2:])
    logits = torch.bmm(flat_q, flat_k.transpose(1, 2)).view(keys.shape[:-1])
    return torch.softmax(logits * (queries.shape[-1] ** -0.5), dim=-1)


def patch_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Head-averaged CLS attention over the N patches, renormalized to a distribution.

    queries: [..., h, d], keys: [..., h, L, d]  ->  [..., N] with N = L - 1, rows sum to 1.
    """
    attn = cls_attention(queries, keys)[..., 1:].mean(dim=-2)
    return attn / attn.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)


def feature_entropy(unit_keys: torch.Tensor, tau_feat: float) -> torch.Tensor:
    """Entropy of softmax(unit key / tau_feat) over the d channels, divided by log d.

    unit_keys: [..., N, d]  ->  [..., N] in [0, 1].
    """
    d = unit_keys.shape[-1]
    # H = log Z - sum(e * y) / Z with y the logits in base 2, shifted by their maximum, and
    # e = 2^y: one exp2 (several times cheaper than exp on CPU), no normalized softmax and no
    # log-probabilities. H does not depend on the shift, hence a detached one (and in-place ops).
    y = unit_keys * (_LOG2E / tau_feat)
    y = y.sub_(y.detach().amax(dim=-1, keepdim=True))
    e = torch.exp2(y)
    total = e.sum(dim=-1)
    dot = (e * y if e.requires_grad else e.mul_(y)).sum(dim=-1)
    entropy = (total.log2() - dot / total) * _LN2
    return entropy / max(math.log(d), UNIT_EPS)


def mutual_information_proxy(unit_keys: torch.Tensor, tau_sim: float) -> torch.Tensor:
    """``1 - H(row-softmax(z z^T / tau_sim)) / log(N - 1)`` with the diagonal masked out.

    unit_keys: [B, N, d], rows of norm <= 1 (unit, or zero for a zero key)  ->  [B, N].
    High values mark patches that resemble few others.

    The N x N similarity matrix is the only quadratic object of the compressor. Without autograd
    it is never materialized: per row, ``H = log Z - sum_j e_j y_j / Z`` with ``y`` the logits
    shifted by a bound of the row maximum and ``e = 2^y`` (base 2: ``exp2`` is several times
    cheaper than ``exp`` on CPU), accumulated block by block in buffers that stay in cache (on
    CPU). With ``tau_sim >= _FIXED_SHIFT_MIN_TAU`` the shift is the global bound ``1 / tau_sim``
    (no row maximum needed), so each off-diagonal block of the symmetric matrix serves its rows
    and its columns: half the matrix product and half the exponentials.
    """
    n = unit_keys.shape[-2]
    if n < 2:
        return unit_keys.new_ones(unit_keys.shape[:-1])
    if unit_keys.requires_grad and torch.is_grad_enabled():
        entropy = _similarity_entropy_autograd(unit_keys, tau_sim)
    elif tau_sim >= _FIXED_SHIFT_MIN_TAU:
        entropy = _similarity_entropy_symmetric(unit_keys, tau_sim)
    else:
        entropy = _similarity_entropy_rows(unit_keys, tau_sim)
    max_entropy = math.log(n - 1) if n > 2 else 1.0  # n == 2: one candidate, entropy 0
    return 1.0 - entropy.clamp_min(0.0) / max_entropy


def _block_rows(batch: int, n: int, device: torch.device) -> int:
    """Rows per block of the N x N matrix: all of them off CPU, else about _BLOCK_ELEMENTS per block."""
    if device.type != "cpu" or batch * n * n <= _BLOCK_ELEMENTS:
        return n
    rows = max(16, int(math.sqrt(_BLOCK_ELEMENTS / batch)))
    blocks = -(-n // rows)
    return -(-n // blocks)  # balanced blocks


def _similarity_entropy_symmetric(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Row entropies (nats) of softmax(z z^T / tau), diagonal excluded, over upper-triangular blocks.

    Logits in base 2 shifted by the bound ``1 / tau`` of every entry (rows of norm <= 1):
    ``y = (x - 1) * log2(e) / tau`` lies in ``[-2 log2(e) / tau, 0]``, so ``2^y`` neither overflows
    nor underflows for ``tau >= _FIXED_SHIFT_MIN_TAU``. Per block, ``2^y`` and ``2^y * y`` sit side
    by side in one buffer, so one reduction per direction gives both sums (rows, and columns for
    an off-diagonal block).
    """
    batch, n, _ = z.shape
    rows = _block_rows(batch, n, z.device)
    bounds = [(start, min(n, start + rows)) for start in range(0, n, rows)]
    alpha = _LOG2E / tau
    shift = z.new_full((), -alpha)
    z_t = z.transpose(1, 2)
    sums = z.new_zeros(2, batch, n)  # Z = sum_j e_j and sum_j e_j y_j
    # One buffer reused by every block (fresh large allocations cost page faults on CPU).
    buffer = z.new_empty(2 * batch * rows * rows)
    for i, (r0, r1) in enumerate(bounds):
        for c0, c1 in bounds[i:]:
            size = (2, batch, r1 - r0, c1 - c0)
            pair = buffer[: size[0] * size[1] * size[2] * size[3]].view(size)  # [e, e * y]
            y = torch.baddbmm(shift, z[:, r0:r1], z_t[:, :, c0:c1], alpha=alpha, out=pair[1])
            diagonal = c0 == r0
            if diagonal:
                y.diagonal(dim1=1, dim2=2).fill_(_MASKED_LOGIT)  # 2^y = 0 and 0 * y = 0 exactly
            y.mul_(torch.exp2(y, out=pair[0]))
            sums[:, :, r0:r1] += pair.sum(dim=3)
            if not diagonal:
                sums[:, :, c0:c1] += pair.sum(dim=2)
    total, dot = sums.unbind(0)
    return (total.log2() - dot / total) * _LN2


def _similarity_entropy_rows(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Row entropies (nats) like :func:`_similarity_entropy_symmetric`, shifted by each row's maximum.

    For small ``tau``, where the global bound could underflow: full rows, in chunks.
    """
    batch, n, _ = z.shape
    rows = max(1, min(n, _BLOCK_ELEMENTS // max(1, batch * n)))
    alpha = _LOG2E / tau
    z_t = z.transpose(1, 2)
    entropy = z.new_empty(batch, n)
    y_buf = z.new_empty(batch * rows * n)
    e_buf = torch.empty_like(y_buf)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        size = (batch, r1 - r0, n)
        numel = size[0] * size[1] * size[2]
        x = torch.bmm(z[:, r0:r1], z_t, out=y_buf[:numel].view(size))
        x.diagonal(offset=r0, dim1=1, dim2=2).fill_(float("-inf"))
        y = x.sub_(x.amax(dim=2, keepdim=True)).mul_(alpha)  # n >= 2: every row has a finite maximum
        y.diagonal(offset=r0, dim1=1, dim2=2).fill_(_MASKED_LOGIT)
        e = torch.exp2(y, out=e_buf[:numel].view(size))
        total = e.sum(dim=2)
        entropy[:, r0:r1] = (total.log2() - e.mul_(y).sum(dim=2) / total) * _LN2
    return entropy


def _similarity_entropy_autograd(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Differentiable (and memory-hungrier) version, used only when the keys need a gradient."""
    x = torch.bmm(z * (1.0 / tau), z.transpose(1, 2))
    # A very negative finite value rather than -inf: its probability underflows to exactly 0 and
    # 0 * value stays 0 (0 * -inf would be NaN).
    eye = torch.eye(x.shape[-1], dtype=torch.bool, device=x.device)
    x = x.masked_fill(eye, torch.finfo(x.dtype).min)
    # log q_j = x_j - log Z for every j, so log Z = max(x) - log(max q) and H = log Z - <q, x>.
    q = torch.softmax(x, dim=-1)
    log_total = x.amax(dim=-1) - q.amax(dim=-1).log()
    return log_total - (q * x).sum(dim=-1)


def text_relevance(
    text_feats: torch.Tensor, text_mask: torch.Tensor, patch_keys: torch.Tensor
) -> torch.Tensor:
    """Relevance of each patch to the question.

    text_feats: [B, T, d] projected question embeddings; text_mask: [B, T] bool;
    patch_keys: [B, N, d] head-averaged keys.  Returns [B, N]: the softmax over patches of
    ``<text, key> / sqrt(d)``, averaged over the valid question tokens (zeros if there are none).
    """
    d = patch_keys.shape[-1]
    logits = torch.bmm(text_feats, patch_keys.transpose(1, 2)) * (d**-0.5)
    probs = torch.softmax(logits, dim=-1)
    weights = text_mask.to(probs.dtype)
    summed = torch.bmm(weights.unsqueeze(1), probs).squeeze(1)
    return summed / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


def max_min_diversity(
    unit_keys: torch.Tensor, scores: torch.Tensor, tau: torch.Tensor, rank_tau: float
) -> torch.Tensor:
    """How unlike a patch is to every patch scored above it: [B, N], in [0, 2].

    unit_keys [B, N, d] (unit or zero rows), scores [B, N] (only their order matters: pass them
    detached), tau a positive scalar tensor. ``1 - m_i`` with ``m_i = sum_j pi_ij c_ij``, c the
    cosine similarities and ``pi_i = softmax_j(c_ij / tau + log sigmoid((s_j - s_i) / rank_tau))``
    over j != i: a soft maximum of patch i's similarity to the patches that outscore it. As both
    temperatures go to 0 this is ``1 - max_{j: s_j > s_i} c_ij``, the distance to the nearest more
    important patch (the max-min criterion). Materializes [B, N, N]: computed only when the term
    is on.
    """
    batch, n, _ = unit_keys.shape
    if n < 2:
        return unit_keys.new_ones(batch, n)
    sim = torch.bmm(unit_keys, unit_keys.transpose(1, 2))  # [B, N, N], c_ij
    above = F.logsigmoid((scores.unsqueeze(1) - scores.unsqueeze(2)) / rank_tau)  # [b, i, j]: s_j above s_i
    eye = torch.eye(n, dtype=torch.bool, device=unit_keys.device)
    weights = torch.softmax((sim / tau + above).masked_fill(eye, float("-inf")), dim=-1)
    return 1.0 - (weights * sim).sum(dim=-1)


def instruction_relevance(
    projected: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """Relevance of each patch to the question in the LLM's input space: [B, N].

    projected [B, N, D] the patches through the model's projector, text [B, T, D] the question's
    token embeddings, text_mask [B, T] bool, tau a positive scalar tensor.
    ``r_i = tau * log(mean_t exp(cos(p_i, e_t) / tau))`` over the valid tokens: about the mean
    cosine for a large tau (CDPruner's relevance, before its sign flip and min-max scaling), the
    best-matching token's cosine as tau goes to 0. Zeros for a question without valid tokens.
    """
    cos = torch.bmm(F.normalize(projected, dim=-1, eps=UNIT_EPS), F.normalize(text, dim=-1, eps=UNIT_EPS).transpose(1, 2))
    # A finite fill (not -inf): a question without valid tokens keeps finite values and gradients.
    logits = (cos / tau).masked_fill(~text_mask.unsqueeze(1), torch.finfo(cos.dtype).min)
    count = text_mask.sum(dim=1, keepdim=True)  # [B, 1]
    relevance = tau * (torch.logsumexp(logits, dim=-1) - count.clamp_min(1).to(cos.dtype).log())
    return torch.where(count > 0, relevance, 0.0)


class HybridScorer(nn.Module):
    """Hybrid, multi-layer, optionally text-aware patch scores.

    Trainable parameters (registered whatever the config, inert where it does not use them):
    ``alphas`` [3] (attention, entropy, mutual information), ``gate_logits`` [S] (layer fusion,
    used with S >= 2), and, when ``text_dim`` is given (used when ``cross_beta > 0``),
    ``text_proj`` (question embedding -> key space) and ``text_gate`` (scalar, starts at 0).
    Registered only when their term is on (so checkpoints of other settings load unchanged):
    ``diversity_gate`` and ``diversity_log_tau`` (``diversity_beta > 0``), ``instruction_gate``
    and ``instruction_log_tau`` (``instruction_beta > 0``).

    The optional terms, each z-scored over the patches and added to the fused score:

    * text: ``cross_beta * text_gate * zscore(text_relevance)`` (key space, learned projection);
    * instruction: ``instruction_beta * instruction_gate * zscore(instruction_relevance)``
      (projector outputs against the question's embeddings, :func:`instruction_relevance`);
    * diversity: ``diversity_beta * diversity_gate * zscore(max_min_diversity)`` against the
      score of the other terms (:func:`max_min_diversity`, ranking by that score, detached).

    Every gate starts at zero, so an untuned compressor with a term on scores exactly like one
    without it, and tuning starts from there instead of from noise (a gate gets a gradient at zero;
    the term's own parameters get one as soon as its gate moves).
    """

    def __init__(self, config: SparseZipOptions, head_dim: int, text_dim: int | None):
        super().__init__()
        self.config = config
        alphas = config.alphas
        self.alphas = nn.Parameter(torch.tensor([alphas.attn, alphas.entropy, alphas.mutual]))
        self.gate_logits = nn.Parameter(torch.zeros(len(config.layers)))
        self.text_proj = nn.Linear(text_dim, head_dim) if text_dim is not None else None
        self.text_gate = nn.Parameter(torch.zeros(())) if text_dim is not None else None
        if config.diversity_beta > 0:
            self.diversity_gate = nn.Parameter(torch.zeros(()))
            self.diversity_log_tau = nn.Parameter(torch.tensor(math.log(config.diversity_tau)))
        if config.instruction_beta > 0:
            self.instruction_gate = nn.Parameter(torch.zeros(()))
            self.instruction_log_tau = nn.Parameter(torch.tensor(math.log(config.instruction_tau)))

    def layer_weights(self) -> torch.Tensor:
        """softmax of the gate logits, [S] float32."""
        return torch.softmax(self.gate_logits.float(), dim=0)

    def forward(
        self,
        attention: torch.Tensor,
        keys: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        project=None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score the patches.

        attention [S, B, h, N] the CLS row's attention to the patches per head (softmax over all
        tokens, CLS column dropped; or the family's substitute), keys [S, B, h, N, d] the patch
        keys (any float dtype). text_embeds [B, T, D] / text_mask [B, T]: the question (text and
        instruction terms); patches [B, N, C] and ``project`` (features -> LLM input space): the
        instruction term.
        Returns ``scores`` [B, N] (float32, fused), ``attention`` [B, N] (gate-weighted CLS
        attention distribution over patches) and ``unit_keys`` [B, N, d] (the head-averaged
        patch keys of the first scoring layer, L2-normalized: what the merge clusters).
        """
        cfg = self.config
        num_layers, batch = attention.shape[:2]
        keys = keys.float().flatten(0, 1)  # [S*B, h, N, d]

        attn = attention.float().flatten(0, 1).mean(dim=-2)  # [S*B, N]
        attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
        # Head-summed patch keys (the head mean times h: the same unit keys); the hybrid terms need
        # every layer's, the rest the first layer's.
        key_sums = head_sum(keys if cfg.hybrid_scoring else keys[:batch])  # [S*B or B, N, d]
        unit_keys = F.normalize(key_sums, dim=-1, eps=UNIT_EPS)
        if cfg.hybrid_scoring:
            terms = torch.stack([
                attn,
                feature_entropy(unit_keys, cfg.tau_feat),
                mutual_information_proxy(unit_keys, cfg.tau_sim),
            ])  # [3, S*B, N]
            layer_scores = (self.alphas.float().view(3, 1, 1) * zscore(terms)).sum(dim=0)
        else:
            layer_scores = zscore(attn)

        layer_scores = layer_scores.unflatten(0, (num_layers, batch))
        attn = attn.unflatten(0, (num_layers, batch))
        if num_layers == 1:
            scores, attention = layer_scores[0], attn[0]
        else:
            gates = self.layer_weights()[:, None, None]
            scores = (gates * zscore(layer_scores)).sum(dim=0)
            attention = (gates * attn).sum(dim=0)

        if cfg.cross_beta > 0:
            proj = self.text_proj
            text_feats = F.linear(text_embeds.float(), proj.weight.float(), proj.bias.float())
            if text_mask is None:
                text_mask = torch.ones(text_feats.shape[:2], dtype=torch.bool, device=text_feats.device)
            relevance = text_relevance(text_feats, text_mask, key_sums[:batch] / keys.shape[1])
            scores = scores + cfg.cross_beta * self.text_gate.float() * zscore(relevance)
        if cfg.instruction_beta > 0:
            if text_mask is None:
                text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
            with torch.no_grad():  # the projector is the model's (frozen): no gradient needed through it
                projected = project(patches).float()
            relevance = instruction_relevance(projected, text_embeds.float(), text_mask, self.instruction_log_tau.float().exp())
            scores = scores + cfg.instruction_beta * self.instruction_gate.float() * zscore(relevance)
        if cfg.diversity_beta > 0:
            diversity = max_min_diversity(
                unit_keys[:batch], scores.detach(), self.diversity_log_tau.float().exp(), cfg.select_tau
            )
            scores = scores + cfg.diversity_beta * self.diversity_gate.float() * zscore(diversity)
        return scores, attention, unit_keys[:batch]
