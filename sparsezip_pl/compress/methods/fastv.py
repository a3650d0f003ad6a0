"""``fastv``: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024, arXiv:2403.06764; code:
github.com/pkunlp-icler/FastV).

Inside the LLM, once, at prefill: decoder layers 0..K-1 see every image token; before layer K the
image tokens are ranked by the attention of layer K-1 and only the top T' go on, in their order
and with their original position ids (as the official in-place and KV-cache versions do; the
text after the image keeps its positions too). Decoding steps attend to the kept tokens (the
official KV-cache version's "static" pruning; its original in-place version runs without the
cache and re-ranks at every step). Published defaults: K = 2, R = 50% of the image tokens
dropped (the title's setting); the official scripts sweep 72/144/288/432 of 576 kept at K = 2.

Ranking (``criterion``), where paper and code differ:

* ``last_token`` (default, every official implementation): the attention the last token of the
  sequence (the prompt's last token at prefill) pays each image token at layer K-1, mean over
  heads.
* ``mean_received`` (the paper's phi_attn): the attention each image token receives at layer K-1,
  mean over heads and over all real query tokens (itself and the causal ones that cannot see it,
  which give 0, included: a constant divisor, so the ranking is that of the total received).

The attention rows are recomputed from layer K-1's own input, norm, q/k projections and rotary
embedding (:meth:`~sparsezip_pl.models.llm_hook.PruneState.attention`); the model keeps SDPA and no
full attention map is kept (``mean_received`` goes through the queries in blocks).

Budget (``budget_mode``):

* ``average`` (default): ``budget`` is the number of visual tokens the LLM works on averaged over
  all its L decoder layers, the convention of the papers' 64/128/192 tables for in-LLM methods
  (and of :class:`~sparsezip_pl.compress.LLMMethod`): T_avg = (K*N + (L-K)*T')/L, so
  T' = round((L*T_avg - K*N) / (L-K)) tokens go on after layer K. On LLaVA-1.5-7B (L = 32,
  N = 576, K = 2): T_avg = 64 / 128 / 192 -> T' = 30 / 98 / 166. A budget below (K*N + L-K)/L
  (one token kept) is an error.
* ``kept``: ``budget`` is T' itself.

A fractional budget is a fraction of N. Without a budget T' = round(N * (1 - prune_ratio)). The
run records the average the decoder actually saw
(:attr:`~sparsezip_pl.compress.types.CompressionOutput.llm_visual_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..method import BudgetOutOfReach, LLMMethod, resolve_budget
from ..registry import register_method
from ..types import Geometry

CRITERIA = ("last_token", "mean_received")
BUDGET_MODES = ("average", "kept")
#: query rows per block when ``mean_received`` goes through all of them
QUERY_BLOCK = 128


@dataclass
class FastVConfig:
    """FastV's options."""

    layer: int = 2
    """K: layers 0..K-1 see every image token, layer K-1's attention ranks them, layers K.. see the kept ones."""
    prune_ratio: float = 0.5
    """R: the fraction of the image tokens dropped after layer K when no ``budget`` is given."""
    criterion: Literal["last_token", "mean_received"] = "last_token"
    """``last_token``: the last token's attention, mean over heads (official code); ``mean_received``:
    the attention each image token receives from all tokens (the paper)."""
    budget_mode: Literal["average", "kept"] = "average"
    """How ``budget`` reads: the visual tokens averaged over all decoder layers (``average``, the papers'
    tables), or those kept after layer K (``kept``)."""


def kept_after(config: FastVConfig, budget: int | float | None, num_visual: int, num_layers: int) -> int:
    """T', the image tokens that layers >= K see, for ``num_visual`` image tokens and a decoder of
    ``num_layers`` layers (see the module docstring)."""
    layer = config.layer
    if budget is None:
        return max(1, math.floor(num_visual * (1 - config.prune_ratio) + 0.5))
    tokens = resolve_budget(budget, num_visual)
    if tokens > num_visual:
        raise ValueError(f"fastv: budget = {budget!r} asks for {tokens} visual tokens, more than the "
                         f"{num_visual} of the image")
    if config.budget_mode == "kept":
        return tokens
    kept = math.floor((num_layers * tokens - layer * num_visual) / (num_layers - layer) + 0.5)
    if kept < 1:
        least = (layer * num_visual + num_layers - layer) / num_layers
        raise BudgetOutOfReach(
            f"fastv: an average of {tokens} visual tokens over the {num_layers} decoder layers is out of reach: "
            f"layers 0..{layer - 1} see all {num_visual}, so the least average (one token kept) is {least:.2f}; "
            "give a larger budget, a smaller fastv.layer, or fastv.budget_mode: kept")
    return min(kept, num_visual)


@register_method("fastv", config=FastVConfig, side="llm")
class FastV(LLMMethod):
    """FastV: after layer K, only the image tokens of highest layer K-1 attention go on (in the LLM)."""

    def __init__(self, config: FastVConfig, geometry: Geometry, budget: int | float | None = None) -> None:
        if not isinstance(config.layer, int) or config.layer < 1:
            raise ValueError(f"fastv.layer must be an int >= 1 (layer K-1's attention ranks), got {config.layer!r}")
        if not 0 <= config.prune_ratio < 1:
            raise ValueError(f"fastv.prune_ratio must lie in [0, 1), got {config.prune_ratio!r}")
        if config.criterion not in CRITERIA:
            raise ValueError(f"fastv.criterion must be one of {CRITERIA}, got {config.criterion!r}")
        if config.budget_mode not in BUDGET_MODES:
            raise ValueError(f"fastv.budget_mode must be one of {BUDGET_MODES}, got {config.budget_mode!r}")
        super().__init__(config, geometry, budget)

    def prune_layers(self, num_layers: int) -> list[int]:
        if self.config.layer >= num_layers:
            raise ValueError(f"fastv.layer = {self.config.layer} must be below the decoder's {num_layers} layers")
        return [self.config.layer]

    def kept_tokens(self, num_visual: int, num_layers: int) -> int:
        """T' for ``num_visual`` image tokens on a decoder of ``num_layers`` layers."""
        return kept_after(self.config, self.budget, num_visual, num_layers)

    def scores(self, state) -> torch.Tensor:
        """[B, V] the criterion of each visual token present, from layer K-1's attention."""
        layer = state.layer - 1
        if self.config.criterion == "last_token":
            rows = state.attention(layer).mean(dim=1)[:, 0]  # [B, L]
        else:
            rows = received_attention(state, layer)
        return state.visual_scores(rows)

    def select(self, layer: int, state) -> torch.Tensor:
        keep = self.kept_tokens(state.prompt_visual, state.num_layers)
        return self.scores(state).topk(min(keep, state.num_visual), dim=1).indices.sort(dim=1).values


def received_attention(state, layer: int, block: int = QUERY_BLOCK) -> torch.Tensor:
    """[B, L] the attention each row receives at ``layer``, mean over heads and over the real query
    rows (causal; padding queries left out), computed ``block`` queries at a time."""
    padding = state.padding_mask
    batch, length = padding.shape
    total = torch.zeros(batch, length, dtype=torch.float32, device=padding.device)
    for start in range(0, length, block):
        end = min(start + block, length)
        queries = torch.arange(start, end, device=padding.device).expand(batch, -1)
        rows = state.attention(layer, queries).mean(dim=1)  # [B, Q, L]
        # A left-padding query may attend to nothing (NaN): padding queries count for nothing.
        total += torch.where(padding[:, start:end, None], rows, 0.0).sum(dim=1)
    return total / padding.sum(dim=1, keepdim=True).clamp(min=1)
