"""LLaVA-NeXT's anyres images seen by a compressor: views, crop grids, unpadding and newline tokens.

Both LLaVA-NeXT codes (transformers' ``LlavaNextForConditionalGeneration``, and the original LLaVA
code with ``image_aspect_ratio: anyres`` and ``mm_patch_merge_type: spatial_unpad``) turn one image
into the same kind of sequence:

* views: the **base view** (the whole image resized to S x S) and ``gh x gw`` **crops** of the image
  resized and letterboxed to the best pinpoint resolution; each view gives p x p patch tokens
  (p = S / patch size, 24 for CLIP-L/14-336);
* the LLM reads the base view's p^2 tokens in raster order, then the crops stitched into one
  ``(gh p) x (gw p)`` map, cut to the **window** the letterbox did not cover (``rows x cols``
  patches), row by row with one ``image_newline`` token after each row. An image with a single
  view (no crops) gives its p^2 tokens and one newline. Stock tokens per image:
  ``p^2 + rows * (cols + 1)``.

A :class:`Tiling` holds one image's numbers (from the family's own stock functions, so the
window is exactly the stock unpadding); an :class:`AnyresLayout` a batch's, with the index
tensors that turn a compressor's rows back into each sample's LLM sequence (:func:`assemble`).

**How compressed tokens are placed** (both ways of compressing, see ``compress_views``):

* every token carries the patch it stands at (``CompressionOutput.positions``: a kept patch its
  own, CLS patch 0 of its view, a merged token the patch nearest its members' centroid);
* base-view tokens come first, in the method's output order (with ``none``: raster order);
* crop tokens follow in the raster order of the stitched, unpadded crop map (tokens at the same
  patch: view order, then output order); a crop token whose patch lies in the letterbox that the
  stock unpadding removes is dropped, as the stock model never shows that area to the LLM (as
  VisPruner's and CDPruner's NeXT code do: their selection masks go through the unpadding);
* ``image_newline`` tokens (``newlines``): ``occupied`` (default) keeps the newline after each
  crop row that still holds a kept token, so a newline still ends a row of the picture; ``all``
  keeps every row's newline (VisPruner and CDPruner force the newline mask on); ``none`` drops
  them all (VisionZip's NeXT code inserts none). The newline after a single-view image is kept
  unless ``none``. With method ``none`` both ``occupied`` and ``all`` give the stock sequence.
* each token's offset in the image's stock span (``visual_positions: original``): a base token
  its patch index, a crop token ``p^2 + row * (cols + 1) + col`` of its window patch, a newline
  ``p^2 + row * (cols + 1) + cols``; the span is the image's stock token count (per sample).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sparsezip_pl.compress.types import CompressionOutput, VisionCapture

CompressViews = Literal["per_view", "together"]
Newlines = Literal["occupied", "all", "none"]
COMPRESS_VIEWS = ("per_view", "together")
NEWLINES = ("occupied", "all", "none")


@dataclass(frozen=True)
class Tiling:
    """One image's anyres numbers: ``views`` (1 + crops), the crop ``grid`` (gh, gw) and the
    unpadded ``window`` (first row, first column, rows, cols) on the stitched crop map, in patches.
    A single view (text-only samples too) has grid (0, 0) and window (0, 0, 1, 0): its one newline
    sits where a row of zero columns ends."""

    views: int
    grid: tuple[int, int]
    window: tuple[int, int, int, int]

    @property
    def single(self) -> bool:
        return self.views == 1

    def stock_tokens(self, side: int) -> int:
        """Tokens the stock model gives this image: p^2 + rows * (cols + 1)."""
        _, _, rows, cols = self.window
        return side * side + rows * (cols + 1)

    def patches(self, side: int) -> int:
        """Patch tokens of the image (base view + unpadded crops, no newlines)."""
        _, _, rows, cols = self.window
        return side * side + rows * cols


SINGLE_VIEW = Tiling(1, (0, 0), (0, 0, 1, 0))


def unpad_window(unpad: Callable[[torch.Tensor], torch.Tensor], height: int, width: int) -> tuple[int, int, int, int]:
    """The window (r0, c0, rows, cols) that a stock ``unpad`` function keeps of a ``height x width``
    map: it is run on a map of indices, so the window is exactly the stock one."""
    index = torch.arange(height * width).view(1, height, width)
    kept = unpad(index)
    rows, cols = kept.shape[1:]
    r0, c0 = divmod(int(kept[0, 0, 0]), width)
    expected = index[:, r0 : r0 + rows, c0 : c0 + cols]
    if not torch.equal(kept, expected):
        raise ValueError("the stock unpadding did not keep one rectangular window")
    return r0, c0, rows, cols


def max_views(pinpoints: Sequence[Sequence[int]], image_size: int) -> int:
    """1 + the most crops a pinpoint resolution gives (5 for LLaVA-1.6's pinpoints)."""
    return 1 + max((h // image_size) * (w // image_size) for h, w in pinpoints)


def max_stock_tokens(pinpoints: Sequence[Sequence[int]], image_size: int, side: int) -> int:
    """The most tokens the stock model gives an image (no letterbox: the whole crop map)."""
    return max(side * side + (h // image_size * side) * (w // image_size * side + 1) for h, w in pinpoints)


class AnyresLayout:
    """The tilings of a batch (one image per sample) and the index tensors built from them.

    ``mode`` says how the capture's rows were formed: ``per_view`` (one row per view, its CLS
    first; rows ordered by sample, then view) or ``together`` (one row per sample: the base view's
    patches, then the unpadded crop patches in raster order, right-padded to the longest).
    """

    def __init__(self, tilings: Sequence[Tiling], side: int, mode: CompressViews = "per_view",
                 newlines: Newlines = "occupied", has_image: Sequence[bool] | None = None) -> None:
        if mode not in COMPRESS_VIEWS:
            raise ValueError(f"compress_views must be one of {COMPRESS_VIEWS}, got {mode!r}")
        if newlines not in NEWLINES:
            raise ValueError(f"newlines must be one of {NEWLINES}, got {newlines!r}")
        self.tilings = list(tilings)
        self.has_image = [True] * len(self.tilings) if has_image is None else [bool(f) for f in has_image]
        self.side = side
        self.mode = mode
        self.newlines = newlines
        self.views = [t.views for t in self.tilings]
        self.first_row = [0, *itertools.accumulate(self.views)][:-1]
        self.num_rows = sum(self.views)
        self.rows_max = max(t.window[2] for t in self.tilings)
        self.lengths = [t.patches(side) for t in self.tilings]
        self.stock_tokens = [t.stock_tokens(side) for t in self.tilings]
        self._tensors: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return len(self.tilings)

    # ------------------------------------------------------------ index tensors
    def view_index(self, max_views_in_batch: int, device: torch.device) -> torch.Tensor:
        """[R] the real views' rows in ``pixel_values.flatten(0, 1)`` ([B, max views, 3, S, S])."""
        index = [b * max_views_in_batch + v for b, views in enumerate(self.views) for v in range(views)]
        if max(self.views) > max_views_in_batch:
            raise ValueError(f"pixel_values hold {max_views_in_batch} views per image, an image needs {max(self.views)}")
        return torch.tensor(index, dtype=torch.long, device=device)

    def samples(self, device: torch.device) -> dict[str, torch.Tensor]:
        """[B] per-sample tensors: window ``r0 c0 rows cols``, crop grid width ``gw``, ``single``,
        ``first_row`` (the base view's row), ``length`` (patches), ``span`` (stock tokens) and
        ``has_image`` (text-only samples carry one dummy view and receive no tokens)."""
        key = ("samples", torch.device(device))
        if key not in self._tensors:
            columns = {
                "r0": [t.window[0] for t in self.tilings],
                "c0": [t.window[1] for t in self.tilings],
                "rows": [t.window[2] for t in self.tilings],
                "cols": [t.window[3] for t in self.tilings],
                "gw": [t.grid[1] for t in self.tilings],
                "single": [int(t.single) for t in self.tilings],
                "has_image": [int(f) for f in self.has_image],
                "first_row": self.first_row,
                "length": self.lengths,
                "span": self.stock_tokens,
            }
            table = torch.tensor(list(columns.values()), dtype=torch.long).to(device)
            tensors = dict(zip(columns, table.unbind(0)))
            tensors["single"] = tensors["single"].bool()
            tensors["has_image"] = tensors["has_image"].bool()
            self._tensors[key] = tensors
        return self._tensors[key]

    def rows(self, device: torch.device) -> dict[str, torch.Tensor]:
        """[R] per-view-row tensors (per_view mode): ``sample``, ``view`` (0 = base) and the crop's
        place in the grid ``crop_r``, ``crop_c``."""
        key = ("rows", torch.device(device))
        if key not in self._tensors:
            sample, view, crop_r, crop_c = [], [], [], []
            for b, tiling in enumerate(self.tilings):
                gw = max(tiling.grid[1], 1)
                for v in range(tiling.views):
                    sample.append(b)
                    view.append(v)
                    crop_r.append(max(v - 1, 0) // gw)
                    crop_c.append(max(v - 1, 0) % gw)
            table = torch.tensor([sample, view, crop_r, crop_c], dtype=torch.long).to(device)
            self._tensors[key] = dict(zip(("sample", "view", "crop_r", "crop_c"), table.unbind(0)))
        return self._tensors[key]

    def sample_index(self, device: torch.device) -> torch.Tensor | None:
        """The capture's ``sample_index``: [R] for per-view rows, None when rows are samples."""
        return self.rows(device)["sample"] if self.mode == "per_view" else None

    def spans(self, device: torch.device) -> torch.Tensor:
        """[B] each image's stock token count (its span for original positions)."""
        return self.samples(device)["span"]

    def output_width(self, width: int) -> int:
        """A static bound on one sample's visual tokens for compressed rows of ``width`` slots."""
        if self.mode == "per_view":
            return max(views * width + t.window[2] for views, t in zip(self.views, self.tilings))
        return width + self.rows_max

    # ------------------------------------------------------------ together rows
    def together_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``together`` rows: [B, N_max] indices of each row's patches among the tower's tokens
        (``[R, 1 + p^2]`` flattened, CLS at 0 of each view) and among its patches (``[R, p^2]``
        flattened), and the [B, N_max] mask of real (non-padding) patches."""
        s = self.samples(device)
        side, area = self.side, self.side * self.side
        j = torch.arange(max(self.lengths), device=device)[None]
        base = j < area
        crop = (j - area).clamp(min=0)
        cols = s["cols"].clamp(min=1)[:, None]
        grid_row = crop // cols + s["r0"][:, None]
        grid_col = crop % cols + s["c0"][:, None]
        view = torch.where(base, 0, 1 + (grid_row // side) * s["gw"][:, None] + grid_col // side)
        patch = torch.where(base, j, (grid_row % side) * side + grid_col % side)
        valid = j < s["length"][:, None]
        row = s["first_row"][:, None] + torch.where(valid, view, 0)
        patch = torch.where(valid, patch, 0)
        return row * (area + 1) + 1 + patch, row * area + patch, valid


@dataclass
class Assembly:
    """Where each sample's visual tokens come from: ``index`` [B, W] into the table ``[the rows'
    R*T slots | image_newline | zero]`` (``newline_row`` = R*T, ``zero_row`` = R*T + 1), ``mask``
    [B, W] of real tokens (left-aligned), ``offsets`` [B, W] in the image's stock span."""

    index: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor
    newline_row: int
    zero_row: int

    def gather(self, slots: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
        """[B, W, D] from the rows' slots [R, T, D] and the newline vector [D] (None: zeros)."""
        width = slots.shape[-1]
        newline = slots.new_zeros(width) if newline is None else newline.to(slots)
        table = torch.cat([slots.reshape(-1, width), newline[None], slots.new_zeros(1, width)])
        return table[self.index]


def assemble(layout: AnyresLayout, positions: torch.Tensor, mask: torch.Tensor) -> Assembly:
    """Each sample's LLM sequence from compressed rows (see the module docstring for the rule).

    positions / mask [R, T]: the rows' ``CompressionOutput.positions`` and ``mask`` (per_view: a
    row per view, positions are patches of that view; together: a row per sample, positions index
    the row's patches). One sort over all slots and newline candidates; no host sync.
    """
    device = positions.device
    num_rows, width = positions.shape
    batch = layout.batch_size
    side, area = layout.side, layout.side * layout.side
    s = layout.samples(device)
    positions = positions.long()
    if layout.mode == "per_view":
        if num_rows != layout.num_rows:
            raise ValueError(f"per-view compression has {num_rows} rows, the batch has {layout.num_rows} views")
        r = layout.rows(device)
        sample = r["sample"][:, None].expand(num_rows, width)
        view = r["view"][:, None].expand(num_rows, width)
        base = view == 0
        line = r["crop_r"][:, None] * side + positions // side - s["r0"][sample]
        column = r["crop_c"][:, None] * side + positions % side - s["c0"][sample]
    else:
        if num_rows != batch:
            raise ValueError(f"together compression has {num_rows} rows, the batch has {batch} samples")
        sample = torch.arange(batch, device=device)[:, None].expand(num_rows, width)
        view = torch.zeros_like(positions)
        base = positions < area
        crop = (positions - area).clamp(min=0)
        cols = s["cols"].clamp(min=1)[sample]
        line, column = crop // cols, crop % cols
    rows, cols = s["rows"][sample], s["cols"][sample]
    in_window = (line >= 0) & (line < rows) & (column >= 0) & (column < cols)
    valid = mask.bool() & (base | in_window) & s["has_image"][sample]  # a text-only sample's row is a dummy
    offsets = torch.where(base, positions, area + line * (cols + 1) + column)

    # Newline candidates: one per window row of each sample.
    line_index = torch.arange(layout.rows_max, device=device)[None].expand(batch, -1)
    exists = (line_index < s["rows"][:, None]) & s["has_image"][:, None]
    if layout.newlines == "all":
        newline = exists
    elif layout.newlines == "none":
        newline = torch.zeros_like(exists)
    else:
        crop_token = valid & ~base
        occupied = torch.zeros(batch * layout.rows_max + 1, dtype=torch.long, device=device)
        target = torch.where(crop_token, sample * layout.rows_max + line.clamp(0, layout.rows_max - 1),
                             batch * layout.rows_max)
        occupied.scatter_add_(0, target.reshape(-1), torch.ones_like(target).reshape(-1))
        newline = exists & ((occupied[:-1].view(batch, -1) > 0) | s["single"][:, None])
    newline_offsets = area + line_index * (s["cols"][:, None] + 1) + s["cols"][:, None]

    # Sort keys: sample, then base tokens in output order, then window offset (ties: view, slot).
    max_views = max(layout.views)
    tie = max_views * width + 1
    slot = torch.arange(width, device=device)[None].expand(num_rows, width)
    token_key = torch.where(base, slot, width + offsets * tie + view * width + slot)
    newline_key = width + newline_offsets * tie
    stride = width + (max(layout.stock_tokens) + 1) * tie
    invalid = batch * stride
    keys = torch.cat([
        torch.where(valid, sample * stride + token_key, invalid).reshape(-1),
        torch.where(newline, torch.arange(batch, device=device)[:, None] * stride + newline_key, invalid).reshape(-1),
    ])
    newline_row = num_rows * width
    source = torch.cat([torch.arange(newline_row, device=device),
                        torch.full((batch * layout.rows_max,), newline_row, device=device)])
    owner = torch.cat([sample.reshape(-1), torch.arange(batch, device=device).repeat_interleave(layout.rows_max)])
    present = torch.cat([valid.reshape(-1), newline.reshape(-1)])
    stock_offset = torch.cat([offsets.reshape(-1), newline_offsets.reshape(-1)])

    order = torch.sort(keys, stable=True).indices
    counts = torch.zeros(batch + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, torch.where(present, owner, batch), torch.ones_like(owner))
    counts = counts[:batch]
    start = counts.cumsum(0) - counts
    owner_sorted, present_sorted = owner[order], present[order]
    rank = torch.arange(order.numel(), device=device) - start[owner_sorted]
    out_width = layout.output_width(width)
    target = torch.where(present_sorted, owner_sorted * out_width + rank, batch * out_width)
    zero_row = newline_row + 1
    index = torch.full((batch * out_width + 1,), zero_row, dtype=torch.long, device=device)
    index.scatter_(0, target, torch.where(present_sorted, source[order], zero_row))
    offset_out = torch.zeros(batch * out_width + 1, dtype=torch.long, device=device)
    offset_out.scatter_(0, target, torch.where(present_sorted, stock_offset[order], 0))
    index = index[:-1].view(batch, out_width)
    return Assembly(index, index != zero_row, offset_out[:-1].view(batch, out_width), newline_row, zero_row)


# ---------------------------------------------------------------- together: rows of different lengths
def compress_by_length(method: Callable[[VisionCapture], CompressionOutput], capture: VisionCapture,
                       lengths: Sequence[int]) -> CompressionOutput:
    """Run ``method`` on rows of different real lengths (``together`` rows, right-padded to the
    longest): one call per distinct length, on the rows of that length cut to it (a loop over
    lengths, not images). A group whose rows fit the method's output (``output_length(n) >= n``:
    an image with no more patches than the budget) keeps all its patches. The outputs are padded
    to common widths and put back in row order."""
    from sparsezip_pl.compress.baselines import compress_none

    device = capture.hidden.device
    batch, longest = capture.hidden.shape[:2]
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(length, []).append(row)
    outputs, rows = [], []
    for length, members in sorted(groups.items()):
        index = torch.tensor(members, dtype=torch.long, device=device)
        part = _select_rows(capture, index, length)
        output_length = getattr(method, "output_length", None)
        if output_length is not None and output_length(length) >= length:
            outputs.append(compress_none(part.patches()))
        else:
            outputs.append(method(part))
        rows.append(index)
    if len(outputs) == 1 and rows[0].numel() == batch:
        single = outputs[0]
        return _pad_output(single, single.tokens.shape[1], single.kept_indices.shape[1], longest)
    return _merge(outputs, torch.cat(rows), longest)


def _select_rows(capture: VisionCapture, index: torch.Tensor, length: int) -> VisionCapture:
    def rows(tensor, dim):
        return None if tensor is None else tensor.index_select(dim, index)

    keys = rows(capture.keys, 1)
    attention = rows(capture.attention, 1)
    return VisionCapture(
        hidden=capture.hidden.index_select(0, index)[:, :length],
        queries=rows(capture.queries, 1),
        keys=None if keys is None else keys[..., :length, :],
        attention=None if attention is None else attention[..., :length],
        has_cls=capture.has_cls,
        grid=(1, length),
        text_embeds=rows(capture.text_embeds, 0),
        text_mask=rows(capture.text_mask, 0),
        project=capture.project,
        sample_index=None,
        layout=capture.layout,
    )


def _pad_output(output: CompressionOutput, width: int, kept: int, patches: int) -> CompressionOutput:
    def pad(tensor: torch.Tensor, size: int, value) -> torch.Tensor:
        extra = size - tensor.shape[1]
        if extra == 0:
            return tensor
        shape = (tensor.shape[0], extra, *tensor.shape[2:])
        return torch.cat([tensor, tensor.new_full(shape, value)], dim=1)

    return CompressionOutput(
        tokens=pad(output.tokens, width, 0),
        mask=pad(output.mask, width, False),
        kept_indices=pad(output.kept_indices, kept, -1),
        num_dominant=output.num_dominant,
        num_contextual=output.num_contextual,
        cluster_map=pad(output.cluster_map, patches, -1),
        scores=pad(output.scores, patches, 0),
        expected_tokens=output.expected_tokens,
        positions=pad(output.positions, width, 0),
    )


def _merge(outputs: list[CompressionOutput], rows: torch.Tensor, patches: int) -> CompressionOutput:
    width = max(o.tokens.shape[1] for o in outputs)
    kept = max(o.kept_indices.shape[1] for o in outputs)
    padded = [_pad_output(o, width, kept, patches) for o in outputs]
    order = torch.argsort(rows)

    def merged(name: str) -> torch.Tensor:
        return torch.cat([getattr(o, name) for o in padded])[order]

    return CompressionOutput(**{name: merged(name) for name in (
        "tokens", "mask", "kept_indices", "num_dominant", "num_contextual", "cluster_map", "scores",
        "expected_tokens", "positions")})


def views_per_sample(compression: CompressionOutput, sample: torch.Tensor, view: torch.Tensor, batch_size: int,
                     views: int, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None) -> CompressionOutput:
    """A compression with one row per view as one row per sample (``sample`` / ``view`` [R]: each
    row's sample and its view's index in the image; ``views`` the most views of an image): the
    method's counts (``num_dominant``, ``num_contextual``, ``expected_tokens``) summed over the
    views; ``kept_indices``, ``cluster_map`` and ``scores`` per view, view-major (patch ``v * N + i``
    of view ``v``; cluster ids made distinct across views); ``tokens``, ``mask`` and ``positions``
    as the family gives them for each sample, by default the views' rows one after another (a
    token's position ``v * N + i``)."""

    def summed(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(batch_size).index_add(0, sample, values)

    def per_view(values: torch.Tensor, fill) -> torch.Tensor:
        out = values.new_full((batch_size, views, *values.shape[1:]), fill)
        out[sample, view] = values
        return out.flatten(1, 2)

    n = compression.cluster_map.shape[1]
    kept, clusters = compression.kept_indices, compression.cluster_map
    width = compression.tokens.shape[1]
    if tokens is None:
        tokens, mask = per_view(compression.tokens, 0), per_view(compression.mask, False)
        positions = per_view(torch.where(compression.mask, compression.positions + view[:, None] * n, -1), -1)
    return CompressionOutput(
        tokens=tokens,
        mask=mask,
        kept_indices=per_view(torch.where(kept >= 0, kept + view[:, None] * n, -1), -1),
        num_dominant=summed(compression.num_dominant),
        num_contextual=summed(compression.num_contextual),
        cluster_map=per_view(torch.where(clusters >= 0, clusters + view[:, None] * width, -1), -1),
        scores=per_view(compression.scores, 0),
        expected_tokens=summed(compression.expected_tokens),
        positions=positions,
    )
