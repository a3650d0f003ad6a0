"""The LLM-side hook point: prune visual tokens inside the decoder, once, at prefill.

``with llm_pruning(family, method, visual_mask): model(...) / generate(...)`` installs forward
pre-hooks on the decoder layers for the duration of the block. Before each layer the method
names (:meth:`~sparsezip_pl.compress.LLMMethod.prune_layers`), at prefill, the method sees a
:class:`PruneState` and returns which visual tokens the later layers keep; from then on every
later layer receives the kept rows of the hidden states, the attention mask, the position ids
and the rotary embeddings, and writes only those rows to the KV cache. Decoding steps (one new
token against the cache) see the cache's kept columns only. Nothing in the model is modified, and
its attention implementation (SDPA) stays: the attention rows a method ranks by are recomputed
for the few queries it needs (:meth:`PruneState.attention`), never a full attention map.

Positions: the kept tokens keep their original position ids (FastV's way), unless the method sets
``renumber_positions`` (PyramidDrop's way): then, from each pruning layer on, every kept row's
position moves down by the number of prompt rows dropped before it (so positions that were
contiguous stay contiguous: 0..n'-1), the rotary embeddings of those layers are recomputed for
the new positions (:meth:`~sparsezip_pl.models.families.base.ModelFamily.rotary_embeddings`), and
a decoding step's position moves down by all the rows dropped before that layer.

The hook also counts the visual tokens every decoder layer saw at the last prefill
(:meth:`_Pruning.visual_tokens`): what a run reports as the LLM's visual-token budget.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class PruneState:
    """What an LLM-side method sees before a decoder layer, at prefill.

    hidden_states: [B, L, D] the layer's input (rows already pruned by earlier stages).
    visual_mask:   [B, L] bool, the visual tokens still present.
    padding_mask:  [B, L] bool, real (non-padding) positions.
    position_ids:  [B, L] (or [3, B, L] for M-RoPE) the positions the rows carry.
    layer:         the decoder layer about to run.
    num_layers:    the decoder's layer count.
    visual_rows:   [B, V] long, the rows of the V visual tokens present, in order (the indices a
                   method's :meth:`~sparsezip_pl.compress.LLMMethod.select` returns index these).
    num_visual:    V, the visual tokens present per sample (every sample holds as many).
    prompt_visual: the visual tokens per sample in the prompt, before any pruning layer.
    """

    hidden_states: torch.Tensor
    visual_mask: torch.Tensor
    padding_mask: torch.Tensor
    position_ids: torch.Tensor
    layer: int
    _probe: Any = field(default=None, repr=False)
    num_layers: int = 0
    visual_rows: torch.Tensor | None = None
    num_visual: int = 0
    prompt_visual: int = 0

    def visual_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, V] the entries of per-row ``scores`` [B, L] at the visual tokens, in their order."""
        return scores.gather(1, self.visual_rows)

    def attention(self, layer: int | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities [B, h, Q, L] of decoder ``layer`` (default: the one about to
        run) for the query rows ``queries`` [B, Q] (default: each row's last real token), over
        the current rows, causal and padding masks applied. Computed from that layer's own
        input norm, q/k projections and rotary embedding on its input hidden states; the model's
        own attention (SDPA, flash) is not touched and no [L, L] map is built. ``layer`` is the
        one about to run or the one before it. A query row that may attend to nothing (a left
        padding row) holds NaN."""
        return self._probe(self.layer if layer is None else layer, queries)


class _Pruning:
    """State of one ``llm_pruning`` block: the kept rows of the prompt, per decoder layer."""

    def __init__(self, family, method, visual_mask: torch.Tensor, padding_mask: torch.Tensor,
                 fixed_keep: dict[int, torch.Tensor] | None = None) -> None:
        self.family = family
        self.method = method
        self.layers = family.decoder_layers()
        self.prune_at = sorted(method.prune_layers(len(self.layers)))
        self.visual_mask = visual_mask.bool()
        self.padding_mask = padding_mask.bool()
        self.fixed_keep = fixed_keep
        self.renumber = bool(getattr(method, "renumber_positions", False))
        self.kept: dict[int, torch.Tensor] = {}  # prune layer -> [B, L_kept] row indices into the prompt
        self.inputs: dict[int, tuple] = {}  # layer -> (hidden_states, position_embeddings, rows) at prefill
        self.counts: dict[int, torch.Tensor] = {}  # first layer -> [B] visual tokens from that layer on
        self.prompt_length = visual_mask.shape[1]

    def visual_tokens(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The visual tokens per sample that the decoder saw at the last prefill: ([B] float, the
        mean over all decoder layers; [B] long, those the last layer saw); None before a prefill."""
        if not self.counts:
            return None
        starts = sorted(self.counts)
        ends = [*starts[1:], len(self.layers)]
        total = sum(self.counts[start].float() * (end - start) for start, end in zip(starts, ends))
        return total / len(self.layers), self.counts[starts[-1]]

    # ----------------------------------------------------------------- helpers
    def _rows_for(self, layer: int) -> torch.Tensor | None:
        rows = None
        for boundary in self.prune_at:
            if boundary <= layer and boundary in self.kept:
                rows = self.kept[boundary]
        return rows

    @staticmethod
    def _take(tensor: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Rows ``rows`` [B, K] of ``tensor`` along ``dim`` (broadcast batch dims expanded)."""
        index_shape = [1] * tensor.dim()
        index_shape[0] = rows.shape[0]
        index_shape[dim] = rows.shape[1]
        expand = list(tensor.shape)
        expand[0] = rows.shape[0]
        expand[dim] = rows.shape[1]
        source = tensor.expand(rows.shape[0], *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor
        return source.gather(dim, rows.view(index_shape).expand(expand))

    def _slice_kwargs(self, kwargs: dict[str, Any], rows: torch.Tensor, prefill: bool) -> dict[str, Any]:
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            total = mask.shape[-1]
            columns = rows if total == self.prompt_length else torch.cat(
                [rows, torch.arange(self.prompt_length, total, device=rows.device).expand(rows.shape[0], -1)], dim=1)
            mask = self._take(mask, columns, 3)
            if prefill:
                mask = self._take(mask, rows, 2)
            kwargs["attention_mask"] = mask
        if prefill:
            embeddings = kwargs.get("position_embeddings")
            if embeddings is not None:
                kwargs["position_embeddings"] = tuple(self._take(t, rows, t.dim() - 2) for t in embeddings)
            positions = kwargs.get("position_ids")
            if isinstance(positions, torch.Tensor):
                kwargs["position_ids"] = self._take(positions, rows, positions.dim() - 1) if positions.dim() == 2 \
                    else torch.stack([self._take(p, rows, 1) for p in positions])
        return kwargs

    def _layer_kwargs(self, kwargs: dict[str, Any], rows: torch.Tensor, prefill: bool,
                      hidden: torch.Tensor) -> dict[str, Any]:
        """A layer's keyword inputs for the kept prompt ``rows``: sliced, and with renumbered
        positions and their rotary embeddings when the method renumbers."""
        kwargs = self._slice_kwargs(kwargs, rows, prefill)
        if not self.renumber:
            return kwargs
        positions = kwargs.get("position_ids")
        if not isinstance(positions, torch.Tensor):
            raise ValueError("renumbering the kept tokens' positions needs the position ids the decoder "
                             "passes its layers, and this decoder passes none")
        if positions.dim() != 2:
            raise NotImplementedError("renumbering multi-axis (M-RoPE) positions is not defined; "
                                      "keep the original positions instead")
        if prefill:
            # rows are sorted prompt rows: rows[j] - j of the rows before rows[j] were dropped.
            dropped = rows - torch.arange(rows.shape[1], device=rows.device)
        else:
            dropped = self.prompt_length - rows.shape[1]  # the decode step follows every prompt row
        kwargs["position_ids"] = positions = positions - dropped
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = self.family.rotary_embeddings(hidden, positions)
        return kwargs

    # ------------------------------------------------------------------- probe
    def probe(self, layer: int, queries: torch.Tensor | None) -> torch.Tensor:
        hidden, embeddings, rows = self.inputs[layer]
        attention = self.family.attention_module(self.layers[layer])
        norm = self.layers[layer].input_layernorm
        x = norm(hidden)
        padding = self.padding_mask if rows is None else self._take(self.padding_mask, rows, 1)
        batch, length = padding.shape
        if queries is None:  # each row's last real token (any padding side)
            queries = (padding * torch.arange(length, device=x.device)).amax(dim=1, keepdim=True)
        head_dim = attention.head_dim
        q = attention.q_proj(self._take(x, queries, 1)).view(batch, queries.shape[1], -1, head_dim).transpose(1, 2)
        k = attention.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = embeddings
        q_cos, q_sin = (self._take(t, queries, t.dim() - 2) for t in (cos, sin))
        q, _ = self.family.apply_rotary(attention, q, q, q_cos, q_sin)
        _, k = self.family.apply_rotary(attention, k, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attention.scaling
        causal = torch.arange(length, device=x.device).view(1, 1, length) <= queries.unsqueeze(-1)
        allowed = causal & padding.unsqueeze(1)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        return torch.softmax(scores, dim=-1)

    # ------------------------------------------------------------------- hooks
    def pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            hidden = args[0] if args else kwargs["hidden_states"]
            prefill = hidden.shape[1] > 1
            if index == 0 and prefill:
                self.kept.clear()
                self.inputs.clear()
                self.counts = {0: self.visual_mask.sum(1)}
            rows = self._rows_for(index)
            layer_kwargs = kwargs if rows is None else self._layer_kwargs(kwargs, rows, prefill, hidden)
            if prefill and (index in self.prune_at or index + 1 in self.prune_at):
                self.inputs[index] = (hidden, layer_kwargs.get("position_embeddings"), rows)
            if prefill and index in self.prune_at:
                new_rows = self._select(index, hidden, layer_kwargs, rows)
                local = new_rows if rows is None else torch.searchsorted(rows, new_rows)
                hidden = self._take(hidden, local, 1)
                self.kept[index] = new_rows
                self.counts[index] = self._take(self.visual_mask, new_rows, 1).sum(1)
                rows = new_rows
                layer_kwargs = self._layer_kwargs(kwargs, rows, prefill, hidden)
            if rows is None:
                return None
            if args:
                return (hidden, *args[1:]), layer_kwargs
            layer_kwargs["hidden_states"] = hidden
            return args, layer_kwargs

        return hook

    def _select(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any], rows: torch.Tensor | None):
        """Prompt rows kept from layer ``index`` on: every non-visual row plus the method's choice
        among the visual ones, in their order. Every sample must hold the same number of visual
        tokens (one host sync here, once per prefill and pruning layer, to size the result).
        ``kwargs`` are the layer's own (sliced, renumbered) inputs."""
        if self.fixed_keep is not None:
            return self.fixed_keep[index]
        batch, length = hidden.shape[:2]
        if rows is None:
            rows = torch.arange(length, device=hidden.device).expand(batch, -1)
        visual = self._take(self.visual_mask, rows, 1)
        counts = visual.sum(1)
        num_visual, uneven, prompt_visual = (int(v) for v in torch.stack(
            [counts.max(), (counts != counts.max()).long().max(), self.visual_mask.sum(1).max()]).tolist())
        if uneven:
            raise ValueError("LLM-side pruning needs the same number of visual tokens in every sample of a batch")
        if num_visual == 0:
            return rows  # no image in this batch: nothing to prune
        # Row index of the j-th visual token of each sample: visual rows sort first, in order.
        order = torch.where(visual, 0, 1) * length + torch.arange(length, device=hidden.device)
        visual_rows = order.argsort(dim=1)[:, :num_visual]
        state = PruneState(hidden, visual, self._take(self.padding_mask, rows, 1), kwargs.get("position_ids"),
                           index, self.probe, num_layers=len(self.layers), visual_rows=visual_rows,
                           num_visual=num_visual, prompt_visual=prompt_visual)
        choice = self.method.select(index, state)  # [B, K] indices among the visual rows present
        keep = ~visual
        keep.scatter_(1, visual_rows.gather(1, choice), True)
        kept = length - num_visual + choice.shape[1]
        local = torch.where(keep, 0, 1).mul_(length).add_(torch.arange(length, device=hidden.device))
        local = local.argsort(dim=1)[:, :kept].sort(dim=1).values
        return rows.gather(1, local)


@contextmanager
def llm_pruning(family, method, visual_mask: torch.Tensor, padding_mask: torch.Tensor,
                fixed_keep: dict[int, torch.Tensor] | None = None) -> Iterator[_Pruning]:
    """Prune the visual tokens of ``visual_mask`` [B, L] (the prompt's) inside the decoder with
    ``method`` while the block runs (a forward or a whole ``generate``). ``padding_mask`` [B, L]
    marks real positions. ``fixed_keep`` (prune layer -> [B, K] prompt rows) replays a selection
    (tests: a recompute without the cache that drops the same rows). Hooks are removed on exit."""
    state = _Pruning(family, method, visual_mask, padding_mask, fixed_keep)
    handles = [layer.register_forward_pre_hook(state.pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(state.layers)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def default_apply_rotary(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, cos, sin):
    """The rotary embedding of the attention module's own modeling file (``apply_rotary_pos_emb``)."""
    module = sys.modules[type(attention).__module__]
    return module.apply_rotary_pos_emb(q, k, cos, sin)
