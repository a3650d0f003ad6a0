"""Typed configuration and I/O containers of the compressor.

The field names keep the seed prototype's YAML names (``alphas.attn``, ``tau_feat``, ``dynk.c``,
``merging.contextual_num`` ...), so an old ``sparsezip:`` block reads unchanged. The classes are
plain dataclasses so that LightningCLI (jsonargparse) can parse, document and validate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Method = Literal["sparsezip", "visionzip", "none"]
DynamicKRule = Literal["seed", "attention_entropy"]
VisualPositions = Literal["contiguous", "original"]
METHODS = ("sparsezip", "visionzip", "none")
DYNAMIC_K_RULES = ("seed", "attention_entropy")
VISUAL_POSITIONS = ("contiguous", "original")


@dataclass
class Alphas:
    """Initial weights of the three hybrid-score terms (trainable parameters)."""

    attn: float = 1.0
    """Weight of the z-scored CLS-to-patch attention."""
    entropy: float = 0.4
    """Weight of the z-scored entropy of each patch's key channels."""
    mutual: float = 0.6
    """Weight of the z-scored mutual-information proxy (high for patches unlike the others)."""


@dataclass
class DynKConfig:
    """Dynamic-K rule.

    ``seed``: ``K = round(log(var(s) + eps) + c)``, the prototype's rule (``c`` defaults to 8).
    ``attention_entropy``: ``K = round(scale * n_eff + c)`` with ``n_eff = exp(H(a))`` the
    effective number of patches the head-averaged CLS attention ``a`` spreads over (``c``
    defaults to 0). The offset ``c`` is a trainable parameter in both rules.
    """

    rule: DynamicKRule = "attention_entropy"
    """``seed`` (barely varies: the fused score is a sum of z-scores) or ``attention_entropy``."""
    c: float | None = None
    """Initial offset of K (trainable); None: 8 for ``seed``, 0 for ``attention_entropy``."""
    eps: float = 1.0e-6
    """``seed`` rule: added to the score variance before the log."""
    scale: float = 0.5
    """``attention_entropy`` rule: K per effective attended patch."""


@dataclass
class MergingConfig:
    """How the leftover (non-dominant) patches become contextual tokens."""

    contextual_num: int = 16
    """Contextual tokens per image at most (empty clusters emit none)."""
    kmeans_init_factor: float = 2.0
    """With ``agglomerative``: k-means starts from ceil(factor * contextual_num) centroids."""
    kmeans_iters: int = 10
    """Weighted Lloyd iterations after the seeded k-means++ initialisation."""
    agglomerative: bool = True
    """Merge the most similar centroids pairwise down to ``contextual_num``."""
    hierarchical: bool = True
    """Ablation switch: False merges the VisionZip way (uniform anchors, argmax, anchor + mean)."""


@dataclass
class SparseZipOptions:
    """SparseZip's own options (the ``sparsezip`` section of a compressor config).

    The score mixes attention, key entropy and the mutual-information proxy (``alphas``), several
    layers by learned gates, and three optional terms whose gates start at 0 (so turning one on
    changes nothing until tuning moves its gate): text relevance in key space (``cross_beta``),
    diversity (``diversity_beta``) and instruction relevance in the LLM's input space
    (``instruction_beta``).

    Ablations: ``hybrid_scoring=False`` scores by CLS attention alone, ``dynamic_k=False`` keeps a
    fixed ``dominant`` tokens (CLS included), ``merging.hierarchical=False`` merges leftovers the
    VisionZip way. With a ``budget`` on the compressor, the fixed budget is exactly that many
    visual tokens (``dominant`` = budget - contextual) and the dynamic one at most that many per
    image (``k_max`` = budget - 1 - contextual; the run records the mean it spent).
    """

    layers: list[int] = field(default_factory=lambda: [-2])
    """Vision layers scored, indexed like ``hidden_states`` / LLaVA's ``mm_vision_select_layer``
    (-2 = the second-to-last encoder layer); several are fused by learned gates."""
    dynamic_k: bool = True
    """Choose K per image by ``dynk``; False keeps a fixed ``dominant``."""
    dominant: int = 54
    """Dominant tokens with ``dynamic_k=False``, counted as VisionZip counts them: CLS included, so
    ``dominant - 1`` patches are kept. >= 1."""
    k_min: int = 8
    """Dynamic K: fewest dominant patches per image (clamped to the number of patches)."""
    k_max: int = 64
    """Dynamic K: most dominant patches per image (clamped to the number of patches)."""
    dynk: DynKConfig = field(default_factory=DynKConfig)
    """The dynamic-K rule."""
    alphas: Alphas = field(default_factory=Alphas)
    """Initial weights of the hybrid score's terms."""
    hybrid_scoring: bool = True
    """Score by attention + entropy + mutual information; False: CLS attention alone."""
    tau_feat: float = 0.2
    """Softmax temperature over key channels (entropy term)."""
    tau_sim: float = 0.1
    """Softmax temperature over patch similarities (mutual-information term)."""
    cross_beta: float = 0.0
    """Weight of the text-relevance term (question embeddings through a trainable projection); 0 = off.
    The term also has a learned gate that starts at 0: it acts only once tuned."""
    diversity_beta: float = 0.0
    """Weight of the diversity term; 0 = off (not computed). The term is high for a patch unlike
    every patch scored above it: ``1 - m_i``, with ``m_i`` a soft maximum of the cosine similarity
    of patch i's keys to the patches that outscore it (the max-min criterion of DivPrune, and what
    a DPP's conditional gain penalizes: a near-copy of a more important patch adds little). It is
    added as ``diversity_beta * diversity_gate * zscore(1 - m)``; the gate is a trainable scalar
    that starts at 0, so the term changes nothing until tuning (distillation) moves it."""
    diversity_tau: float = 0.1
    """Initial temperature (trainable, kept as its log) of the diversity term's soft maximum over
    similarities; towards 0 it is the hard maximum (the nearest more important patch)."""
    instruction_beta: float = 0.0
    """Weight of the instruction-relevance term; 0 = off (not computed). Each patch is projected
    into the LLM's input space (the model's projector) and compared with the question's token
    embeddings by cosine similarity, aggregated over the question's tokens by a soft maximum (see
    ``instruction_tau``), the relevance CDPruner computes without a text tower. Added as
    ``instruction_beta * instruction_gate * zscore(r)`` with a signed trainable gate that starts at
    0: tuning learns whether, and with which sign, relevance helps (CDPruner flips the sign by
    hand for CLIP features). Needs the question's embeddings and ``text_dim``; costs one projector
    pass over every patch."""
    instruction_tau: float = 1.0
    """Initial temperature (trainable, kept as its log) of the soft maximum over question tokens:
    large: about the mean cosine (CDPruner); towards 0: the best-matching token."""
    merging: MergingConfig = field(default_factory=MergingConfig)
    """How leftover patches become contextual tokens."""
    select_tau: float = 0.1
    """Training only: temperature of the straight-through top-K sigmoid."""
    weight_tau: float = 1.0
    """Temperature of the score softmax that weights members of a contextual token."""
    seed: int = 0
    """Seed of the k-means++ initialisation (same input and seed, same output)."""


@dataclass
class SparseZipConfig(SparseZipOptions):
    """The flat compressor config of earlier versions: a ``method`` name plus SparseZip's options
    (``dominant`` and ``merging.contextual_num`` also set VisionZip's budget) and where the kept
    tokens sit. Still accepted everywhere a compressor config is (converted by
    :meth:`sparsezip_pl.compress.CompressorConfig.coerce`); new code uses ``CompressorConfig``.
    """

    method: Method = "sparsezip"
    """``none`` (all patches: the stock model), ``visionzip`` (with ``dominant`` and
    ``merging.contextual_num``) or ``sparsezip``."""
    visual_positions: VisualPositions = "contiguous"
    """Position ids the LLM gives the kept tokens (``contiguous`` or ``original``); now a model
    setting (``visual_positions`` of the module and of ``sparsezip()``)."""


def check_budget(config: SparseZipOptions, num_patches: int) -> None:
    """Refuse a budget larger than the tower's patch grid (``num_patches`` = N).

    Without this, a kept-patch count above N would be clamped and the method would silently run
    on (nearly) every patch. Raises ValueError naming the field, its value and N.
    """
    method = getattr(config, "method", "sparsezip")
    if method == "none":
        return
    if method == "sparsezip" and config.dynamic_k:
        kept = {"k_min": config.k_min, "k_max": config.k_max}
    else:  # ``dominant`` counts CLS
        kept = {"dominant": config.dominant - 1}
    for name, patches in kept.items():
        if patches > num_patches:
            raise ValueError(
                f"compressor.{name} = {getattr(config, name)} keeps {patches} patches, more than the "
                f"{num_patches} the vision tower produces per image; choose a budget below {num_patches}"
            )
    if "dominant" in kept and config.dominant + config.merging.contextual_num > num_patches:
        raise ValueError(
            f"compressor budget of {config.dominant + config.merging.contextual_num} visual tokens (dominant = "
            f"{config.dominant} + merging.contextual_num = {config.merging.contextual_num}) is more than the "
            f"{num_patches} patches the vision tower produces per image: nothing would be compressed"
        )
