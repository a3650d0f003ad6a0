"""SparseZip (the method this project is named after): hybrid scores, dynamic K, hierarchical
merge, trainable. Registered as ``sparsezip``; also the compressor class of earlier versions,
which still accepts the flat :class:`SparseZipConfig` with ``method`` ``none`` or ``visionzip``."""

from __future__ import annotations

import dataclasses
import math

import torch

from .baselines import cls_patch_attention, compress_none, compress_visionzip
from .budget import TokenBudget, select_dominant
from .config import (
    DYNAMIC_K_RULES,
    METHODS,
    SparseZipOptions,
    check_budget,
)
from .merge import anchor_plan, hierarchical_plan
from .method import VisionMethod, resolve_budget
from .output import assemble_output
from .registry import register_method
from .scoring import HybridScorer
from .types import CompressionOutput, Geometry, VisionCapture


@register_method("sparsezip", config=SparseZipOptions)
class SparseZipCompressor(VisionMethod):
    """SparseZip: trainable hybrid importance, K per image, the rest merged into contextual tokens.

    Importance: attention, entropy and a mutual-information proxy, several layers fused by
    learned gates, optionally text-aware; contextual tokens by k-means++ / agglomerative
    clustering.

    Args:
        config: SparseZip's options (validated here; bad values raise ValueError). The flat
            :class:`SparseZipConfig` of earlier versions is accepted too, and with its ``method``
            ``none`` or ``visionzip`` this class runs those (the registry has them as methods of
            their own).
        geometry: the model's :class:`~sparsezip_pl.compress.types.Geometry`; or, as in earlier
            versions, ``num_heads`` followed by ``head_dim``.
        head_dim, text_dim: the earlier constructor's arguments (with ``num_heads`` in place of
            ``geometry``). ``text_dim`` is the width of the question embeddings, required when
            ``cross_beta > 0``; the text projection exists only when it is known.
        budget: visual tokens per image (int) or a fraction of the patches (float in (0, 1)): the
            fixed budget gives exactly that many tokens, the dynamic one at most that many.
        check_inputs: check every forward's capture for NaN/Inf. That check costs one host sync
            (a sum per tensor, then an exact search only if a sum is not finite), so it is skipped
            inside ``torch.compile``; set False to skip it in eager mode too (shape checks always
            run: they cost nothing). :meth:`validate_capture` runs all checks on demand.
        num_patches: N (earlier constructor), for :attr:`max_tokens` of ``none`` and the budget check.

    Trainable parameters, registered whatever the settings (inert where unused):
    ``scorer.alphas`` [3], ``scorer.gate_logits`` [S], ``scorer.text_proj`` (Linear
    text_dim -> head_dim) and ``scorer.text_gate`` (scalar, 0 at first: see :class:`HybridScorer`),
    both when ``text_dim`` is given, and ``budget.offset`` (the dynamic-K ``c``); with
    ``diversity_beta > 0`` ``scorer.diversity_gate`` and ``scorer.diversity_log_tau``, with
    ``instruction_beta > 0`` ``scorer.instruction_gate`` and ``scorer.instruction_log_tau`` (every
    gate starts at 0: a term changes nothing until tuned).

    ``config.layers[0]`` is the primary scoring layer (default -2, LLaVA's feature layer): its
    head-averaged keys drive the contextual merge and the text term. With several layers, dynamic
    K uses the gate-weighted CLS attention. On a tower without a CLS token the family's
    substitute attention (``capture.attention``) stands in for the CLS row and no CLS slot is
    emitted.

    Output layout (:class:`CompressionOutput`): ``[CLS, dominant slots, contextual slots]`` with a
    static width ``T_max`` = :attr:`max_tokens` that does not depend on N (for ``none``: N patch
    tokens, no CLS). Slots that an image does not fill are zeros and masked out. Budgets larger
    than the image are clamped: ``K = clamp(K, min(k_min, N), min(k_max, N))``, a fixed budget
    ``min(dominant - 1, N)`` patches; the remaining slots stay masked.
    """

    needs_attention = True
    needs_keys = True

    def __init__(
        self,
        config: SparseZipOptions,
        geometry: Geometry | int | None = None,
        head_dim: int | None = None,
        text_dim: int | None = None,
        *,
        num_heads: int | None = None,
        budget: int | float | None = None,
        check_inputs: bool = True,
        num_patches: int | None = None,
    ):
        if not isinstance(geometry, Geometry):
            num_heads = geometry if geometry is not None else num_heads
            geometry = Geometry(num_heads=num_heads, head_dim=head_dim, num_patches=num_patches, text_dim=text_dim)
        if budget is not None:
            if geometry.num_patches is None and not float(budget).is_integer():
                raise ValueError("sparsezip: a fractional budget needs a fixed patch count; give a token count")
            config = _with_budget(config, resolve_budget(budget, geometry.num_patches or 0), geometry.has_cls)
        _validate_config(config, geometry.num_heads, geometry.head_dim, geometry.text_dim)
        super().__init__(config, geometry, None)
        self.requested_budget = budget
        self.num_heads = geometry.num_heads
        self.head_dim = geometry.head_dim
        self.text_dim = geometry.text_dim
        self.check_inputs = check_inputs
        self.num_patches = geometry.num_patches
        self.scorer = HybridScorer(config, geometry.head_dim, geometry.text_dim)
        self.budget = TokenBudget(config)

    @property
    def method(self) -> str:
        """``sparsezip``, or the legacy config's ``method``."""
        return getattr(self.config, "method", "sparsezip")

    @property
    def needs_text(self) -> bool:
        cfg = self.config
        return self.method == "sparsezip" and (cfg.cross_beta > 0 or cfg.instruction_beta > 0)

    @property
    def needs_projected(self) -> bool:
        return self.method == "sparsezip" and self.config.instruction_beta > 0

    @property
    def scoring_layers(self) -> list[int]:
        return [] if self.method == "none" else list(self.config.layers)

    def check_budget(self, num_patches: int) -> None:
        check_budget(self.config, num_patches)

    @property
    def max_tokens(self) -> int:
        """T_max, the width of ``tokens``/``mask``.

        sparsezip: ``1 + k_max + contextual_num`` (dynamic K) or ``dominant + contextual_num``
        (``dominant`` counts CLS); visionzip: ``dominant + contextual_num``; none: N, known from
        ``num_patches`` or the last forward (RuntimeError before either).
        """
        if self.method == "none" and self.num_patches is None:
            raise RuntimeError("max_tokens of method 'none' is N: pass num_patches= or run a forward first")
        return self.output_length(self.num_patches or 0)

    def output_length(self, num_patches: int) -> int:
        """T_max for images of ``num_patches`` patches (on a tower without CLS, one less)."""
        cfg = self.config
        if self.method == "none":
            return num_patches
        # ``dominant`` counts CLS (VisionZip's convention): dominant - 1 patches.
        patches = cfg.k_max if self.method == "sparsezip" and cfg.dynamic_k else cfg.dominant - 1
        return int(self.geometry.has_cls) + patches + cfg.merging.contextual_num

    def extra_repr(self) -> str:
        cfg = self.config
        return f"method={self.method}, layers={cfg.layers}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def validate_capture(
        self,
        capture: VisionCapture,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> None:
        """Raise ValueError on wrong shapes/dtypes and on NaN/Inf (the latter syncs with the device)."""
        text_embeds, text_mask = self._text(capture, text_embeds, text_mask)
        self._check_shapes(capture, text_embeds, text_mask)
        self._check_finite(capture, text_embeds)

    @staticmethod
    def _text(capture, text_embeds, text_mask):
        if text_embeds is None:
            return capture.text_embeds, capture.text_mask
        return text_embeds, text_mask

    def forward(
        self,
        capture: VisionCapture,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> CompressionOutput:
        """Compress a batch.

        capture: hidden [B, L, C] (CLS at 0 when ``capture.has_cls``), queries [S, B, h, d],
        keys [S, B, h, L, d] (or ``capture.attention`` [S, B, h, N] on a tower without CLS).
        text_embeds [B, T, text_dim]: the LLM's input embeddings of the question tokens, with
        text_mask [B, T] bool (None: all valid); default: the capture's; used only when
        ``cross_beta > 0``.
        """
        text_embeds, text_mask = self._text(capture, text_embeds, text_mask)
        self._check_shapes(capture, text_embeds, text_mask)
        if self.check_inputs and not torch.compiler.is_compiling():
            self._check_finite(capture, text_embeds)
        cfg = self.config
        hidden = capture.hidden
        if self.method == "none":
            if not torch.compiler.is_compiling():
                self.num_patches = capture.num_patches
            return compress_none(capture.patches())
        attention, keys = patch_attention_and_keys(capture)
        if self.method == "visionzip":
            return compress_visionzip(
                hidden, attention[0], keys[0], cfg.dominant - 1, cfg.merging.contextual_num,
                capture.has_cls, capture.grid,
            )
        return self._sparsezip(hidden, attention, keys, text_embeds, text_mask, capture.has_cls, capture)

    def _sparsezip(
        self,
        hidden: torch.Tensor,
        attention: torch.Tensor,
        keys: torch.Tensor,
        text_embeds: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        has_cls: bool = True,
        capture: VisionCapture | None = None,
    ) -> CompressionOutput:
        cfg, merging = self.config, self.config.merging
        n = attention.shape[-1]
        grid = capture.grid if capture is not None else None
        patches, project = (capture.patches(), capture.project) if self.needs_projected else (None, None)
        scores, attention, unit_keys = self.scorer(attention, keys, text_embeds, text_mask, patches, project)

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
        expected = float(has_cls) + soft.sum(dim=1) + contextual.count.to(soft.dtype)
        return assemble_output(
            hidden, selection.indices, selection.count, contextual, scores, expected, scale, has_cls=has_cls, grid=grid
        )

    # ----------------------------------------------------------------------------------- checks

    def _check_shapes(
        self, capture: VisionCapture, text_embeds: torch.Tensor | None, text_mask: torch.Tensor | None
    ) -> None:
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
        if capture.num_patches < 1:
            raise ValueError(f"capture.hidden needs at least one patch (with a CLS token: L >= 2), got L = {length}")
        if self.method == "none":
            return

        s, h, d = len(self.config.layers), self.num_heads, self.head_dim
        n = capture.num_patches
        expected = {"keys": ((s, batch, h, length, d), "[S, B, h, L, d]")}
        if capture.attention is not None:
            expected["attention"] = ((s, batch, h, n), "[S, B, h, N]")
        elif capture.has_cls:
            expected["queries"] = ((s, batch, h, d), "[S, B, h, d]")
        else:
            raise ValueError("a tower without a CLS token needs capture.attention [S, B, h, N] (the family's "
                             "substitute for the CLS row)")
        for name, (shape, names) in expected.items():
            tensor = getattr(capture, name, None)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"capture.{name} must be a tensor {names}, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"capture.{name} must be {names} = {shape} (S = len(config.layers), "
                    f"B and L from capture.hidden, h = num_heads, d = head_dim), got {tuple(tensor.shape)}"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"capture.{name} must be floating point, got {tensor.dtype}")

        if not self.needs_text:
            return
        terms = " and ".join(name for name in ("cross_beta", "instruction_beta") if getattr(self.config, name) > 0)
        if text_embeds is None:
            raise ValueError(f"config.{terms} > 0 needs text_embeds [B, T, text_dim] (the question's embeddings)")
        if self.needs_projected and capture.project is None:
            raise ValueError("config.instruction_beta > 0 needs capture.project (the model's projector: the "
                             "instruction term compares projected patches with the question's embeddings)")
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
        if self.method != "none":
            for name in ("queries", "keys", "attention"):
                if getattr(capture, name) is not None:
                    tensors[f"capture.{name}"] = getattr(capture, name)
        if text_embeds is not None and self.needs_text:
            tensors["text_embeds"] = text_embeds
        # Fast path, one host sync: a sum is finite only if every element is. A non-finite sum
        # (NaN/Inf, or an overflow of huge finite values) falls back to the exact per-tensor check.
        sums = torch.stack([tensor.sum(dtype=torch.float32) for tensor in tensors.values()])
        if bool(torch.isfinite(sums).all()):
            return
        for name, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} contains NaN or Inf")


def patch_attention_and_keys(capture: VisionCapture) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention rows [S, B, h, N] to the patches (the CLS row computed from the captured
    query and keys, or the family's substitute) and the patch keys [S, B, h, N, d]."""
    keys = capture.keys
    if capture.attention is not None:
        attention = capture.attention
    else:
        attention = cls_patch_attention(capture.queries, keys)
    return attention, keys[..., 1:, :] if capture.has_cls else keys


def _with_budget(config: SparseZipOptions, tokens: int, has_cls: bool = True) -> SparseZipOptions:
    """SparseZip's options for a budget of ``tokens`` visual tokens per image: a fixed K gives
    exactly that many (``dominant`` = tokens - contextual, the CLS token included when the tower
    has one), a dynamic K at most that many (``k_max`` = tokens - CLS - contextual, ``k_min`` not
    above it)."""
    contextual = config.merging.contextual_num
    patches = tokens - int(has_cls) - contextual
    if patches < 0:
        raise ValueError(f"budget of {tokens} tokens leaves no room for CLS and merging.contextual_num = {contextual}")
    if config.dynamic_k:
        return dataclasses.replace(config, k_max=patches, k_min=min(config.k_min, patches))
    return dataclasses.replace(config, dominant=patches + 1)


def _validate_config(config: SparseZipOptions, num_heads: int, head_dim: int, text_dim: int | None) -> None:
    """Raise ValueError naming the first bad field."""

    def fail(message: str) -> None:
        raise ValueError(f"SparseZipConfig: {message}")

    method = getattr(config, "method", "sparsezip")
    if method not in METHODS:
        fail(f"method must be one of {METHODS}, got {method!r}")
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
    if config.cross_beta > 0 and method == "sparsezip" and text_dim is None:
        fail("cross_beta > 0 needs the compressor's text_dim (width of the question embeddings)")
    for name in ("diversity_beta", "instruction_beta"):
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            fail(f"{name} must be a finite number >= 0, got {value!r}")
    for name in ("diversity_tau", "instruction_tau"):
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            fail(f"{name} must be a finite number > 0, got {value!r}")
    if config.instruction_beta > 0 and method == "sparsezip" and text_dim is None:
        fail("instruction_beta > 0 needs the compressor's text_dim (width of the question embeddings)")
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
