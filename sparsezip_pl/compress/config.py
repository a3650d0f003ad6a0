"""Typed configuration and I/O containers of the compressor.

The field names keep the seed prototype's YAML names (``alphas.attn``, ``tau_feat``, ``dynk.c``,
``merging.contextual_num`` ...), so an old ``sparsezip:`` block reads unchanged. The classes are
plain dataclasses so that LightningCLI (jsonargparse) can parse, document and validate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Method = Literal["sparsezip", "visionzip", "none"]
DynamicKRule = Literal["seed", "attention_entropy"]


@dataclass
class Alphas:
    """Initial weights of the three hybrid-score terms (trainable parameters)."""

    attn: float = 1.0
    entropy: float = 0.4
    mutual: float = 0.6


@dataclass
class DynKConfig:
    """Dynamic-K rule.

    ``seed``: ``K = round(log(var(s) + eps) + c)``, the prototype's rule (``c`` defaults to 8).
    ``attention_entropy``: ``K = round(scale * n_eff + c)`` with ``n_eff = exp(H(a))`` the
    effective number of patches the head-averaged CLS attention ``a`` spreads over (``c``
    defaults to 0). The offset ``c`` is a trainable parameter in both rules.
    """

    rule: DynamicKRule = "attention_entropy"
    c: float | None = None
    eps: float = 1.0e-6
    scale: float = 0.5


@dataclass
class MergingConfig:
    """How the leftover (non-dominant) patches become contextual tokens."""

    contextual_num: int = 16
    kmeans_init_factor: float = 2.0
    kmeans_iters: int = 10
    agglomerative: bool = True
    # Ablation switch: False replaces k-means/agglomerative/score-weighting by VisionZip's
    # uniform anchors + argmax assignment + anchor-plus-mean merge.
    hierarchical: bool = True


@dataclass
class SparseZipConfig:
    """Everything that defines one compression method.

    ``method``: ``none`` (all patches, the stock model), ``visionzip`` (VisionZip's published
    algorithm with ``dominant`` and ``merging.contextual_num``), or ``sparsezip``.
    ``layers``: vision encoder layers used for scoring, indexed like ``hidden_states`` /
    LLaVA's ``mm_vision_select_layer`` (-2 = the second-to-last encoder layer).
    Ablations of SparseZip: ``hybrid_scoring=False`` scores by CLS attention alone,
    ``dynamic_k=False`` keeps a fixed ``dominant`` tokens (CLS included), ``merging.hierarchical=False``
    merges leftovers the VisionZip way.
    """

    method: Method = "sparsezip"
    layers: list[int] = field(default_factory=lambda: [-2])
    dynamic_k: bool = True
    dominant: int = 54
    """Dominant tokens of ``visionzip`` and of ``sparsezip`` with ``dynamic_k=False``, counted as
    VisionZip counts them: CLS included, so ``dominant - 1`` patches are kept (VisionZip's
    ``visionzip(model, dominant=54, contextual=10)`` yields 54 + 10 = 64 visual tokens). >= 1."""
    k_min: int = 8
    k_max: int = 64
    dynk: DynKConfig = field(default_factory=DynKConfig)
    alphas: Alphas = field(default_factory=Alphas)
    hybrid_scoring: bool = True
    tau_feat: float = 0.2
    tau_sim: float = 0.1
    cross_beta: float = 0.0
    merging: MergingConfig = field(default_factory=MergingConfig)
    # Training-only temperatures: straight-through top-K sigmoid and contextual weights.
    select_tau: float = 0.1
    weight_tau: float = 1.0
    seed: int = 0


@dataclass
class VisionCapture:
    """What the vision tower hands the compressor (all tensors batched).

    hidden:  [B, L, C] features of the feature layer, CLS at position 0 (L = 1 + N patches).
    queries: [S, B, h, d] the CLS query of each scoring layer (after q_proj, before scaling).
    keys:    [S, B, h, L, d] the keys of each scoring layer.
    S = len(config.layers), in the order of ``config.layers``.
    """

    hidden: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor


@dataclass
class CompressionOutput:
    """Compressed visual tokens of a batch; T_b = mask[b].sum() varies per image.

    tokens:         [B, T_max, C] CLS, dominant patches (spatial order), contextual tokens;
                    slots where ``mask`` is False are padding and must never reach the LLM.
    mask:           [B, T_max] bool, True for real tokens.
    kept_indices:   [B, K_max] long, patch indices (0..N-1) of dominant tokens, -1 where unused.
    num_dominant:   [B] long, K per image.
    num_contextual: [B] long, non-empty contextual tokens per image.
    cluster_map:    [B, N] long, contextual slot of each leftover patch, -1 for dominant ones.
    scores:         [B, N] float, the fused importance score per patch.
    expected_tokens:[B] float, differentiable expected token count (for a budget penalty).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    kept_indices: torch.Tensor
    num_dominant: torch.Tensor
    num_contextual: torch.Tensor
    cluster_map: torch.Tensor
    scores: torch.Tensor
    expected_tokens: torch.Tensor

    @property
    def num_tokens(self) -> torch.Tensor:
        """[B] long, real visual tokens per image."""
        return self.mask.sum(dim=1)
