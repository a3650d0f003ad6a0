"""``pool``: the pooled grid chosen for a budget, equality with ``avg_pool2d`` (and a per-cell
loop where the grid does not divide), positions at the cells' centres, towers without CLS."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from method_helpers import assert_batched_equals_alone, assert_same_output, build, capture
from sparsezip_pl.compress.methods.pool import pooled_grid
from sparsezip_pl.compress.testing import single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("grid,tokens,expected", [
    ((24, 24), 64, (8, 8)), ((24, 24), 128, (8, 16)), ((24, 24), 192, (12, 16)), ((24, 24), 144, (12, 12)),
    ((24, 24), 127, (9, 14)), ((24, 24), 576, (24, 24)), ((8, 8), 16, (4, 4)), ((8, 8), 20, (4, 5)),
    ((1, 64), 16, (1, 16)), ((4, 16), 16, (2, 8)), ((8, 8), 1, (1, 1)),
])
def test_pooled_grid(grid, tokens, expected):
    assert pooled_grid(*grid, tokens) == expected


def test_rows_option_fixes_the_grid_and_is_checked():
    assert pooled_grid(24, 24, 128, fixed_rows=16) == (16, 8)
    assert pooled_grid(24, 24, 100, fixed_rows=5) == (5, 20)
    with pytest.raises(ValueError, match="pool.rows = 30"):
        pooled_grid(24, 24, 64, fixed_rows=30)


@pytest.mark.parametrize("budget,tokens", [(16, 16), (4, 4), (0.25, 16), (20, 20), (64, 64)])
def test_budget_is_met_exactly(budget, tokens):
    method = build("pool", budget)
    out = method(capture())
    assert method.output_length(64) == tokens
    assert out.tokens.shape[1] == tokens and out.num_tokens.tolist() == [tokens] * 3
    assert out.num_contextual.tolist() == [tokens] * 3 and out.num_dominant.tolist() == [0] * 3


@pytest.mark.parametrize("budget,kernel", [(16, 2), (4, 4), (64, 1)])
def test_equals_avg_pool2d_on_a_dividing_grid(budget, kernel):
    cap = capture()
    out = build("pool", budget)(cap)
    grid = cap.hidden[:, 1:].reshape(3, 8, 8, -1).permute(0, 3, 1, 2)
    reference = F.avg_pool2d(grid, kernel).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.tokens, reference, rtol=1e-6, atol=1e-6)


def test_uneven_cells_partition_the_grid():
    """24 x 24 -> 9 x 14 (budget 127): a per-cell loop over floor(i * R / r) edges."""
    cap = capture(batch=2, num_patches=576)
    out = build("pool", 127, num_patches=576)(cap)
    patches = cap.hidden[:, 1:].reshape(2, 24, 24, -1)
    row_edges = [i * 24 // 9 for i in range(10)]
    col_edges = [j * 24 // 14 for j in range(15)]
    cells, centres, members = [], [], torch.full((24, 24), -1)
    for i in range(9):
        for j in range(14):
            rows, cols = slice(row_edges[i], row_edges[i + 1]), slice(col_edges[j], col_edges[j + 1])
            cells.append(patches[:, rows, cols].mean(dim=(1, 2)))
            members[rows, cols] = len(cells) - 1
            centres.append((row_edges[i] + row_edges[i + 1] - 1) // 2 * 24 + (col_edges[j] + col_edges[j + 1] - 1) // 2)
    assert out.tokens.shape[1] == 126
    torch.testing.assert_close(out.tokens, torch.stack(cells, dim=1), rtol=1e-5, atol=1e-6)
    assert out.positions[0].tolist() == centres
    assert torch.equal(out.cluster_map[1], members.flatten())


def test_positions_are_the_patch_nearest_each_cell_centre():
    out = build("pool", 9, num_patches=36)(capture(num_patches=36))  # 6 x 6 -> 3 x 3 cells of 2 x 2
    # even sides: the upper-left of the four middle patches
    assert out.positions[0].tolist() == [0, 2, 4, 12, 14, 16, 24, 26, 28]
    out = build("pool", 4, num_patches=36)(capture(num_patches=36))  # 2 x 2 cells of 3 x 3: the centre
    assert out.positions[0].tolist() == [7, 10, 25, 28]


def test_batched_equals_alone_reruns_and_no_cls():
    method = build("pool", 16)
    out = assert_batched_equals_alone(method, capture())
    assert_same_output(out, method(capture()))
    cap = capture(has_cls=False)
    no_cls = build("pool", 16, has_cls=False)(cap)
    grid = cap.hidden.reshape(3, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(no_cls.tokens, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_non_square_grid_from_the_capture():
    cap = dataclasses.replace(capture(), grid=(4, 16))
    out = build("pool", 16)(cap)
    grid = cap.hidden[:, 1:].reshape(3, 4, 16, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.tokens, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="capture.grid"):
        build("pool", 16)(dataclasses.replace(capture(), grid=(5, 16)))
