"""Run a CLIP vision tower up to its feature layer and capture what scoring needs.

The tower's own modules run in the tower's own order (embeddings, pre-layernorm, encoder
layers), but the layers after the feature layer are skipped. The CLS query and the keys of the
scoring layers come from forward hooks on their ``q_proj`` / ``k_proj``: CLIP applies
``layer_norm1`` before the attention, so those outputs are exactly the attention's q and k. The
attention itself stays on the tower's implementation (SDPA by default); no attention matrix is
ever materialized.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sparsezip_pl.compress.types import VisionCapture


@dataclass
class VisionEncoderParts:
    """The modules of a CLIP vision transformer, found by walking the tower."""

    embeddings: nn.Module
    pre_norm: nn.Module
    layers: nn.ModuleList
    num_heads: int
    head_dim: int


def find_vision_encoder(tower: nn.Module) -> VisionEncoderParts:
    """Locate embeddings, pre-layernorm and encoder layers inside a CLIP vision model.

    The owner of the three is found by walking modules (transformers 5 keeps them on
    ``CLIPVisionModel`` itself, 4.x on ``CLIPVisionModel.vision_model``).
    """
    config = tower.config
    for module in tower.modules():
        embeddings = getattr(module, "embeddings", None)
        encoder = getattr(module, "encoder", None)
        layers = getattr(encoder, "layers", None)
        if embeddings is not None and isinstance(layers, nn.ModuleList) and len(layers) > 0:
            pre_norm = getattr(module, "pre_layrnorm", None)
            pre_norm = nn.Identity() if pre_norm is None else pre_norm
            heads = config.num_attention_heads
            return VisionEncoderParts(embeddings, pre_norm, layers, heads, config.hidden_size // heads)
    raise ValueError(f"{type(tower).__name__} has no module holding `embeddings` and `encoder.layers`")


def num_layers_to_run(index: int, num_layers: int) -> int:
    """How many encoder layers produce ``hidden_states[index]`` (``hidden_states[0]`` = embeddings)."""
    position = index if index >= 0 else num_layers + 1 + index
    if not 0 <= position <= num_layers:
        raise ValueError(f"layer index {index} is out of range for a tower of {num_layers} layers")
    return position


def scoring_layer_position(index: int, num_layers: int) -> int:
    """Position in ``encoder.layers`` of the layer whose output is ``hidden_states[index]``."""
    position = num_layers_to_run(index, num_layers) - 1
    if position < 0:
        raise ValueError("hidden_states[0] (the embeddings) has no attention to score with")
    return position


def _attention(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if all(isinstance(getattr(module, name, None), nn.Module) for name in ("q_proj", "k_proj")):
            return module
    raise ValueError(f"{type(layer).__name__} has no attention module with q_proj and k_proj")


@contextmanager
def capture_queries_and_keys(layers: Sequence[nn.Module], num_heads: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Forward hooks that record, for each layer, the CLS query ``q`` [B, h, d] and keys ``k`` [B, h, L, d].

    The hooks live only inside the ``with`` block and are removed on exit, exceptions included.
    """
    records: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    handles = []

    def hook(record: dict, name: str):
        def save(module: nn.Module, args, output: torch.Tensor) -> None:
            batch, length, width = output.shape
            heads = output.view(batch, length, num_heads, width // num_heads)
            record[name] = heads[:, 0] if name == "q" else heads.transpose(1, 2)

        return save

    try:
        for record, layer in zip(records, layers):
            attention = _attention(layer)
            handles.append(attention.q_proj.register_forward_hook(hook(record, "q")))
            handles.append(attention.k_proj.register_forward_hook(hook(record, "k")))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def encode_with_capture(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int,
    scoring_layers: Sequence[int] = (),
) -> VisionCapture:
    """Run ``tower`` up to ``hidden_states[feature_layer]`` and capture the scoring layers' q_cls and keys.

    Returns ``VisionCapture(hidden [B, L, C], queries [S, B, h, d], keys [S, B, h, L, d])`` in
    the tower's dtype; S = ``len(scoring_layers)`` (empty tensors when S = 0). Scoring layers
    use ``hidden_states`` indexing and must not come after the feature layer.
    """
    parts = find_vision_encoder(tower)
    total = len(parts.layers)
    run = num_layers_to_run(feature_layer, total)
    positions = [scoring_layer_position(index, total) for index in scoring_layers]
    if any(position >= run for position in positions):
        raise ValueError(
            f"scoring layers {list(scoring_layers)} must not come after the feature layer {feature_layer}: "
            "the tower stops there"
        )
    dtype = next(tower.parameters()).dtype
    hidden = parts.embeddings(pixel_values.to(dtype))
    hidden = parts.pre_norm(hidden)
    with capture_queries_and_keys([parts.layers[p] for p in positions], parts.num_heads) as records:
        for layer in parts.layers[:run]:
            hidden = layer(hidden, None)
            if isinstance(hidden, tuple):  # layers of transformers < 5 return tuples
                hidden = hidden[0]
    batch, length, _ = hidden.shape
    if records:
        queries = torch.stack([record["q"] for record in records])
        keys = torch.stack([record["k"] for record in records])
    else:
        queries = hidden.new_empty(0, batch, parts.num_heads, parts.head_dim)
        keys = hidden.new_empty(0, batch, parts.num_heads, length, parts.head_dim)
    return VisionCapture(hidden=hidden, queries=queries, keys=keys)
