"""The SparseZip compressor module: capture of the vision tower in, compressed visual tokens out."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .baselines import compress_none, compress_visionzip
from .budget import TokenBudget, select_dominant
from .config import (
    DYNAMIC_K_RULES,
    METHODS,
    VISUAL_POSITIONS,
    CompressionOutput,
    SparseZipConfig,
    VisionCapture,
    check_budget,
)
from .merge import anchor_plan, hierarchical_plan
from .output import assemble_output
from .scoring import HybridScorer



class SparseZipCompressor(nn.Module):
    """Batched, trainable visual-token compressor (SparseZip, VisionZip or none).

    Args:
        config: the method and its hyper-parameters (validated here; bad values raise ValueError).
        num_heads, head_dim: attention geometry of the captured scoring layers.
        text_dim: width of the question embeddings (the LLM's input embeddings); required when
            ``config.cross_beta > 0``. The text projection exists only when it is given.
        check_inputs: check every forward's capture for NaN/Inf. That check costs one host sync
            (a sum per tensor, then an exact search only if a sum is not finite), so it is skipped
            inside ``torch.compile``; set False to skip it in eager mode too (shape checks always
            run: they cost nothing). :meth:`validate_capture` runs all checks on demand.
        num_patches: N, only used to report :attr:`max_tokens` of the ``none`` method before the
            first forward.

    Trainable parameters, registered whatever the method (inert where unused):
    ``scorer.alphas`` [3], ``scorer.gate_logits`` [S], ``scorer.text_proj`` (Linear
    text_dim -> head_dim) and ``scorer.text_gate`` (scalar, 0 at first: see :class:`HybridScorer`),
    both when ``text_dim`` is given, and ``budget.offset`` (the dynamic-K ``c``).

    ``config.layers[0]`` is the primary scoring layer (default -2, LLaVA's feature layer): its
    head-averaged keys drive the contextual merge and the text term, and ``visionzip`` scores with
    its CLS attention. With several layers, dynamic K uses the gate-weighted CLS attention.

    Output layout (:class:`CompressionOutput`): ``[CLS, dominant slots, contextual slots]`` with a
    static width ``T_max`` = :attr:`max_tokens` that does not depend on N (for ``none``: N patch
    tokens, no CLS). Slots that an image does not fill are zeros and masked out. Budgets larger
    than the image are clamped: ``K = clamp(K, min(k_min, N), min(k_max, N))``, a fixed budget
    ``min(dominant - 1, N)`` patches; the remaining slots stay masked.
    """

    def __init__(
        self,
        config: SparseZipConfig,
        num_heads: int,
        head_dim: int,
        text_dim: int | None = None,
        *,
        check_inputs: bool = True,
        num_patches: int | None = None,
    ):
        super().__init__()
        _validate_config(config, num_heads, head_dim, text_dim)
        if num_patches is not None:
            check_budget(config, num_patches)
        self.config = config
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.text_dim = text_dim
        self.check_inputs = check_inputs
        self.num_patches = num_patches
        self.scorer = HybridScorer(config, head_dim, text_dim)
        self.budget = TokenBudget(config)

    @property
    def max_tokens(self) -> int:
        """T_max, the width of ``tokens``/``mask``.

        sparsezip: ``1 + k_max + contextual_num`` (dynamic K) or ``dominant + contextual_num``
        (``dominant`` counts CLS); visionzip: ``dominant + contextual_num``; none: N, known from
        ``num_patches`` or the last forward (RuntimeError before either).
        """
        if self.config.method == "none" and self.num_patches is None:
            raise RuntimeError("max_tokens of method 'none' is N: pass num_patches= or run a forward first")
        return self.output_length(self.num_patches or 0)

    def output_length(self, num_patches: int) -> int:
        """T_max for images of ``num_patches`` patches."""
        cfg = self.config
        if cfg.method == "none":
            return num_patches
        # ``dominant`` counts CLS (VisionZip's convention): dominant - 1 patches.
        patches = cfg.k_max if cfg.method == "sparsezip" and cfg.dynamic_k else cfg.dominant - 1
        return 1 + patches + cfg.merging.contextual_num

    def extra_repr(self) -> str:
        cfg = self.config
        return f"method={cfg.method}, layers={cfg.layers}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def validate_capture(
        self,
        capture: VisionCapture,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> None:
        """Raise ValueError on wrong shapes/dtypes and on NaN/Inf (the latter syncs with the device)."""
        self._check_shapes(capture, text_embeds, text_mask)
        self._check_finite(capture, text_embeds)

    def forward(
        self,
        capture: VisionCapture,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> CompressionOutput:
        """Compress a batch.

        capture: hidden [B, L, C] (CLS at 0), queries [S, B, h, d], keys [S, B, h, L, d].
        text_embeds [B, T, text_dim]: the LLM's input embeddings of the question tokens, with
        text_mask [B, T] bool (None: all valid); used only when ``cross_beta > 0``.
        """
        self._check_shapes(capture, text_embeds, text_mask)
        if self.check_inputs and not torch.compiler.is_compiling():
            self._check_finite(capture, text_embeds)
        cfg = self.config
        hidden = capture.hidden
        if cfg.method == "none":
            if not torch.compiler.is_compiling():
                self.num_patches = hidden.shape[1] - 1
            return compress_none(hidden)
        if cfg.method == "visionzip":
            return compress_visionzip(
                hidden, capture.queries[0], capture.keys[0], cfg.dominant, cfg.merging.contextual_num
            )
        return self._sparsezip(hidden, capture.queries, capture.keys, text_embeds, text_mask)

    def _sparsezip(
        self,
        hidden: torch.Tensor,
        queries: torch.Tensor,
        keys: torch.Tensor,
        text_embeds: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> CompressionOutput:
        cfg, merging = self.config, self.config.merging
        n = hidden.shape[1] - 1
        scores, attention, unit_keys = self.scorer(queries, keys, text_embeds, text_mask)

        if cfg.dynamic_k:
            k_low, k_high, slots = min(cfg.k_min, n), min(cfg.k_max, n), cfg.k_max
            k_continuous = self.budget(scores, attention)
        else:
            # ``dominant`` counts CLS (VisionZip's convention): dominant - 1 patches.
            k_low = k_high = min(cfg.dominant - 1, n)
            slots, k_continuous = cfg.dominant - 1, None
        selection = select_dominant(scores, k_continuous, k_low, k_high, slots, cfg.select_tau)

        leftover = ~selection.keep
        if merging.hierarchical:
            contextual = hierarchical_plan(
                unit_keys,
                leftover,
                scores,
                num_slots=merging.contextual_num,
                init_factor=merging.kmeans_init_factor,
                iters=merging.kmeans_iters,
                agglomerative=merging.agglomerative,
                weight_tau=cfg.weight_tau,
                seed=cfg.seed,
            )
        else:
            contextual = anchor_plan(unit_keys, leftover, merging.contextual_num)

        soft = selection.soft
        # Straight-through: the factor is exactly 1 in the forward pass, d/ds in the backward.
        scale = 1.0 + (soft - soft.detach()) if self.training and torch.is_grad_enabled() else None
        expected = 1.0 + soft.sum(dim=1) + contextual.count.to(soft.dtype)
        return assemble_output(hidden, selection.indices, selection.count, contextual, scores, expected, scale)

    # ----------------------------------------------------------------------------------- checks

    def _check_shapes(
        self, capture: VisionCapture, text_embeds: torch.Tensor | None, text_mask: torch.Tensor | None
    ) -> None:
        cfg = self.config
        hidden = getattr(capture, "hidden", None)
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"capture.hidden must be a tensor [B, L, C], got {type(hidden).__name__}")
        if hidden.dim() != 3:
            raise ValueError(f"capture.hidden must be [B, L, C], got shape {tuple(hidden.shape)}")
        if not hidden.is_floating_point():
            raise ValueError(f"capture.hidden must be floating point, got {hidden.dtype}")
        batch, length, _ = hidden.shape
        if batch == 0:
            raise ValueError("empty batch: capture.hidden has B = 0")
        if length < 2:
            raise ValueError(f"capture.hidden needs CLS plus at least one patch (L >= 2), got L = {length}")
        if cfg.method == "none":
            return

        s, h, d = len(cfg.layers), self.num_heads, self.head_dim
        expected = {"queries": (s, batch, h, d), "keys": (s, batch, h, length, d)}
        names = {"queries": "[S, B, h, d]", "keys": "[S, B, h, L, d]"}
        for name, shape in expected.items():
            tensor = getattr(capture, name, None)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"capture.{name} must be a tensor {names[name]}, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"capture.{name} must be {names[name]} = {shape} (S = len(config.layers), "
                    f"B and L from capture.hidden, h = num_heads, d = head_dim), got {tuple(tensor.shape)}"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"capture.{name} must be floating point, got {tensor.dtype}")

        if cfg.method != "sparsezip" or cfg.cross_beta <= 0:
            return
        if text_embeds is None:
            raise ValueError("config.cross_beta > 0 needs text_embeds [B, T, text_dim] (the question's embeddings)")
        if text_embeds.dim() != 3 or text_embeds.shape[0] != batch or text_embeds.shape[2] != self.text_dim:
            raise ValueError(
                f"text_embeds must be [B, T, text_dim] = [{batch}, T, {self.text_dim}], got {tuple(text_embeds.shape)}"
            )
        if not text_embeds.is_floating_point():
            raise ValueError(f"text_embeds must be floating point, got {text_embeds.dtype}")
        if text_mask is not None:
            if tuple(text_mask.shape) != tuple(text_embeds.shape[:2]):
                raise ValueError(
                    f"text_mask must be [B, T] = {tuple(text_embeds.shape[:2])}, got {tuple(text_mask.shape)}"
                )
            if text_mask.dtype != torch.bool:
                raise ValueError(f"text_mask must be bool, got {text_mask.dtype}")

    def _check_finite(self, capture: VisionCapture, text_embeds: torch.Tensor | None) -> None:
        tensors = {"capture.hidden": capture.hidden}
        if self.config.method != "none":
            tensors.update({"capture.queries": capture.queries, "capture.keys": capture.keys})
        if text_embeds is not None and self.config.method == "sparsezip" and self.config.cross_beta > 0:
            tensors["text_embeds"] = text_embeds
        # Fast path, one host sync: a sum is finite only if every element is. A non-finite sum
        # (NaN/Inf, or an overflow of huge finite values) falls back to the exact per-tensor check.
        sums = torch.stack([tensor.sum(dtype=torch.float32) for tensor in tensors.values()])
        if bool(torch.isfinite(sums).all()):
            return
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} contains NaN or Inf")


def _validate_config(config: SparseZipConfig, num_heads: int, head_dim: int, text_dim: int | None) -> None:
    """Raise ValueError naming the first bad field."""

    def fail(message: str) -> None:
        raise ValueError(f"SparseZipConfig: {message}")

    if config.method not in METHODS:
        fail(f"method must be one of {METHODS}, got {config.method!r}")
    if config.visual_positions not in VISUAL_POSITIONS:
        fail(f"visual_positions must be one of {VISUAL_POSITIONS}, got {config.visual_positions!r}")
    if not isinstance(num_heads, int) or num_heads <= 0:
        fail(f"num_heads must be a positive int, got {num_heads!r}")
    if not isinstance(head_dim, int) or head_dim <= 0:
        fail(f"head_dim must be a positive int, got {head_dim!r}")
    if text_dim is not None and (not isinstance(text_dim, int) or text_dim <= 0):
        fail(f"text_dim must be a positive int or None, got {text_dim!r}")
    layers = list(config.layers) if config.layers is not None else []
    if len(layers) == 0:
        fail("layers must name at least one vision layer, got an empty list")
    if not all(isinstance(layer, int) for layer in layers):
        fail(f"layers must be ints, got {config.layers!r}")
    if not isinstance(config.dominant, int) or config.dominant < 1:
        fail(
            "dominant must be an int >= 1 (dominant tokens, CLS included, as VisionZip counts them), "
            f"got {config.dominant!r}"
        )
    for name in ("k_min", "k_max", "seed"):
        value = getattr(config, name)
        if not isinstance(value, int) or (value < 0 and name != "seed"):
            fail(f"{name} must be a non-negative int, got {value!r}")
    if config.k_min > config.k_max:
        fail(f"k_min ({config.k_min}) must not exceed k_max ({config.k_max})")
    if config.dynk.rule not in DYNAMIC_K_RULES:
        fail(f"dynk.rule must be one of {DYNAMIC_K_RULES}, got {config.dynk.rule!r}")
    if not config.dynk.eps > 0:
        fail(f"dynk.eps must be > 0, got {config.dynk.eps!r}")
    if not config.dynk.scale >= 0:
        fail(f"dynk.scale must be >= 0, got {config.dynk.scale!r}")
    if config.dynk.c is not None and not math.isfinite(config.dynk.c):
        fail(f"dynk.c must be finite, got {config.dynk.c!r}")
    for name in ("tau_feat", "tau_sim", "select_tau", "weight_tau"):
        value = getattr(config, name)
        if not value > 0:
            fail(f"{name} must be > 0, got {value!r}")
    if not config.cross_beta >= 0:
        fail(f"cross_beta must be >= 0, got {config.cross_beta!r}")
    if config.cross_beta > 0 and config.method == "sparsezip" and text_dim is None:
        fail("cross_beta > 0 needs the compressor's text_dim (width of the question embeddings)")
    alphas = config.alphas
    if not all(math.isfinite(a) for a in (alphas.attn, alphas.entropy, alphas.mutual)):
        fail(f"alphas must be finite, got {alphas!r}")
    merging = config.merging
    for name in ("contextual_num", "kmeans_iters"):
        value = getattr(merging, name)
        if not isinstance(value, int) or value < 0:
            fail(f"merging.{name} must be a non-negative int, got {value!r}")
    if not merging.kmeans_init_factor >= 1.0:
        fail(f"merging.kmeans_init_factor must be >= 1, got {merging.kmeans_init_factor!r}")
