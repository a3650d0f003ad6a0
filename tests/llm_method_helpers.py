"""Shared checks of the LLM-side methods (FastV, PyramidDrop): the rows a method keeps at prefill,
a greedy recompute without the KV cache that drops the same rows, and eager attention maps."""

from __future__ import annotations

import torch

from sparsezip_pl.models import load_backend
from sparsezip_pl.models.llm_hook import llm_pruning


def prefill(backend, method, spliced, recorder=None):
    """Run the LLM once on the spliced prompt under the method's hooks; the hook state (its
    ``kept`` rows per pruning layer and ``visual_tokens()``) and the logits. ``recorder`` is a
    forward pre-hook (with kwargs) put on every decoder layer after the pruning hooks."""
    handles = []
    with llm_pruning(backend, method, spliced.visual_mask, spliced.attention_mask.bool()) as state:
        if recorder is not None:
            handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
                       for i, layer in enumerate(backend.decoder_layers())]
        try:
            with torch.no_grad():
                logits = backend.language_model(spliced.inputs_embeds, spliced.attention_mask,
                                                 spliced.position_ids).logits
        finally:
            for handle in handles:
                handle.remove()
    return state, logits


def kept_visual(rows: torch.Tensor, visual_mask: torch.Tensor) -> list[list[int]]:
    """Per sample, the indices (among its visual tokens, in order) of the visual tokens in ``rows``."""
    index = visual_mask.long().cumsum(1) - 1
    out = []
    for b in range(rows.shape[0]):
        kept = rows[b][visual_mask[b, rows[b]]]
        out.append(index[b, kept].tolist())
    return out


def recompute_greedy(backend, method, spliced, kept: dict[int, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy tokens [B, steps] without the KV cache: the whole sequence again at every step, the
    same prompt rows dropped at the same layers and every generated token kept."""
    embeds, mask, positions = spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
    batch, prompt = spliced.visual_mask.shape
    tokens = []
    for step in range(steps):
        extra = torch.arange(prompt, embeds.shape[1]).expand(batch, -1)
        rows = {layer: torch.cat([r, extra], dim=1) for layer, r in kept.items()}
        visual = torch.nn.functional.pad(spliced.visual_mask, (0, step))
        with llm_pruning(backend, method, visual, mask.bool(), fixed_keep=rows), torch.no_grad():
            logits = backend.language_model(embeds, mask, positions).logits
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        embeds = torch.cat([embeds, backend.embed_tokens(token[:, None])], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.stack(tokens, dim=1)


def eager_attentions(family: str, path, spliced, method=None, fixed_keep=None) -> tuple[torch.Tensor, ...]:
    """The attention maps of every decoder layer from the same checkpoint loaded with eager
    attention (``output_attentions=True``), optionally under ``method``'s hooks replaying ``fixed_keep``."""
    eager = load_backend(family, path, attn_implementation="eager")
    assert eager.model.get_decoder().config._attn_implementation == "eager"
    context = llm_pruning(eager, method, spliced.visual_mask, spliced.attention_mask.bool(), fixed_keep=fixed_keep) \
        if method is not None else torch.no_grad()
    with context, torch.no_grad():
        output = eager.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids,
                                      output_attentions=True)
    return output.attentions


def top_visual(scores: torch.Tensor, visual_mask: torch.Tensor, keep: int) -> list[list[int]]:
    """Per sample, the sorted indices (among its visual tokens) of the ``keep`` highest ``scores`` [B, L]."""
    out = []
    for b in range(scores.shape[0]):
        visual = scores[b][visual_mask[b]]
        out.append(sorted(visual.topk(keep).indices.tolist()))
    return out
