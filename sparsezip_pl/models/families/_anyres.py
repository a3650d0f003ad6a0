"""What the two LLaVA-NeXT families share: anyres images in, views compressed per view or together,
each sample's stock-shaped visual sequence out (see :mod:`sparsezip_pl.models.anyres`).

**compress_views** (a family option; ``load_family(..., compress_views=...)``,
``sparsezip(model, family_options={...})``):

* ``per_view`` (default): every 336 view (the base view and each crop) is a row of its own, with
  its CLS token, compressed like a LLaVA-1.5 image. This is what VisionZip, VisPruner and CDPruner's
  LLaVA-NeXT code does (budget T per view; their tables quote T x 5, e.g. "32 x 5 = 160").
  An int ``budget`` counts visual tokens per image as everywhere in the project, and is split
  evenly over the most views an image can have (``max_views``: 5 for LLaVA-1.6's pinpoints):
  each view gets ``budget // max_views`` (160 -> 32 per view, 320 -> 64, 640 -> 128), so an image
  with fewer views (3 or 4) gets fewer tokens, as in those papers. A fractional budget is a
  fraction of every view. A method's own token counts (VisionZip's ``dominant``/``contextual``,
  SparseZip's ``dominant``/``k_max``/``contextual_num``) count per view.
* ``together``: one row per image holding all its patches (the base view's, then the unpadded
  crop map's; no newlines), one budget per image: DivPrune's and PyramidDrop's way (they rank the
  image's whole sequence at once). The row has no CLS token: CLS-attention methods read each
  patch's attention from its own view's CLS (the tower's softmax within that view), concatenated
  over the views. Rows of different lengths (images of different sizes) are compressed in groups
  of equal length, one method call per distinct length; an image with no more patches than the
  method's output keeps them all. An int budget is per image; a fraction, of each image's patches.
  (DivPrune's NeXT code selects among the newline tokens too, since it works on the LLM's input
  sequence; here a method sees vision features, which newlines are not, and newlines follow the
  ``newlines`` rule.)

LLM-side methods (FastV, PyramidDrop) see the whole stock sequence in the LLM, newlines included,
whatever ``compress_views`` says; their budget is per image and is not split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sparsezip_pl.compress.types import CompressionOutput, Geometry, VisionCapture
from sparsezip_pl.models.anyres import (
    COMPRESS_VIEWS,
    NEWLINES,
    SINGLE_VIEW,
    AnyresLayout,
    Tiling,
    assemble,
    compress_by_length,
    max_stock_tokens,
    max_views,
    views_per_sample,
)
from sparsezip_pl.models.batching import ImagePreprocessor
from sparsezip_pl.models.capture import encode_with_capture
from sparsezip_pl.models.families.base import is_stock, pack_stock_ids


class AnyresFamily:
    """Mixin for a :class:`~sparsezip_pl.models.families.base.ModelFamily` whose images are
    LLaVA-NeXT anyres views. The concrete family provides ``tiling(size)`` (one image's
    :class:`~sparsezip_pl.models.anyres.Tiling` from (height, width), by its stock functions)
    and ``pinpoints_hw`` (the pinpoint resolutions as (height, width))."""

    compress_views: str = "per_view"
    newlines: str = "occupied"
    anyres = True

    def configure_anyres(self, compress_views: str = "per_view", newlines: str = "occupied") -> None:
        """Set the family options (see the module docstring and :mod:`sparsezip_pl.models.anyres`)."""
        if compress_views not in COMPRESS_VIEWS:
            raise ValueError(f"compress_views must be one of {COMPRESS_VIEWS}, got {compress_views!r}")
        if newlines not in NEWLINES:
            raise ValueError(f"newlines must be one of {NEWLINES}, got {newlines!r}")
        self.compress_views = compress_views
        self.newlines = newlines
        config = self.vision_tower.config
        self.tower_image_size: int = config.image_size
        self.side: int = config.image_size // config.patch_size
        self._tilings: dict[tuple[int, int], Tiling] = {}
        newline = [p for name, p in self.model.named_parameters() if name.split(".")[-1] == "image_newline"]
        if len(newline) != 1:
            raise ValueError(f"{type(self.model).__name__} has no single 'image_newline' parameter (found {len(newline)})")
        self.image_newline = newline[0]

    # ------------------------------------------------------------------ geometry
    @property
    def pinpoints_hw(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def stock_tiling(self, size: tuple[int, int]) -> Tiling:
        """One image's tiling from its (height, width), by the family's stock functions."""
        raise NotImplementedError

    def tiling(self, size: tuple[int, int]) -> Tiling:
        size = (int(size[0]), int(size[1]))
        if size not in self._tilings:
            if min(size) < 1:
                raise ValueError(f"image size {size} (height, width) must be positive")
            self._tilings[size] = self.stock_tiling(size)
        return self._tilings[size]

    @property
    def max_views(self) -> int:
        """1 + the most crops an image can have (5 for LLaVA-1.6)."""
        return max_views(self.pinpoints_hw, self.tower_image_size)

    @property
    def max_stock_tokens(self) -> int:
        return max_stock_tokens(self.pinpoints_hw, self.tower_image_size, self.side)

    def max_visual_tokens(self, method) -> int:
        """The most visual tokens an image can send the LLM under ``method``: over the pinpoint
        resolutions, the method's output for the views' rows (``per_view``: one row per view;
        ``together``: one row of all patches) plus at most one newline per crop-map row."""
        output_length = getattr(method, "output_length", None)
        if output_length is None or is_stock(method):
            return self.max_stock_tokens
        side, size, bound = self.side, self.tower_image_size, 0
        for height, width in self.pinpoints_hw:
            crop_rows, crop_cols = height // size, width // size
            rows, cols = crop_rows * side, crop_cols * side
            if self.compress_views == "per_view":
                tokens = (1 + crop_rows * crop_cols) * output_length(side * side)
            else:
                tokens = output_length(side * side + rows * cols)
            bound = max(bound, tokens + rows)
        return bound

    def stock_tokens(self, size: tuple[int, int]) -> int:
        """The visual tokens the stock model gives an image of (height, width)."""
        return self.tiling(size).stock_tokens(self.side)

    def layout(self, batch: dict[str, Any]) -> AnyresLayout:
        """The batch's tiling (``image_sizes`` [B, 2] as (height, width), ``has_image`` [B])."""
        sizes = batch.get("image_sizes")
        if sizes is None:
            raise ValueError("a LLaVA-NeXT batch needs 'image_sizes' [B, 2] (height, width) beside pixel_values")
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(size) for size in sizes]
        has_image = batch.get("has_image")
        flags = [True] * len(sizes) if has_image is None else [bool(f) for f in torch.as_tensor(has_image).tolist()]
        if len(flags) != len(sizes):
            raise ValueError(f"image_sizes has {len(sizes)} rows for {len(flags)} samples")
        tilings = [self.tiling(size) if flag else SINGLE_VIEW for size, flag in zip(sizes, flags)]
        return AnyresLayout(tilings, self.side, self.compress_views, self.newlines, flags)

    # ------------------------------------------------------------ method set-up
    def method_setup(self, config: Any, geometry: Geometry) -> tuple[Any, Geometry]:
        """Per view: a row is a view (N = p^2) and an int budget is split over ``max_views``.
        Together: rows vary in length (N unknown), no CLS. LLM side: N varies per image."""
        from sparsezip_pl.compress import get_method

        side = get_method(config.method).side
        if side != "vision":
            return config, dataclasses.replace(geometry, num_patches=None)
        if self.compress_views == "together":
            return config, dataclasses.replace(geometry, num_patches=None, has_cls=False)
        budget = config.budget
        if budget is not None and float(budget).is_integer() and budget >= 1:
            per_view = int(budget) // self.max_views
            if per_view < 1:
                raise ValueError(
                    f"budget = {budget} visual tokens per image gives less than one per view: per-view compression "
                    f"splits it over the {self.max_views} views an image can have"
                )
            config = dataclasses.replace(config, budget=per_view)
        return config, geometry

    def compress_rows(self, method, capture: VisionCapture) -> CompressionOutput:
        layout = capture.layout
        if isinstance(layout, AnyresLayout) and layout.mode == "together":
            return compress_by_length(method, capture, layout.lengths)
        return method(capture)

    # ------------------------------------------------------------------ vision
    def encode_images(self, batch: dict[str, Any], scoring_layers: list[int]) -> VisionCapture:
        """The real views of every image through the tower (one call), as per-view rows or
        together rows (see the module docstring)."""
        layout = self.layout(batch)
        pixels = batch["pixel_values"]
        if pixels.dim() != 5:
            raise ValueError(f"LLaVA-NeXT pixel_values must be [B, views, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[0] != layout.batch_size:
            raise ValueError(f"pixel_values hold {pixels.shape[0]} images for {layout.batch_size} samples")
        device = self.device
        layout.pixel_views = pixels.shape[1]
        views = pixels.to(device).flatten(0, 1).index_select(0, layout.view_index(pixels.shape[1], device))
        capture = encode_with_capture(self.vision_tower, self.pixels_for_tower(views), self.feature_layer, scoring_layers)
        if layout.mode == "per_view":
            return dataclasses.replace(capture, sample_index=layout.sample_index(device), layout=layout)
        return self._together(capture, layout, bool(scoring_layers))

    def _together(self, capture: VisionCapture, layout: AnyresLayout, scoring: bool) -> VisionCapture:
        from sparsezip_pl.compress.baselines import cls_patch_attention

        tokens, patches, _ = layout.together_index(capture.hidden.device)
        hidden = capture.hidden.flatten(0, 1)[tokens]
        keys = attention = None
        if scoring:
            layers, rows, heads, length, dim = capture.keys.shape
            flat_keys = capture.keys.permute(0, 2, 1, 3, 4).reshape(layers, heads, rows * length, dim)
            keys = flat_keys[:, :, tokens].permute(0, 2, 1, 3, 4)
            cls_rows = cls_patch_attention(capture.queries, capture.keys).to(capture.keys.dtype)
            flat_attention = cls_rows.permute(0, 2, 1, 3).reshape(layers, heads, -1)
            attention = flat_attention[:, :, patches].permute(0, 2, 1, 3)
        return VisionCapture(hidden=hidden, keys=keys, attention=attention, has_cls=False, layout=layout)

    # ---------------------------------------------------------------- LLM side
    def _assembly(self, compression: CompressionOutput, layout: AnyresLayout):
        cached = getattr(layout, "_assembly", None)
        if cached is not None and cached[0] is compression.positions and cached[1] is compression.mask:
            return cached[2]
        result = assemble(layout, compression.positions, compression.mask)
        layout._assembly = (compression.positions, compression.mask, result)
        return result

    def visual_inputs(self, compression: CompressionOutput, layout: Any = None):
        """Each sample's stock-shaped sequence: projected tokens with ``image_newline`` where a
        newline stands, its mask, each token's offset in the stock span and the span [B]."""
        if not isinstance(layout, AnyresLayout):
            raise ValueError("LLaVA-NeXT visual inputs need the batch's layout (from encode_images)")
        assembly = self._assembly(compression, layout)
        tokens = assembly.gather(self.project(compression.tokens), self.image_newline)
        return tokens, assembly.mask, assembly.offsets, layout.spans(tokens.device)

    def sample_compression(self, compression: CompressionOutput, layout: Any = None) -> CompressionOutput:
        """One row per sample: ``tokens`` [B, W, C] the sample's visual sequence before the projector
        (zeros where a newline stands), ``mask`` every token the LLM receives (newlines included, so
        ``num_tokens`` is the image's visual token count), ``positions`` the offsets in the stock
        span; ``num_dominant``, ``num_contextual`` and ``expected_tokens`` summed over the views
        (the method's counts: crop tokens in the letterbox and newlines not subtracted or added);
        ``kept_indices``, ``cluster_map`` and ``scores`` per view, view-major over the batch's
        ``pixel_values`` views (patch ``v * N + i`` of view ``v``; cluster ids made distinct across
        views). With ``together`` rows only tokens, mask and positions change."""
        if not isinstance(layout, AnyresLayout):
            return compression
        assembly = self._assembly(compression, layout)
        tokens = assembly.gather(compression.tokens, None)
        if layout.mode == "together":
            return dataclasses.replace(compression, tokens=tokens, mask=assembly.mask, positions=assembly.offsets)
        rows = layout.rows(compression.mask.device)
        views = getattr(layout, "pixel_views", max(layout.views))
        return views_per_sample(compression, rows["sample"], rows["view"], layout.batch_size, views,
                                tokens, assembly.mask, assembly.offsets)

    # ------------------------------------------------------------ stock inputs
    stock_input_names = ("image_sizes",)

    def _pack_anyres_inputs(self, input_ids: torch.Tensor, keep: torch.Tensor, has_image: torch.Tensor,
                            pixel_values: Any, sizes: list[tuple[int, int]],
                            question_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Left-pack the kept ids; one [max views, 3, S, S] pixel row and one (height, width) per
        sample (zeros for text-only samples)."""
        batch_size = input_ids.shape[0]
        flags = has_image.tolist()
        images = _as_views(pixel_values)
        if len(images) != sum(flags) or len(sizes) != len(images):
            raise ValueError(
                f"{sum(flags)} samples hold an image placeholder, but {len(images)} images and "
                f"{len(sizes)} image_sizes were given"
            )
        size = self.tower_image_size
        most = max([image.shape[0] for image in images], default=1)
        pixels = torch.zeros(batch_size, most, 3, size, size, device=self.device)
        image_sizes = torch.zeros(batch_size, 2, dtype=torch.long)
        rows = [row for row, flag in enumerate(flags) if flag]
        for row, image, hw in zip(rows, images, sizes):
            needed = self.tiling(hw).views
            if image.shape[0] < needed:
                raise ValueError(f"an image of size {tuple(hw)} needs {needed} views, pixel_values hold {image.shape[0]}")
            pixels[row, :needed] = image[:needed].to(self.device)
            image_sizes[row] = torch.tensor(hw)
        ids, attention, question = pack_stock_ids(input_ids, keep, self.pad_token_id, self.image_token_id, question_mask)
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "question_mask": question,
            "pixel_values": pixels,
            "image_sizes": image_sizes,
            "has_image": has_image,
        }


def _as_views(pixel_values: Any) -> list[torch.Tensor]:
    """Images as a list of [views, 3, S, S] (from a [N, V, 3, S, S] tensor, a list of [V, 3, S, S]
    or [1, V, 3, S, S] tensors, or a single [V, 3, S, S] image)."""
    if pixel_values is None:
        return []
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.dim() == 4:
            return [pixel_values]
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel values must be [N, views, 3, H, W], got {tuple(pixel_values.shape)}")
        return list(pixel_values.unbind(0))
    images = []
    for image in pixel_values:
        images.extend(_as_views(image) if image.dim() == 5 else [image])
    return images


class AnyresImages(ImagePreprocessor):
    """PIL images -> ``pixel_values`` [B, max views, 3, S, S] and ``image_sizes`` [B, 2] (height,
    width), zeros for text-only samples; ``views`` turns one image list into per-image views."""

    def __init__(self, image_processor, image_size: int, views) -> None:
        super().__init__(image_processor, pad_to_square=False)
        self.image_size = image_size
        self.views = views

    def batch_fields(self, images: list, has_image: torch.Tensor) -> dict[str, torch.Tensor]:
        batch_size = len(has_image)
        per_image = self.views(images) if images else []
        most = max([v.shape[0] for v in per_image], default=1)
        pixel_values = torch.zeros(batch_size, most, 3, self.image_size, self.image_size)
        image_sizes = torch.zeros(batch_size, 2, dtype=torch.long)
        rows = has_image.nonzero().flatten().tolist()
        for row, image, views in zip(rows, images, per_image):
            pixel_values[row, : views.shape[0]] = views.to(pixel_values.dtype)
            image_sizes[row] = torch.tensor([image.height, image.width])
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}
