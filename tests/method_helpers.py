"""Shared pieces of the per-method tests (tests/test_method_*.py): synthetic captures with a
projector and a question, building a method by name, and the batched-vs-alone check."""

from __future__ import annotations

import dataclasses

import torch

from sparsezip_pl.compress import CompressorConfig, Geometry, build_method
from sparsezip_pl.compress.testing import random_capture
from sparsezip_pl.compress.types import CompressionOutput, VisionCapture

HEADS, HEAD_DIM, WIDTH, TEXT_DIM = 4, 16, 32, 24


def projector(width: int = WIDTH, out: int = TEXT_DIM, seed: int = 7):
    """A fixed two-layer MLP like LLaVA's (Linear, GELU, Linear), as a plain function."""
    gen = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(out, width, generator=gen) / width**0.5, torch.randn(out, generator=gen) * 0.1
    w2, b2 = torch.randn(out, out, generator=gen) / out**0.5, torch.randn(out, generator=gen) * 0.1

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T + b2

    return project


def capture(batch: int = 3, num_patches: int = 64, has_cls: bool = True, seed: int = 0, peak=8.0,
            text_len: int = 6) -> VisionCapture:
    """A random capture with a projector and question embeddings (the last token of row 0 masked
    out); without CLS the hidden states are the patches alone and ``attention`` holds a
    substitute attention per head."""
    cap = random_capture(batch=batch, num_patches=num_patches, hidden_dim=WIDTH, num_heads=HEADS,
                         head_dim=HEAD_DIM, peak=peak, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    text = torch.randn(batch, text_len, TEXT_DIM, generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, -1] = False
    cap = dataclasses.replace(cap, text_embeds=text, text_mask=mask, project=projector())
    if not has_cls:
        attention = torch.rand(1, batch, HEADS, num_patches, generator=gen).softmax(dim=-1)
        cap = dataclasses.replace(cap, hidden=cap.hidden[:, 1:], queries=None, keys=None, attention=attention,
                                  has_cls=False)
    return cap


def build(name: str, budget=None, num_patches: int | None = 64, has_cls: bool = True, **options):
    """The registered method ``name`` with its own options ``options``."""
    config = CompressorConfig.coerce({"method": name, "budget": budget, **({name: options} if options else {})})
    geometry = Geometry(num_heads=HEADS, head_dim=HEAD_DIM, width=WIDTH, num_patches=num_patches,
                        has_cls=has_cls, text_dim=TEXT_DIM)
    return build_method(config, geometry)


def row(cap: VisionCapture, b: int) -> VisionCapture:
    """Image ``b`` of a capture, alone."""

    def take(x, dim):
        return None if x is None else x.narrow(dim, b, 1)

    return dataclasses.replace(cap, hidden=take(cap.hidden, 0), queries=take(cap.queries, 1), keys=take(cap.keys, 1),
                               attention=take(cap.attention, 1), text_embeds=take(cap.text_embeds, 0),
                               text_mask=take(cap.text_mask, 0))


def assert_batched_equals_alone(method, cap: VisionCapture) -> CompressionOutput:
    """Each image compressed alone gives the same tokens, indices and positions as in the batch."""
    out = method(cap)
    for b in range(cap.hidden.shape[0]):
        alone = method(row(cap, b))
        assert torch.equal(alone.mask[0], out.mask[b])
        assert torch.equal(alone.kept_indices[0], out.kept_indices[b])
        assert torch.equal(alone.positions[0], out.positions[b])
        assert torch.equal(alone.cluster_map[0], out.cluster_map[b])
        torch.testing.assert_close(alone.tokens[0], out.tokens[b], rtol=0, atol=1e-6)
    return out


def assert_same_output(a: CompressionOutput, b: CompressionOutput) -> None:
    """Two outputs are identical, field by field."""
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert (x is None and y is None) if x is None or y is None else torch.equal(x, y), field.name
