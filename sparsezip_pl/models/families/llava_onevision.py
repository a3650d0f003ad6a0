"""``llava-onevision``: transformers' ``LlavaOnevisionForConditionalGeneration``
(llava-hf/llava-onevision-qwen2-0.5b/7b/72b-ov-hf, or a folder of the same layout).

The stock image path: a SigLIP tower (no CLS token) sees every *view* of an image (the base view,
the whole image resized to the tower's size, then the crops of the ``anyres`` grid the image is
resized and padded to); the feature layer is ``hidden_states[-1]`` (before the post-layernorm),
every patch is kept ("full"). After the projector the crops are stitched into one map, the
letterbox padding is cut off ("unpad"), a map larger than 9 views (``anyres_max_9``) is shrunk
bilinearly, and one ``image_newline`` token ends each map row. The LLM reads: the base view's p^2
tokens, then rows x (cols + newline).

Compression. The methods see pre-projector SigLIP patches (as for LLaVA-1.5), in one of two row
layouts (``view_mode``):

* ``image`` (default): one row per image, its views' patches one after another (base view first,
  then the crops in raster order), N = views x p^2; the budget is tokens per image (the project's
  convention), a fraction is of those N patches. Images with different view counts give rows of
  different lengths: the method runs once per distinct length (:meth:`compress_rows`).
* ``view``: one row per view (N = p^2, ``sample_index`` names each row's sample), the budget is
  tokens per view, the convention of the published LLaVA-NeXT code of VisionZip, VisPruner and
  CDPruner (a 64-token budget over 5 views sends 320 tokens). Per-sample figures (records,
  budgets, the budget penalty) sum the views of each image (:meth:`sample_compression`).

Reassembly (:meth:`visual_inputs`): an image whose tokens are all its patches, in order (method
``none``) is laid out exactly as the stock does (unpad, shrink, newlines; ``pack_image_features``).
Otherwise: the base view's tokens first, in the method's order; then the crop tokens in raster
order of the stitched crop map, each at the patch its ``CompressionOutput.positions`` names (a
merged token: its members' centroid); tokens on the letterbox padding are dropped (the stock drops
those patches); the stock shrink is not applied (the method did the reducing); newline tokens
(``newlines``): ``rows`` (default) one after each map row that holds a kept token, ``all`` one per
map row (VisPruner's and CDPruner's NeXT code keep every newline), ``none`` no newline (VisionZip's
NeXT code). Newlines come on top of the budget. For ``visual_positions="original"`` each token sits
at the offset its patch (or its row's newline) has in the stock sequence.

The substitute for the CLS attention (see :mod:`._vl_common`): per view, the mean over the view's
queries of the softmax attention each patch receives in the scoring layer; keys: that layer's keys.
SigLIP's feature layer is the last one, so the scoring layer that pairs with it as LLaVA-1.5's -2
does is -1 (the configs set it). One image per sample; videos and multi-image samples are not
supported.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sparsezip_pl.compress.types import CompressionOutput, VisionCapture
from sparsezip_pl.models.anyres import views_per_sample
from sparsezip_pl.models.capture import find_vision_encoder, num_layers_to_run, scoring_layer_position
from sparsezip_pl.models.families._vl_common import (
    TINY_TEXTS,
    FamilyBatchBuilder,
    PerSampleImages,
    RowGroups,
    VideoProcessorStub,
    allow_missing_video_processor,
    build_qwen2_tokenizer,
    compress_grouped,
    load_processor,
    pad_rows,
    read_config_json,
    received_attention,
    single_image_runs,
)
from sparsezip_pl.models.families.base import BatchMode, ModelFamily, is_stock, pack_stock_ids, register_family
from sparsezip_pl.models.loading import freeze, is_offline, resolve_pretrained, torch_dtype

ViewMode = Literal["image", "view"]
Newlines = Literal["rows", "all", "none"]
VIEW_MODES = ("image", "view")
NEWLINES = ("rows", "all", "none")


def max_views(pinpoints, image_size: int) -> int:
    """The most views an image can have: the base view plus the largest crop grid."""
    return 1 + max((h // image_size) * (w // image_size) for h, w in pinpoints)


@dataclass(frozen=True)
class ImageGeometry:
    """One image's stock layout, in patches: ``views`` (1 + crops), the crop grid, the unpadded
    part of the stitched crop map (first row / col, rows, cols) and the map after the anyres_max
    shrink (rows, cols; the unpadded size when not shrunk)."""

    views: int
    crop_rows: int
    crop_cols: int
    top: int
    left: int
    rows: int
    cols: int
    shrunk_rows: int
    shrunk_cols: int
    side: int  # p, patches per view side

    @property
    def stock_tokens(self) -> int:
        return self.side ** 2 + self.shrunk_rows * (self.shrunk_cols + 1)


def image_geometry(size: tuple[int, int], pinpoints, image_size: int, side: int, max_num: int) -> ImageGeometry:
    """The stock layout of an image of ``size`` (H, W), as ``pack_image_features`` computes it."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    height, width = int(size[0]), int(size[1])
    crop_rows, crop_cols = get_anyres_image_grid_shape((height, width), pinpoints, image_size)
    map_rows, map_cols = crop_rows * side, crop_cols * side
    top = left = 0
    rows, cols = map_rows, map_cols
    # unpad_image, same arithmetic.
    if width / height > map_cols / map_rows:
        new_rows = int(round(height * (map_cols / width), 7))
        top = (map_rows - new_rows) // 2
        rows = map_rows - 2 * top
    else:
        new_cols = int(round(width * (map_rows / height), 7))
        left = (map_cols - new_cols) // 2
        cols = map_cols - 2 * left
    ratio = math.sqrt(rows * cols / (max_num * side ** 2))
    shrunk = (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)
    return ImageGeometry(1 + crop_rows * crop_cols, crop_rows, crop_cols, top, left, rows, cols, *shrunk, side)


@dataclass(frozen=True)
class OneVisionLayout:
    """A batch's images: the sample of each image, their geometry, and the capture's row layout."""

    mode: str
    batch_size: int
    image_sample: tuple[int, ...]
    images: tuple[ImageGeometry, ...]
    image_sizes: tuple[tuple[int, int], ...]
    #: strides of the tower's output [views, N, C] (the stock projects that very tensor; a matmul's
    #: rounding in half precision can depend on its input's memory layout)
    view_strides: tuple[int, ...] | None = None

    @property
    def row_image(self) -> list[int]:
        """The image of each capture row (``view`` mode: one row per view)."""
        if self.mode == "image":
            return list(range(len(self.images)))
        return [i for i, g in enumerate(self.images) for _ in range(g.views)]


class OneVisionImages(PerSampleImages):
    """``pixel_values`` [B, max views, 3, S, S] (zeros for text-only samples and missing views),
    ``image_sizes`` [B, 2] (H, W; zeros for text-only) and ``batch_num_images`` [B] (1 or 0)."""

    def batch_fields(self, images: list, has_image: torch.Tensor) -> dict[str, torch.Tensor]:
        batch_size = has_image.shape[0]
        height, width = self.size
        sizes = torch.zeros(batch_size, 2, dtype=torch.long)
        if not images:
            return {"pixel_values": torch.zeros(batch_size, 1, 3, height, width), "image_sizes": sizes,
                    "batch_num_images": has_image.long()}
        out = self.processed(images)
        pixels = out["pixel_values"]
        pixel_values = pixels.new_zeros(batch_size, *pixels.shape[1:])
        pixel_values[has_image] = pixels
        sizes[has_image] = out["image_sizes"].long()
        return {"pixel_values": pixel_values, "image_sizes": sizes, "batch_num_images": has_image.long()}


@register_family("llava-onevision", aliases=("llava_onevision", "onevision"))
class LlavaOnevisionFamily(ModelFamily):
    """LLaVA-OneVision: SigLIP views (no CLS), anyres_max_9, image_newline (see the module docstring).

    ``view_mode``: ``image`` (one row per image, budget per image) or ``view`` (one row per view,
    budget per view); ``newlines``: ``rows``, ``all`` or ``none`` (compressed images only).
    """

    has_cls = False
    stock_input_names = ("image_sizes", "batch_num_images", "pixel_values_videos", "image_sizes_videos")

    def __init__(self, model, tokenizer=None, image_processor=None, processor=None,
                 view_mode: ViewMode = "image", newlines: Newlines = "rows") -> None:
        # Not ModelFamily.__init__: its tower lookup and feature-select check are LLaVA-1.5's (CLIP, "default").
        if view_mode not in VIEW_MODES:
            raise ValueError(f"view_mode must be one of {VIEW_MODES}, got {view_mode!r}")
        if newlines not in NEWLINES:
            raise ValueError(f"newlines must be one of {NEWLINES}, got {newlines!r}")
        self.view_mode = view_mode
        self.newlines = newlines
        self.processor = processor
        if processor is not None:
            tokenizer = tokenizer or processor.tokenizer
            image_processor = image_processor or processor.image_processor
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        inner = model.model
        self.vision_tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.image_newline = inner.image_newline
        config = model.config
        vision = config.vision_config
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError("several vision feature layers (concatenated features) are not supported")
        if config.vision_feature_select_strategy != "full":
            raise NotImplementedError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}: "
                                      "a SigLIP tower (no CLS) uses 'full'")
        aspect = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
        if not aspect.startswith("anyres_max_"):
            raise NotImplementedError(f"vision_aspect_ratio {aspect!r}: only anyres_max_N is supported")
        self.vision_aspect_ratio = aspect
        self.max_num = int(aspect[len("anyres_max_"):])
        self.image_size: int = vision.image_size
        self.side: int = vision.image_size // vision.patch_size
        self.pinpoints = config.image_grid_pinpoints
        self.vision_num_heads: int = vision.num_attention_heads
        self.vision_hidden_size: int = vision.hidden_size
        self.vision_head_dim: int = vision.hidden_size // vision.num_attention_heads
        self.vision_num_layers: int = vision.num_hidden_layers
        #: N of one view (p^2)
        self.num_patches: int = self.side ** 2
        self.text_hidden_size: int = model.get_input_embeddings().embedding_dim

    # ------------------------------------------------------------- loading
    @classmethod
    def matches(cls, model) -> bool:
        config = getattr(model, "config", None)
        return (getattr(config, "model_type", None) == "llava_onevision" and hasattr(model, "lm_head")
                and hasattr(getattr(model, "model", None), "vision_tower"))

    @classmethod
    def patch_count(cls, model_path: str | os.PathLike) -> int:
        """The most patches a method row can hold in the default ``image`` mode (all views of the
        largest crop grid: 37 x 729 for the 7B), from the checkpoint's config."""
        path = resolve_pretrained(model_path, "LLaVA-OneVision checkpoint")
        config = read_config_json(path, ("config.json",)) or {}
        vision = config.get("vision_config", {})
        image_size, patch = vision.get("image_size", 384), vision.get("patch_size", 14)
        pinpoints = config.get("image_grid_pinpoints") or [[image_size, image_size]]
        return max_views(pinpoints, image_size) * (image_size // patch) ** 2

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", view_mode: ViewMode = "image",
                        newlines: Newlines = "rows", **kwargs) -> LlavaOnevisionFamily:
        """Load as ``LlavaOnevisionForConditionalGeneration.from_pretrained`` does (``dtype="auto"``:
        the checkpoint's dtype on a GPU, float16 for the llava-hf ones; float32 on a CPU), with its
        processor (images only where torchvision is missing)."""
        from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

        path = resolve_pretrained(model_path, "LLaVA-OneVision checkpoint")
        device = torch.device(device)
        if device.type != "cpu":
            kwargs.setdefault("device_map", {"": device})
        if dtype == "auto":
            dtype = "auto" if device.type != "cpu" else torch.float32
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=dtype if dtype == "auto" else torch_dtype(dtype), local_files_only=is_offline(), **kwargs
        )
        processor = load_processor(path, LlavaOnevisionProcessor)
        return cls(freeze(model.to(device)), processor=processor, view_mode=view_mode, newlines=newlines)

    # --------------------------------------------------------------- config
    @property
    def feature_layer(self) -> int:
        return self.model.config.vision_feature_layer

    @property
    def select_strategy(self) -> str:
        return self.model.config.vision_feature_select_strategy

    @property
    def image_token_id(self) -> int:
        config = self.model.config
        return getattr(config, "image_token_id", None) or config.image_token_index

    @property
    def method_num_patches(self) -> int | None:
        return self.num_patches if self.view_mode == "view" else None

    @property
    def max_stock_tokens(self) -> int:
        """The base view, the largest unshrunk map (1.1^2 x max_num views) and a newline per row."""
        most_rows = max(h // self.image_size for h, _ in self.pinpoints) * self.side
        return self.side ** 2 + int(1.21 * self.max_num * self.side ** 2) + most_rows

    def max_visual_tokens(self, method) -> int:
        """The most visual tokens an image can send the LLM under ``method``: over the pinpoint
        grids, the method's output for the image's rows (``image``: one row of all views' patches;
        ``view``: one row per view) plus at most one newline per map row. Not capped by the stock
        count: the stock shrinks large maps, a compressed image is not shrunk."""
        output_length = getattr(method, "output_length", None)
        if output_length is None or is_stock(method):
            return self.max_stock_tokens
        p2, bound = self.num_patches, 0
        for height, width in self.pinpoints:
            crops = (height // self.image_size) * (width // self.image_size)
            rows = (height // self.image_size) * self.side
            tokens = output_length((1 + crops) * p2) if self.view_mode == "image" else (1 + crops) * output_length(p2)
            bound = max(bound, tokens + rows)
        return bound

    # ----------------------------------------------------------- the vision side
    def _geometry(self, size) -> ImageGeometry:
        return image_geometry(size, self.pinpoints, self.image_size, self.side, self.max_num)

    def encode_images(self, batch: dict[str, Any], scoring_layers: list[int]) -> VisionCapture:
        """The images' views through SigLIP up to the feature layer, as rows (see ``view_mode``),
        with the substitute attention and keys of the scoring layers."""
        pixel_values, sizes = batch["pixel_values"], batch.get("image_sizes")
        if sizes is None:
            raise ValueError("a llava-onevision batch needs image_sizes [B, 2] (the family's batch_builder makes it)")
        sizes_cpu = sizes.detach().to("cpu", torch.long)
        has_image = batch.get("has_image")
        has_image = sizes_cpu.prod(-1) > 0 if has_image is None else has_image.detach().to("cpu", torch.bool)
        num_images = batch.get("batch_num_images")
        if num_images is not None and bool((num_images.detach().cpu() > 1).any()):
            raise NotImplementedError("llava-onevision: more than one image per sample is not supported")
        samples = has_image.nonzero().flatten().tolist()
        image_sizes = tuple(tuple(s) for s in sizes_cpu[has_image].tolist())
        if any(h <= 0 or w <= 0 for h, w in image_sizes):
            raise ValueError("image_sizes has an empty size for a sample with an image")
        images = tuple(self._geometry(s) for s in image_sizes)
        layout = OneVisionLayout(self.view_mode, has_image.shape[0], tuple(samples), images, image_sizes)
        device, p2 = self.device, self.num_patches
        views = [g.views for g in images]
        if samples and (pixel_values.dim() != 5 or pixel_values.shape[1] < max(views)):
            raise ValueError(f"pixel_values must be [B, views, 3, S, S] with at least {max(views)} views, "
                             f"got {tuple(pixel_values.shape)}")
        if samples:
            pixels = pixel_values.to(device)[torch.tensor(samples, device=device)]
            valid = torch.arange(pixels.shape[1], device=device)[None] < torch.tensor(views, device=device)[:, None]
            hidden, queries, keys = self._run_tower(pixels[valid], scoring_layers)
            layout = dataclasses.replace(layout, view_strides=tuple(hidden.stride()))
        else:
            dtype = next(self.vision_tower.parameters()).dtype
            hidden = torch.zeros(0, p2, self.vision_hidden_size, device=device, dtype=dtype)
            queries = keys = hidden.new_zeros(len(scoring_layers), 0, p2, self.vision_num_heads, self.vision_head_dim)
        attention = key_rows = None
        if scoring_layers:
            # [S, V, h, N]: each view's mean received attention; keys [S, V, h, N, d].
            attention = torch.stack([received_attention(q, k, torch.ones(q.shape[:2], dtype=torch.bool, device=device),
                                                        self.vision_head_dim ** -0.5) / p2
                                     for q, k in zip(queries, keys)])
            key_rows = keys.permute(0, 1, 3, 2, 4)
        if self.view_mode == "view":
            sample_index = torch.tensor([s for s, g in zip(samples, images) for _ in range(g.views)],
                                        dtype=torch.long, device=device)
            return VisionCapture(hidden=hidden, keys=key_rows, attention=attention, has_cls=False,
                                 grid=(self.side, self.side), sample_index=sample_index, layout=layout)
        counts = [v * p2 for v in views]
        rows, _ = pad_rows(hidden.reshape(-1, hidden.shape[-1]), counts)
        if scoring_layers:
            heads, dim = self.vision_num_heads, self.vision_head_dim
            attention = torch.stack([pad_rows(a.permute(0, 2, 1).reshape(-1, heads), counts)[0].permute(0, 2, 1)
                                     for a in attention])
            key_rows = torch.stack([pad_rows(k.permute(0, 2, 1, 3).reshape(-1, heads, dim), counts)[0].permute(0, 2, 1, 3)
                                    for k in key_rows])
        return VisionCapture(hidden=rows, keys=key_rows, attention=attention, has_cls=False,
                             sample_index=torch.tensor(samples, dtype=torch.long, device=device), layout=layout)

    def _run_tower(self, pixels: torch.Tensor, scoring_layers: list[int]):
        """SigLIP up to the feature layer on views [V, 3, S, S]: hidden [V, N, C] and the scoring
        layers' queries and keys [S, V, N, h, d] (q_proj / k_proj outputs: SigLIP applies its
        layernorm before the attention)."""
        parts = find_vision_encoder(self.vision_tower)
        total = len(parts.layers)
        run = num_layers_to_run(self.feature_layer, total)
        positions = [scoring_layer_position(index, total) for index in scoring_layers]
        if any(position >= run for position in positions):
            raise ValueError(f"scoring layers {scoring_layers} must not come after the feature layer "
                             f"{self.feature_layer}: the tower stops there")
        dtype = next(self.vision_tower.parameters()).dtype
        records: list[dict[str, torch.Tensor]] = [{} for _ in positions]
        handles = []
        for record, position in zip(records, positions):
            attention = parts.layers[position].self_attn
            handles.append(attention.q_proj.register_forward_hook(_keep(record, "q")))
            handles.append(attention.k_proj.register_forward_hook(_keep(record, "k")))
        try:
            hidden = parts.pre_norm(parts.embeddings(pixels.to(dtype)))
            for layer in parts.layers[:run]:
                hidden = layer(hidden, None)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
        finally:
            for handle in handles:
                handle.remove()
        views, n, _ = hidden.shape
        shape = (views, n, self.vision_num_heads, self.vision_head_dim)
        queries = torch.stack([r["q"].view(shape) for r in records]) if records else hidden.new_zeros(0, *shape)
        keys = torch.stack([r["k"].view(shape) for r in records]) if records else hidden.new_zeros(0, *shape)
        return hidden, queries, keys

    def compress_rows(self, method, capture: VisionCapture) -> CompressionOutput:
        """``view`` mode: all views at once; ``image`` mode: one call per distinct view count, one
        output row per sample (text-only samples: empty rows)."""
        layout: OneVisionLayout = capture.layout
        if layout.mode == "view":
            rows = capture.hidden.shape[0]
            return compress_grouped(method, capture, RowGroups((self.num_patches,) * rows,
                                                               ((self.side, self.side),) * rows))
        grids = tuple((g.views * self.side, self.side) for g in layout.images)
        return compress_grouped(method, capture, RowGroups(tuple(r * c for r, c in grids), grids,
                                                           layout.image_sample, layout.batch_size))

    # ------------------------------------------------------------ reassembly
    def sample_compression(self, compression: CompressionOutput, layout: Any = None) -> CompressionOutput:
        """One row per sample. ``image`` rows already are (a text-only sample's row is empty);
        ``view`` rows are gathered per sample (:func:`~sparsezip_pl.models.anyres.views_per_sample`):
        the method's counts summed over the image's views, its maps view-major, its tokens the
        views' rows one after another."""
        if not isinstance(layout, OneVisionLayout) or layout.mode != "view":
            return compression
        device = compression.mask.device
        views = [g.views for g in layout.images]
        row_image = torch.tensor(layout.row_image, dtype=torch.long, device=device)
        first_row = torch.tensor([0, *itertools.accumulate(views)][:-1], dtype=torch.long, device=device)
        sample = torch.tensor(layout.image_sample, dtype=torch.long, device=device)[row_image]
        view = torch.arange(len(row_image), device=device) - first_row[row_image]
        return views_per_sample(compression, sample, view, layout.batch_size, max(views, default=1))

    def visual_inputs(self, compression: CompressionOutput, layout: Any = None):
        """Each sample's visual sequence [B, V, D] (projected tokens and newlines), its mask, each
        token's offset in the stock sequence and the stock token count [B] (see the module docstring)."""
        layout: OneVisionLayout = layout
        features = compression.tokens
        device = features.device
        batch_size = layout.batch_size
        if not layout.images:
            empty = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
            return (self.project(features[:0]).new_zeros(batch_size, 0, self.text_hidden_size), empty.bool(), empty,
                    torch.zeros(batch_size, dtype=torch.long, device=device))
        mask = compression.mask.to(device)
        positions = compression.positions.to(device)
        rows, width = mask.shape
        p2 = self.num_patches
        if layout.mode == "view":
            expected = torch.full((rows,), p2, device=device)
        else:
            expected = torch.zeros(rows, dtype=torch.long, device=device)
            expected[torch.tensor(layout.image_sample, device=device)] = torch.tensor(
                [g.views * p2 for g in layout.images], device=device)
        # A row is complete when its tokens are all its patches, in order.
        order = torch.argsort((~mask).long(), dim=1, stable=True)
        packed = positions.gather(1, order)
        slot = torch.arange(width, device=device)
        complete = (mask.sum(1) == expected) & ((packed == slot) | (slot >= expected[:, None])).all(1)
        if bool(complete.all()):
            return self._stock_layout(features, layout)
        return self._compressed_layout(self.project(features), mask, positions, layout)

    def _stock_layout(self, features: torch.Tensor, layout: OneVisionLayout):
        """Every patch kept: the stock packing itself (projector on the views as the stock runs it,
        unpad, anyres_max shrink, newlines)."""
        p2 = self.num_patches
        if layout.mode == "view":
            views = features[:, :p2]
        else:
            rows = features[torch.tensor(layout.image_sample, device=features.device)]
            counts = torch.tensor([g.views * p2 for g in layout.images], device=features.device)
            valid = torch.arange(rows.shape[1], device=features.device)[None] < counts[:, None]
            views = rows[valid].view(-1, p2, rows.shape[-1])
            if layout.view_strides is not None:
                views = torch.empty_strided(views.shape, layout.view_strides, dtype=views.dtype,
                                            device=views.device).copy_(views)
        per_image = list(self.project(views).split([g.views for g in layout.images]))
        sizes = torch.tensor(layout.image_sizes, device=views.device)
        newline = self.image_newline.to(per_image[0].dtype)
        packed, lengths = self.model.model.pack_image_features(per_image, sizes, image_newline=newline,
                                                               vision_aspect_ratio=self.vision_aspect_ratio)
        rows, valid = pad_rows(torch.cat(packed), [g.stock_tokens for g in layout.images])
        return self._per_sample(rows, valid, torch.arange(rows.shape[1], device=rows.device).expand_as(valid), layout)

    def _per_sample(self, rows: torch.Tensor, valid: torch.Tensor, offsets: torch.Tensor, layout: OneVisionLayout):
        device = rows.device
        index = torch.tensor(layout.image_sample, device=device)
        out = rows.new_zeros(layout.batch_size, *rows.shape[1:])
        out[index] = rows
        mask = torch.zeros(layout.batch_size, valid.shape[1], dtype=torch.bool, device=device)
        mask[index] = valid
        off = torch.zeros(layout.batch_size, valid.shape[1], dtype=torch.long, device=device)
        off[index] = offsets * valid
        span = torch.zeros(layout.batch_size, dtype=torch.long, device=device)
        span[index] = torch.tensor([g.stock_tokens for g in layout.images], device=device)
        return out, mask, off, span

    def _compressed_layout(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                           layout: OneVisionLayout):
        """Base-view tokens, then crop tokens in map raster order with newlines (batched over all
        rows: one sort, one scatter; one host sync for the output width, besides the one of the
        completeness check)."""
        device = tokens.device
        rows, width = mask.shape
        side, p2 = self.side, self.num_patches
        images = layout.images

        def per_image(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        crop_cols = per_image([g.crop_cols for g in images])
        top, left = per_image([g.top for g in images]), per_image([g.left for g in images])
        map_rows, map_cols = per_image([g.rows for g in images]), per_image([g.cols for g in images])
        shrunk_rows, shrunk_cols = per_image([g.shrunk_rows for g in images]), per_image([g.shrunk_cols for g in images])
        # The image and view of every slot of every row.
        if layout.mode == "view":
            row_image = per_image(layout.row_image)
            first_row = torch.cumsum(per_image([0] + [g.views for g in images[:-1]]), 0)
            row_view = torch.arange(rows, device=device) - first_row[row_image]
            image = row_image[:, None].expand(rows, width)
            view = row_view[:, None].expand(rows, width)
            cell = positions
            valid = mask
        else:
            sample_image = torch.zeros(rows, dtype=torch.long, device=device)
            sample_image[per_image(layout.image_sample)] = torch.arange(len(images), device=device)
            image = sample_image[:, None].expand(rows, width)
            view, cell = positions // p2, positions % p2
            valid = mask
        image, view, cell, valid = image.reshape(-1), view.reshape(-1), cell.reshape(-1), valid.reshape(-1)
        is_base = view == 0
        crop = (view - 1).clamp(min=0)
        y = (crop // crop_cols[image]) * side + cell // side - top[image]
        x = (crop % crop_cols[image]) * side + cell % side - left[image]
        inside = (y >= 0) & (y < map_rows[image]) & (x >= 0) & (x < map_cols[image])
        keep = valid & (is_base | inside)
        y, x = torch.where(is_base, 0, y), torch.where(is_base, 0, x)
        # One stable sort: by image, base before crops, then the crop map's raster order; dropped last.
        stride = int(max(g.rows for g in images)) + 1, int(max(g.cols for g in images)) + 1
        key = ((image * 2 + (~is_base).long()) * stride[0] + y) * stride[1] + x
        key = torch.where(keep, key, torch.iinfo(torch.long).max)
        order = torch.sort(key, stable=True).indices
        image, is_base, y, x, cell, keep = (t[order] for t in (image, is_base, y, x, cell, keep))
        total = order.shape[0]
        # Rank of each kept token within its image.
        first_of_image = torch.full((len(images),), total, dtype=torch.long, device=device)
        first_of_image = first_of_image.scatter_reduce(0, image[keep], torch.arange(total, device=device)[keep], "amin")
        rank = torch.arange(total, device=device) - first_of_image[image]
        crop_token = keep & ~is_base
        same_row_next = torch.zeros_like(keep)
        same_row_next[:-1] = crop_token[1:] & (image[1:] == image[:-1]) & (y[1:] == y[:-1])
        row_last = crop_token & ~same_row_next
        ones = torch.ones_like(image)
        counts = torch.zeros(len(images), dtype=torch.long, device=device).scatter_add(0, image[keep], ones[keep])
        base_counts = torch.zeros_like(counts).scatter_add(0, image[keep & is_base], ones[keep & is_base])
        if self.newlines == "rows":
            # Newlines before a token: the rows of its image already closed.
            closed = torch.cumsum(row_last.long(), 0) - row_last.long()
            closed_before = torch.zeros_like(counts).scatter_reduce(0, image[keep], closed[keep], "amin",
                                                                   include_self=False)
            token_slot = rank + torch.where(is_base, 0, closed - closed_before[image])
            newline_slot, newline_valid, newline_row, newline_image = token_slot + 1, row_last, y, image
            num_newlines = torch.zeros_like(counts).scatter_add(0, image[row_last], ones[row_last])
        elif self.newlines == "all":
            token_slot = rank + torch.where(is_base, 0, y)
            # Crop tokens per map row -> each row's newline goes right after them.
            most_rows = max(g.rows for g in images)
            row_index = torch.arange(most_rows, device=device)
            per_row = torch.zeros(len(images), most_rows, dtype=torch.long, device=device)
            per_row.index_put_((image[crop_token], y[crop_token]), ones[crop_token], accumulate=True)
            newline_slot = (base_counts[:, None] + per_row.cumsum(1) + row_index[None]).reshape(-1)
            newline_valid = (row_index[None] < map_rows[:, None]).reshape(-1)
            newline_row = row_index.expand(len(images), -1).reshape(-1)
            newline_image = torch.arange(len(images), device=device)[:, None].expand(-1, most_rows).reshape(-1)
            num_newlines = map_rows
        else:
            token_slot = rank
            newline_slot = newline_row = newline_image = torch.zeros(0, dtype=torch.long, device=device)
            newline_valid = torch.zeros(0, dtype=torch.bool, device=device)
            num_newlines = torch.zeros_like(counts)
        longest = int((counts + num_newlines).max())  # the one host sync
        dump = longest
        # Offsets in the stock sequence (original positions): a patch's place in the (shrunk) map.
        shrunk_y = y * shrunk_rows[image] // map_rows[image]
        shrunk_x = x * shrunk_cols[image] // map_cols[image]
        token_offset = torch.where(is_base, cell, p2 + shrunk_y * (shrunk_cols[image] + 1) + shrunk_x)
        newline_offset = (p2 + newline_row * shrunk_rows[newline_image] // map_rows[newline_image]
                          * (shrunk_cols[newline_image] + 1) + shrunk_cols[newline_image])
        # One table: [tokens | newline | zero]; each output slot indexes it.
        flat_tokens = tokens.reshape(rows * width, -1)[order]
        newline_row_index = total
        zero_row = total + 1
        table = torch.cat([flat_tokens, self.image_newline.to(tokens.dtype)[None], tokens.new_zeros(1, tokens.shape[-1])])
        source = torch.full((len(images), longest + 1), zero_row, dtype=torch.long, device=device)
        offsets = torch.zeros(len(images), longest + 1, dtype=torch.long, device=device)
        target = torch.where(keep, token_slot, dump)
        source[image, target] = torch.where(keep, torch.arange(total, device=device), zero_row)
        offsets[image, target] = token_offset
        if newline_valid.numel():
            target = torch.where(newline_valid, newline_slot, dump)
            source[newline_image, target] = torch.where(newline_valid, newline_row_index, zero_row)
            offsets[newline_image, target] = newline_offset
        source, offsets = source[:, :longest], offsets[:, :longest]
        valid = source != zero_row
        return self._per_sample(table[source], valid, offsets, layout)

    # -------------------------------------------------- the stock model's own inputs (api.py)
    def batch_from_stock_inputs(self, input_ids, attention_mask, images, image_sizes=None, batch_num_images=None,
                                pixel_values_videos=None, image_sizes_videos=None, **extra):
        """The processor's inputs (each image's run of ``<image>`` ids, ``pixel_values`` per image,
        ``image_sizes``) -> the family's batch: one placeholder per image, per-sample rows."""
        if pixel_values_videos is not None:
            raise NotImplementedError("llava-onevision: videos are not supported")
        if batch_num_images is not None and bool((torch.as_tensor(batch_num_images) > 1).any()):
            raise NotImplementedError("llava-onevision: more than one image per sample is not supported")
        device = self.device
        input_ids = input_ids.to(device)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        is_image, first, run = single_image_runs(input_ids, real, self.image_token_id)
        has_image = run > 0
        batch_size = input_ids.shape[0]
        sizes = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
        pixel_values = torch.zeros(batch_size, 1, 3, self.image_size, self.image_size, device=device)
        if bool(has_image.any()):
            if images is None or image_sizes is None:
                raise ValueError("input_ids hold image placeholders but pixel_values or image_sizes is missing")
            image_sizes = torch.as_tensor(image_sizes).to(device).long()
            if image_sizes.shape[0] != int(has_image.sum()):
                raise ValueError(f"image_sizes has {image_sizes.shape[0]} images for {int(has_image.sum())} samples with one")
            expected = torch.tensor([self._geometry(s).stock_tokens for s in image_sizes.tolist()], device=device)
            if bool((run[has_image] != expected).any()):
                raise ValueError(f"each image needs its stock number of consecutive {self.image_token_id} placeholders; "
                                 f"found {run[has_image].tolist()}, expected {expected.tolist()}")
            images = images.to(device)
            pixel_values = images.new_zeros(batch_size, *images.shape[1:])
            pixel_values[has_image] = images
            sizes[has_image] = image_sizes
        ids, attention, question = pack_stock_ids(input_ids, real & (~is_image | first), self.pad_token_id,
                                                  self.image_token_id, extra.get("question_mask"))
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "question_mask": question,
            "pixel_values": pixel_values,
            "image_sizes": sizes,
            "batch_num_images": has_image.long(),
            "has_image": has_image,
        }

    def batch_builder(self, mode: BatchMode, max_length: int | None = None) -> FamilyBatchBuilder:
        images = OneVisionImages(self.image_processor, pad_to_square=False)
        return self.chat_template_builder(mode, max_length, images, FamilyBatchBuilder)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, view_mode={self.view_mode}, "
                f"newlines={self.newlines}, vision={self.vision_num_layers}x{self.vision_num_heads}x"
                f"{self.vision_head_dim}, views of {self.side}x{self.side}, device={self.device}, dtype={self.dtype})")

    # ---------------------------------------------------------------- tiny checkpoints
    @classmethod
    def build_tiny(cls, folder: str | os.PathLike, seed: int = 0, image_size: int = 56,
                   initializer_range: float = 0.6) -> str:
        """A tiny random-weight LLaVA-OneVision in the layout of llava-hf/llava-onevision-qwen2-*-ov-hf,
        saved to ``folder`` (config, weights, tokenizer, processor with its chat template; the
        video processor's entry without torchvision): SigLIP 3 layers, width 32, 2 heads, views of
        ``image_size`` px in 14 px patches (4 x 4 at 56), pinpoints ``image_size`` x (1..6) x (1..6)
        as the real 384 x (1..6) x (1..6), anyres_max_9; Qwen2 LLM width 64, 2 layers. Seeded."""
        from transformers import (GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                                  LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2Config,
                                  SiglipVisionConfig)

        folder = str(folder)
        tokenizer = build_qwen2_tokenizer(TINY_TEXTS, ["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
        pinpoints = [[image_size * i, image_size * j] for i in range(1, 7) for j in range(1, 7)]
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                    image_size=image_size, patch_size=14, vision_use_head=False,
                                    hidden_act="gelu_pytorch_tanh")
        text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           tie_word_embeddings=True, initializer_range=initializer_range)
        config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                      video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=pinpoints,
                                      tie_word_embeddings=True)
        config.initializer_range = initializer_range
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                                   eos_token_id=tokenizer.eos_token_id)
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                          image_grid_pinpoints=pinpoints)
        video = VideoProcessorStub(video_processor_type="LlavaOnevisionVideoProcessor",
                                   size={"height": image_size, "width": image_size},
                                   image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std),
                                   do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, resample=3)
        with allow_missing_video_processor():
            processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                                num_image_tokens=(image_size // 14) ** 2,
                                                vision_feature_select_strategy="full",
                                                vision_aspect_ratio="anyres_max_9", chat_template=ONEVISION_CHAT_TEMPLATE)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder


def _keep(record: dict[str, torch.Tensor], name: str):
    def hook(module: nn.Module, args, output: torch.Tensor) -> None:
        record[name] = output

    return hook


# The chat template llava-hf/llava-onevision-qwen2-*-ov-hf ship: <|im_start|>role, the images'
# <image> first, then "\n" + text, <|im_end|>.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
