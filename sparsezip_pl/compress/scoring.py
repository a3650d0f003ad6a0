"""Per-patch importance scores (DESIGN.md section 2).

All functions work on float32 tensors and are batched; several scoring layers are handled by
folding the layer axis into the batch axis. Nothing here builds an L x L attention map: the CLS
attention row is computed from the captured CLS query and keys in O(L) per head. The only
quadratic object is the N x N patch-similarity matrix of the mutual-information proxy, which is
N x N by definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SparseZipConfig

ZSCORE_EPS = 1e-6
UNIT_EPS = 1e-12


def zscore(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Standardize over ``dim``; a constant input maps to (near) zero instead of NaN."""
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, keepdim=True, correction=0)
    return (x - mean) / (std + ZSCORE_EPS)


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
    log_p = torch.log_softmax(unit_keys / tau_feat, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return entropy / max(math.log(d), UNIT_EPS)


def mutual_information_proxy(unit_keys: torch.Tensor, tau_sim: float) -> torch.Tensor:
    """``1 - H(row-softmax(z z^T / tau_sim)) / log(N - 1)`` with the diagonal masked out.

    unit_keys: [B, N, d]  ->  [B, N]. High values mark patches that resemble few others.
    """
    n = unit_keys.shape[-2]
    if n < 2:
        return unit_keys.new_ones(unit_keys.shape[:-1])
    x = torch.bmm(unit_keys * (1.0 / tau_sim), unit_keys.transpose(1, 2))
    # A very negative finite value rather than -inf: its probability underflows to exactly 0 and
    # 0 * value stays 0 (0 * -inf would be NaN).
    x.diagonal(dim1=1, dim2=2).fill_(torch.finfo(x.dtype).min)
    # Entropy of q = softmax(x) without a log pass over the N x N matrix:
    # log q_j = x_j - log Z for every j, so log Z = max(x) - log(max q) and H = log Z - <q, x>.
    q = torch.softmax(x, dim=-1)
    log_total = x.amax(dim=-1) - q.amax(dim=-1).log()
    # In place when possible: no third N x N buffer (keys never need a gradient in this project,
    # but stay correct if they do).
    q_x = q * x if q.requires_grad else q.mul_(x)
    entropy = log_total - q_x.sum(dim=-1)
    max_entropy = math.log(n - 1) if n > 2 else 1.0  # n == 2: one candidate, entropy 0
    return 1.0 - entropy.clamp_min(0.0) / max_entropy


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


class HybridScorer(nn.Module):
    """Hybrid, multi-layer, optionally text-aware patch scores.

    Trainable parameters (registered whatever the config, inert where it does not use them):
    ``alphas`` [3] (attention, entropy, mutual information), ``gate_logits`` [S] (layer fusion,
    used with S >= 2) and ``text_proj`` (question embedding -> key space; exists when
    ``text_dim`` is given, used when ``cross_beta > 0``).
    """

    def __init__(self, config: SparseZipConfig, head_dim: int, text_dim: int | None):
        super().__init__()
        self.config = config
        alphas = config.alphas
        self.alphas = nn.Parameter(torch.tensor([alphas.attn, alphas.entropy, alphas.mutual]))
        self.gate_logits = nn.Parameter(torch.zeros(len(config.layers)))
        self.text_proj = nn.Linear(text_dim, head_dim) if text_dim is not None else None

    def layer_weights(self) -> torch.Tensor:
        """softmax of the gate logits, [S] float32."""
        return torch.softmax(self.gate_logits.float(), dim=0)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score the patches.

        queries [S, B, h, d], keys [S, B, h, L, d] (any float dtype).
        Returns ``scores`` [B, N] (float32, fused), ``attention`` [B, N] (gate-weighted CLS
        attention distribution over patches) and ``mean_keys`` [B, N, d] (head-averaged patch
        keys of the first scoring layer, used for merging).
        """
        cfg = self.config
        num_layers, batch = queries.shape[:2]
        queries = queries.float().flatten(0, 1)  # [S*B, h, d]
        keys = keys.float().flatten(0, 1)  # [S*B, h, L, d]

        attn = patch_attention(queries, keys)  # [S*B, N]
        mean_keys = keys[:, :, 1:].mean(dim=1)  # [S*B, N, d]
        if cfg.hybrid_scoring:
            unit_keys = F.normalize(mean_keys, dim=-1, eps=UNIT_EPS)
            alphas = self.alphas.float()
            layer_scores = (
                alphas[0] * zscore(attn)
                + alphas[1] * zscore(feature_entropy(unit_keys, cfg.tau_feat))
                + alphas[2] * zscore(mutual_information_proxy(unit_keys, cfg.tau_sim))
            )
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

        primary_keys = mean_keys[:batch]
        if cfg.cross_beta > 0:
            proj = self.text_proj
            text_feats = F.linear(text_embeds.float(), proj.weight.float(), proj.bias.float())
            if text_mask is None:
                text_mask = torch.ones(text_feats.shape[:2], dtype=torch.bool, device=text_feats.device)
            relevance = text_relevance(text_feats, text_mask, primary_keys)
            scores = scores + cfg.cross_beta * zscore(relevance)
        return scores, attention, primary_keys
