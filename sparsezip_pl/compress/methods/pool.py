"""``pool``: average pooling of the patch grid down to the budget (24 x 24 -> 8 x 8 = 64 tokens for
LLaVA-1.5's 576 patches at budget 64), the simplest content-agnostic merge.

The pooled grid (r, c) for a budget T on a patch grid (R, C) (``capture.grid_shape()``) is the
one with the most cells r * c <= T, r <= R and c <= C, and among those the aspect ratio r / c
closest to R / C (ties: fewer rows). So the output has exactly T tokens whenever T = r * c fits
the grid: every perfect square up to N on a square grid (64 = 8 x 8, 16 = 4 x 4), and also
128 = 8 x 16 and 192 = 12 x 16 on 24 x 24; otherwise the largest such product below T (a prime
127 gives 9 x 14 = 126 tokens), which ``output_length`` reports. ``rows`` fixes r instead.

Cells partition the grid: cell i spans patch rows floor(i R / r) .. floor((i + 1) R / r) - 1
(columns likewise), so every patch counts in exactly one token and cells differ by at most one
row or column. When r divides R and c divides C this is ``avg_pool2d`` with kernel (R / r, C / c);
otherwise it differs from ``adaptive_avg_pool2d``, whose windows overlap. Each token stands at
(``CompressionOutput.positions``) the patch nearest its cell's centre, the upper-left one of the
middle patches when the cell has an even side. The tokens are contextual (merged) tokens: the
cluster map says which cell each patch went to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..method import VisionMethod
from ..registry import register_method
from ..types import CompressionOutput, VisionCapture


@dataclass
class PoolConfig:
    """Options of the grid pooling."""

    rows: int | None = None
    """Rows of the pooled grid (columns: as many as the budget allows, at most the grid's);
    None: chosen from the budget and the grid's aspect ratio (module docstring)."""


def pooled_grid(rows: int, cols: int, tokens: int, fixed_rows: int | None = None) -> tuple[int, int]:
    """(r, c): the pooled grid for ``tokens`` tokens on a ``rows`` x ``cols`` patch grid."""
    if fixed_rows is not None:
        if not 1 <= fixed_rows <= min(rows, tokens):
            raise ValueError(f"pool.rows = {fixed_rows} must lie in [1, {min(rows, tokens)}] "
                             f"(the grid's {rows} rows and the budget's {tokens} tokens)")
        return fixed_rows, min(cols, tokens // fixed_rows)

    def rank(r: int) -> tuple[int, Fraction]:
        c = min(cols, tokens // r)
        # aspect distortion, exact: max(a, b) / min(a, b) of a = r / c and b = rows / cols
        a, b = r * cols, c * rows
        return (-r * c, Fraction(max(a, b), min(a, b)))

    r = min(range(1, min(rows, tokens) + 1), key=rank)  # min keeps the first (fewest rows) on ties
    return r, min(cols, tokens // r)


def cell_edges(size: int, cells: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[cells + 1] boundaries of ``cells`` near-equal consecutive parts of ``size``:
    floor(i * size / cells), built on ``device`` (no host-to-device copy)."""
    return torch.div(torch.arange(cells + 1, device=device) * size, cells, rounding_mode="floor")


@register_method("pool", config=PoolConfig)
class GridPool(VisionMethod):
    """Pool: the patch grid average-pooled to about ``budget`` cells, in raster order."""

    default_tokens = 64

    def _grid(self, rows: int, cols: int) -> tuple[int, int]:
        tokens = self.tokens(rows * cols)
        tokens = min(self.default_tokens, rows * cols) if tokens is None else tokens
        return pooled_grid(rows, cols, tokens, self.config.rows)

    def output_length(self, num_patches: int) -> int:
        side = math.isqrt(num_patches)
        r, c = self._grid(*((side, side) if side * side == num_patches else (1, num_patches)))
        return r * c

    def forward(self, capture: VisionCapture) -> CompressionOutput:
        patches = capture.patches()
        batch, n, width = patches.shape
        grid_rows, grid_cols = capture.grid_shape()
        if grid_rows * grid_cols != n:
            raise ValueError(f"pool: capture.grid {capture.grid} has {grid_rows * grid_cols} cells for {n} patches")
        self.check_budget(n)
        r, c = self._grid(grid_rows, grid_cols)
        device = patches.device
        row_edges, col_edges = cell_edges(grid_rows, r, device), cell_edges(grid_cols, c, device)
        # Cell of every patch row / column (bucketize: edges[i] <= x < edges[i + 1] -> i).
        row_cell = torch.bucketize(torch.arange(grid_rows, device=device), row_edges[1:], right=True)
        col_cell = torch.bucketize(torch.arange(grid_cols, device=device), col_edges[1:], right=True)
        cell = (row_cell[:, None] * c + col_cell[None, :]).reshape(n)  # [N] in 0 .. r*c-1
        counts = (row_edges.diff()[:, None] * col_edges.diff()[None, :]).reshape(r * c).to(torch.float32)
        sums = patches.new_zeros(batch, r * c, width, dtype=torch.float32).index_add_(1, cell, patches.float())
        tokens = (sums / counts[:, None]).to(patches.dtype)
        centre_row = (row_edges[:-1] + row_edges[1:] - 1) // 2
        centre_col = (col_edges[:-1] + col_edges[1:] - 1) // 2
        centre = (centre_row[:, None] * grid_cols + centre_col[None, :]).reshape(r * c)
        count = r * c
        return CompressionOutput(
            tokens=tokens,
            mask=torch.ones(batch, count, dtype=torch.bool, device=device),
            kept_indices=torch.empty(batch, 0, dtype=torch.long, device=device),
            num_dominant=torch.zeros(batch, dtype=torch.long, device=device),
            num_contextual=torch.full((batch,), count, dtype=torch.long, device=device),
            cluster_map=cell.expand(batch, n),
            scores=torch.zeros(batch, n, device=device),
            expected_tokens=torch.full((batch,), float(count), device=device),
            positions=centre.expand(batch, count),
        )
