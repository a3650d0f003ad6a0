"""What every method receives and returns (docs/design.md, section 2).

Two hook points exist, and a method works at one of them:

* **vision side** (:class:`VisionCapture` in, :class:`CompressionOutput` out): after the vision
  tower's feature layer and before the projector. A method sees the feature layer's tokens, the
  scoring layers' CLS queries and keys (or the family's substitute attention where the tower has
  no CLS token), optionally the question's embeddings and the projector, and returns the tokens
  the LLM receives instead of the stock ones (at most ``output_length`` per row, with a mask).
* **LLM side** (:mod:`sparsezip_pl.compress.llm`): inside the decoder, before a chosen layer, at
  prefill. A method sees the hidden states, where the visual tokens are, and can ask for the
  attention rows it ranks by; it returns which visual tokens the later layers keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class VisionCapture:
    """What the vision tower hands a vision-side method, for B rows (an image, or one view of it).

    hidden:  [B, L, C] the feature layer's tokens. With ``has_cls`` the CLS token is at 0 and the
             N = L - 1 patches follow; without it all L tokens are patches (N = L). Patches are in
             row-major order over ``grid``.
    queries: [S, B, h, d] the CLS query of each scoring layer (after q_proj, before scaling), or
             None when the tower has no CLS token or no method asked for it.
    keys:    [S, B, h, L, d] the keys of each scoring layer, or None when not captured.
    attention: [S, B, h, N] optional attention to each patch per scoring layer and head, for towers
             without a CLS token: the family's documented substitute for the CLS row (the mean
             attention each patch receives). With a CLS token it is computed from queries and keys.
    has_cls: whether ``hidden`` starts with a CLS token.
    grid:    (rows, cols) of the patch grid; None: square (or a single row).
    text_embeds: [B, T, D] the question's LLM input embeddings (text-aware methods), or None.
    text_mask: [B, T] bool, the valid question tokens.
    project: the projector (features [..., C] -> LLM input space [..., D]), for methods that score
             tokens in the space the LLM reads (DivPrune, CDPruner); None when not needed.
    sample_index: [B] long, the sample each row belongs to, when a family sends several rows per
             sample (the views of a tiled image, compressed one by one); None: row b is sample b.
    layout:  what the family needs to turn the rows' compressed tokens back into each sample's
             visual sequence (views, crop grids, newline tokens); opaque to methods.
    S is the number of scoring layers, in the order the method's config lists them.
    """

    hidden: torch.Tensor
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    has_cls: bool = True
    grid: tuple[int, int] | None = None
    text_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    sample_index: torch.Tensor | None = None
    layout: Any = None

    @property
    def num_patches(self) -> int:
        """N, the patches per row."""
        return self.hidden.shape[1] - int(self.has_cls)

    def patches(self) -> torch.Tensor:
        """[B, N, C] the patch tokens (CLS dropped)."""
        return self.hidden[:, 1:] if self.has_cls else self.hidden

    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid (a square, else one row, when ``grid`` is not given)."""
        if self.grid is not None:
            return self.grid
        n = self.num_patches
        side = int(round(n**0.5))
        return (side, side) if side * side == n else (1, n)


@dataclass
class CompressionOutput:
    """Compressed visual tokens of a batch; T_b = mask[b].sum() varies per row.

    tokens:         [B, T_max, C] the tokens in the LLM's order (for SparseZip and VisionZip: CLS,
                    dominant patches in spatial order, contextual tokens); slots where ``mask`` is
                    False are padding and never reach the LLM.
    mask:           [B, T_max] bool, True for real tokens.
    kept_indices:   [B, K_max] long, patch indices (0..N-1) of kept patches, -1 where unused.
    num_dominant:   [B] long, kept patches per row.
    num_contextual: [B] long, merged (contextual) tokens per row.
    cluster_map:    [B, N] long, contextual slot of each merged patch, -1 for the others.
    scores:         [B, N] float, the method's importance score per patch (zeros if it has none).
    expected_tokens:[B] float, differentiable expected token count (for a budget penalty).
    positions:      [B, T_max] long, the patch (0..N-1) each token stands at in the grid: a kept
                    patch its own, CLS patch 0, a merged token the patch nearest the weighted
                    centroid of its members; 0 on padding. Used when the LLM is given the tokens'
                    original positions (``visual_positions="original"``).
    llm_visual_tokens: [B] float, set after an LLM-side method ran: the visual tokens per row the
                    decoder layers saw, averaged over all layers (the papers' "average tokens" of
                    in-LLM methods); None for vision-side methods, whose LLM sees ``num_tokens`` in
                    every layer. The output of an LLM-side method is otherwise the stock one.
    llm_visual_tokens_final: [B] long, with ``llm_visual_tokens``: those the last layer saw.
    input_tokens:   [B] long, set by the model side per sample: the visual tokens the LLM input
                    holds (after a tiled family's reassembly, newline tokens included).
    stock_tokens:   [B] long, set by the model side per sample: the visual tokens the stock model
                    gives the same image (0 for a sample without one).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    kept_indices: torch.Tensor
    num_dominant: torch.Tensor
    num_contextual: torch.Tensor
    cluster_map: torch.Tensor
    scores: torch.Tensor
    expected_tokens: torch.Tensor
    positions: torch.Tensor
    llm_visual_tokens: torch.Tensor | None = None
    llm_visual_tokens_final: torch.Tensor | None = None
    input_tokens: torch.Tensor | None = None
    stock_tokens: torch.Tensor | None = None

    @property
    def num_tokens(self) -> torch.Tensor:
        """[B] long, real visual tokens per row."""
        return self.mask.sum(dim=1)

    @property
    def visual_tokens(self) -> torch.Tensor:
        """[B] the visual tokens per sample the LLM worked on, the figure to report as the budget:
        ``llm_visual_tokens`` (float) when an LLM-side method set it, else ``input_tokens`` when
        the model side set it, else ``num_tokens`` (long)."""
        if self.llm_visual_tokens is not None:
            return self.llm_visual_tokens
        return self.num_tokens if self.input_tokens is None else self.input_tokens

    @property
    def num_patches(self) -> int:
        """N, the patches each row had before compression."""
        return self.cluster_map.shape[1]


@dataclass(frozen=True)
class Geometry:
    """What a method needs to know about the model before its first batch.

    num_heads, head_dim: attention shape of the vision tower's scoring layers.
    width: C, the feature width the method receives (the tower's, or the merger's for Qwen2.5-VL).
    num_patches: N per row, or None when rows vary (images of different sizes).
    has_cls: whether the tower has a CLS token.
    text_dim: width of the question embeddings (the LLM's input embeddings), or None.
    """

    num_heads: int
    head_dim: int
    width: int | None = None
    num_patches: int | None = None
    has_cls: bool = True
    text_dim: int | None = None
