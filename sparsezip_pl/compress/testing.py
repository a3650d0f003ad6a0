"""Synthetic vision captures for tests and benchmarks (no model needed)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .types import VisionCapture


def random_capture(
    batch: int = 2,
    num_patches: int = 64,
    hidden_dim: int = 32,
    num_heads: int = 4,
    head_dim: int = 16,
    num_layers: int = 1,
    peak: float | Sequence[float] = 0.0,
    num_hot: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> VisionCapture:
    """A random :class:`VisionCapture` of shape B = ``batch``, L = 1 + ``num_patches``.

    ``peak`` controls how concentrated the CLS attention is: 0 gives random queries (attention
    spread fairly evenly), larger values align each image's CLS query with the keys of
    ``num_hot`` random patches, like the few high-attention patches of a real CLIP layer
    (with 16 heads of 64 dims and 8 hot patches, ``peak`` 20 gives an effective attention count
    ``exp(H(a))`` of about 30, ``peak`` 0 of about 550 out of 576). A sequence gives one value
    per image.
    """
    gen = torch.Generator().manual_seed(seed)
    length = num_patches + 1
    hidden = torch.randn(batch, length, hidden_dim, generator=gen)
    keys = torch.randn(num_layers, batch, num_heads, length, head_dim, generator=gen)
    queries = torch.randn(num_layers, batch, num_heads, head_dim, generator=gen)
    peak = torch.as_tensor(peak, dtype=torch.float32).expand(batch)[None, :, None, None]
    if bool((peak > 0).any()):
        hot = torch.rand(num_layers, batch, num_patches, generator=gen).argsort(dim=-1)[..., :num_hot] + 1
        index = hot[:, :, None, :, None].expand(-1, -1, num_heads, -1, head_dim)
        direction = keys.gather(3, index).mean(dim=3)
        queries = queries + peak * direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return VisionCapture(hidden.to(dtype), queries.to(dtype), keys.to(dtype))


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the previous setting.

    For tests on small tensors: threads only add synchronization there, and on a shared machine a
    descheduled OpenMP thread stalls every parallel kernel (even a tiny batched matmul) for a
    whole scheduler time slice.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
