"""``qwen2.5-vl``: transformers' ``Qwen2_5_VLForConditionalGeneration`` (Qwen/Qwen2.5-VL-3B/7B/72B-Instruct,
or a folder of the same layout).

What the methods see. Qwen's ViT (2-D rotary positions, window attention, no CLS token) ends in a
2x2 patch merger that maps four neighbouring patches into one token of the LLM's width: the merger
is Qwen's projector, and its output is what gets compressed. A capture row is one image's merged
tokens in raster order of its merged grid (``grid`` = (H/28, W/28)); ``project`` is the identity.
Images of different sizes give rows of different lengths: the rows are zero-padded to the longest,
and :meth:`compress_rows` runs the method once per distinct merged grid (a loop over grid shapes,
not over images) and combines the outputs, one row per sample.

The substitute for the CLS attention (methods that rank by it: sparsezip, visionzip): in the
scoring layer (``hidden_states`` indexing of the ViT blocks: -1 is the last block, a
full-attention block in the real models; -2 a window-attention block), the attention each patch
receives within the attention pattern that layer uses (its window, or the whole image in the
full-attention blocks ``fullatt_block_indexes``), rotary embedding applied, summed over the
queries of its window and divided by the image's patch count; a merged token gets the sum over its
four patches (so an image's values sum to 1 per head). Keys for merging and scoring: that layer's
keys (the fused ``qkv`` projection, before the rotary embedding), averaged over the four patches of
each merged token. The ViT runs in window-permuted order; both are put back in raster order.
Methods that read no attention (none, random, pool, divprune, the LLM-side ones) work unchanged.

Positions (M-RoPE): the LLM receives position ids [3, B, L] (t, h, w). A kept visual token carries
the (t, h, w) it had in the stock sequence (a merged token: that of the patch its
``CompressionOutput.positions`` names), i.e. the columns of ``get_rope_index`` for that token, and
the text before the image keeps its stock positions. ``visual_positions``:

* ``original``: the text after the image keeps its stock positions too (it starts at the image's
  start + max(grid rows, grid cols), as if every token were there);
* ``contiguous`` (the project's default): the text after the image continues from the largest
  position a kept token carries + 1 (dropped trailing rows or columns leave no gap).

Both keep every kept token's stock 3-D position (a 1-D renumbering would destroy the grid that
M-RoPE encodes); with every token kept both equal the stock positions exactly. Position ids (and
an attention mask) are always passed to the model, and ``model.model.rope_deltas`` is reset, so
no state of an earlier stock call leaks in.

Budgets: an int is tokens per image; a fraction is of each image's own merged-token count (methods
that resolve it per row, e.g. visionzip; sparsezip resolves a fraction once and refuses it here).
One image per sample; videos are not supported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsezip_pl.compress.types import CompressionOutput, VisionCapture
from sparsezip_pl.models.capture import scoring_layer_position
from sparsezip_pl.models.families._vl_common import (
    TINY_TEXTS,
    FamilyBatchBuilder,
    PerSampleImages,
    RowGroups,
    VideoProcessorStub,
    allow_missing_video_processor,
    build_qwen2_tokenizer,
    compress_grouped,
    image_token_types,
    load_processor,
    pad_rows,
    read_config_json,
    received_attention,
    single_image_runs,
)
from sparsezip_pl.models.families.base import BatchMode, ModelFamily, pack_stock_ids, register_family
from sparsezip_pl.models.loading import freeze, is_offline, resolve_pretrained, torch_dtype

#: Qwen2VLImageProcessor's default max_pixels (28 * 28 * 1280: 1280 merged tokens) when none is known
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


@dataclass(frozen=True)
class QwenLayout:
    """The images of a batch: the sample of each capture row and its merged grid (rows, cols)."""

    batch_size: int
    image_sample: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(r * c for r, c in self.grids)


class QwenImages(PerSampleImages):
    """``pixel_values`` [B, P, 3*2*14*14] (each sample's patch rows, zero-padded; the processor's
    flat rows of all images split by image) and ``image_grid_thw`` [B, 3] (zeros for text-only)."""

    def batch_fields(self, images: list, has_image: torch.Tensor) -> dict[str, torch.Tensor]:
        processor = self.image_processor
        features = 3 * processor.temporal_patch_size * processor.patch_size ** 2
        batch_size = has_image.shape[0]
        grid = torch.zeros(batch_size, 3, dtype=torch.long)
        if not images:
            return {"pixel_values": torch.zeros(batch_size, 0, features), "image_grid_thw": grid}
        out = self.processed(images)
        thw = out["image_grid_thw"].long()
        rows, _ = pad_rows(out["pixel_values"], thw.prod(-1).tolist())
        pixel_values = rows.new_zeros(batch_size, rows.shape[1], features)
        pixel_values[has_image] = rows
        grid[has_image] = thw
        return {"pixel_values": pixel_values, "image_grid_thw": grid}


@register_family("qwen2.5-vl", aliases=("qwen2_5_vl", "qwen2.5_vl", "qwen2_5-vl"))
class Qwen25VLFamily(ModelFamily):
    """Qwen2.5-VL: merged (2x2) ViT tokens compressed, M-RoPE positions kept (see the module docstring)."""

    has_cls = False
    stock_input_names = ("image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
                         "second_per_grid_ts")

    def __init__(self, model, tokenizer=None, image_processor=None, processor=None) -> None:
        # Not ModelFamily.__init__: Qwen's ViT config has other field names than CLIP's.
        self.processor = processor
        if processor is not None:
            tokenizer = tokenizer or processor.tokenizer
            image_processor = image_processor or processor.image_processor
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.visual = model.model.visual
        self.vision_tower = self.visual
        self.projector = self.visual.merger  # Qwen's projector; its output is what the methods receive
        config = self.visual.config
        self.merge = config.spatial_merge_size
        self.vision_num_heads: int = config.num_heads
        self.vision_head_dim: int = config.hidden_size // config.num_heads
        self.vision_num_layers: int = config.depth
        self.text_hidden_size: int = model.get_input_embeddings().embedding_dim
        #: the width of the tokens the methods receive (the merger's output, the LLM's width)
        self.vision_hidden_size: int = config.out_hidden_size
        #: the most merged tokens one image can give (the processor's max_pixels), an upper bound
        self.num_patches: int = self._max_tokens(image_processor, config.patch_size, self.merge)

    # ------------------------------------------------------------- loading
    @classmethod
    def matches(cls, model) -> bool:
        config = getattr(model, "config", None)
        return (getattr(config, "model_type", None) == "qwen2_5_vl" and hasattr(model, "lm_head")
                and hasattr(getattr(model, "model", None), "visual"))

    @staticmethod
    def _max_tokens(image_processor, patch_size: int, merge: int) -> int:
        max_pixels = None
        if image_processor is not None:
            size = getattr(image_processor, "size", None)
            max_pixels = getattr(size, "longest_edge", None)
            if max_pixels is None and isinstance(size, dict):
                max_pixels = size.get("longest_edge")
            max_pixels = max_pixels or getattr(image_processor, "max_pixels", None)
        return int(max_pixels or DEFAULT_MAX_PIXELS) // (patch_size * merge) ** 2

    @classmethod
    def patch_count(cls, model_path: str | os.PathLike) -> int:
        """The most merged tokens one image can give (max_pixels / 28^2), from the processor's config."""
        path = resolve_pretrained(model_path, "Qwen2.5-VL checkpoint")
        config = read_config_json(path, ("processor_config.json", "preprocessor_config.json")) or {}
        config = config.get("image_processor", config)
        size = config.get("size") or {}
        max_pixels = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or DEFAULT_MAX_PIXELS
        model_config = read_config_json(path, ("config.json",)) or {}
        vision = model_config.get("vision_config", {})
        return int(max_pixels) // (vision.get("patch_size", 14) * vision.get("spatial_merge_size", 2)) ** 2

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", **kwargs) -> Qwen25VLFamily:
        """Load as ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` does (``dtype="auto"``: the
        checkpoint's dtype, bfloat16 for the published ones, on a GPU; float32 on a CPU), with its
        processor (images only where torchvision is missing)."""
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        path = resolve_pretrained(model_path, "Qwen2.5-VL checkpoint")
        device = torch.device(device)
        if device.type != "cpu":
            kwargs.setdefault("device_map", {"": device})
        if dtype == "auto":
            dtype = "auto" if device.type != "cpu" else torch.float32
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype if dtype == "auto" else torch_dtype(dtype), local_files_only=is_offline(), **kwargs
        )
        processor = load_processor(path, Qwen2_5_VLProcessor)
        return cls(freeze(model.to(device)), processor=processor)

    # --------------------------------------------------------------- config
    @property
    def feature_layer(self) -> int:
        return -1  # the last ViT block, through the merger

    @property
    def select_strategy(self) -> str:
        return "full"

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def method_num_patches(self) -> int | None:
        return None  # rows differ with the image's size

    @property
    def max_stock_tokens(self) -> int:
        return self.num_patches

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The identity: the merger (Qwen's projector) already ran."""
        return features

    @property
    def projector_dtype(self) -> torch.dtype:
        return self.dtype

    # ----------------------------------------------------------- the vision side
    def encode_images(self, batch: dict[str, Any], scoring_layers: list[int]) -> VisionCapture:
        """The images' merged tokens as rows [I, n_max, D] (raster order, zero-padded), with the
        substitute attention [S, I, h, n_max] and merged keys [S, I, h, n_max, d] of the scoring layers."""
        pixel_values, grid = batch["pixel_values"], batch.get("image_grid_thw")
        if grid is None:
            raise ValueError("a qwen2.5-vl batch needs image_grid_thw [B, 3] (the family's batch_builder makes it)")
        grid_cpu = grid.detach().to("cpu", torch.long)
        has_image = batch.get("has_image")
        has_image = grid_cpu.prod(-1) > 0 if has_image is None else has_image.detach().to("cpu", torch.bool)
        if bool((grid_cpu[has_image].prod(-1) <= 0).any()):
            raise ValueError("image_grid_thw has an empty grid for a sample with an image")
        if bool((grid_cpu[has_image][:, 0] != 1).any()):
            raise NotImplementedError("image_grid_thw with t != 1 (videos) is not supported")
        samples = has_image.nonzero().flatten().tolist()
        thw = grid_cpu[has_image]
        patches = thw.prod(-1).tolist()
        grids = tuple((h // self.merge, w // self.merge) for _, h, w in thw.tolist())
        layout = QwenLayout(has_image.shape[0], tuple(samples), grids)
        dtype, device = self.dtype, self.device
        heads, head_dim = self.vision_num_heads, self.vision_head_dim
        counts = list(layout.counts)
        if not samples:
            hidden = torch.zeros(0, 0, self.vision_hidden_size, device=device, dtype=dtype)
            empty = hidden.new_zeros(len(scoring_layers), 0, heads, 0)
            return VisionCapture(hidden=hidden, attention=empty if scoring_layers else None,
                                 keys=empty[..., None].expand(-1, -1, -1, -1, head_dim) if scoring_layers else None,
                                 has_cls=False, sample_index=torch.zeros(0, dtype=torch.long, device=device),
                                 layout=layout)
        if pixel_values.dim() != 3 or pixel_values.shape[1] < max(patches):
            raise ValueError(
                f"pixel_values must be [B, P, features] with P >= the largest image's {max(patches)} patch rows, "
                f"got {tuple(pixel_values.shape)}"
            )
        pixels = pixel_values.to(device)[torch.tensor(samples, device=device)]
        valid = torch.arange(pixels.shape[1], device=device)[None] < torch.tensor(patches, device=device)[:, None]
        flat = pixels[valid]
        thw_device = thw.to(device)
        positions = [scoring_layer_position(index, self.vision_num_layers) for index in scoring_layers]
        records: list[dict[str, Any]] = [{} for _ in positions]
        handles = [self.visual.blocks[p].attn.register_forward_pre_hook(_record_attention_inputs(r), with_kwargs=True)
                   for p, r in zip(positions, records)]
        try:
            features = self.model.model.get_image_features(flat, thw_device)
        finally:
            for handle in handles:
                handle.remove()
        hidden, _ = pad_rows(torch.cat(list(features.pooler_output)), counts)
        attention = keys = None
        if positions:
            window_index = _window_index(self.visual, thw_device)
            scored = [self._scores(self.visual.blocks[p].attn, r, window_index, patches)
                      for p, r in zip(positions, records)]
            attention = torch.stack([pad_rows(a, counts)[0].permute(0, 2, 1) for a, _ in scored])
            keys = torch.stack([pad_rows(k, counts)[0].permute(0, 2, 1, 3) for _, k in scored])
        return VisionCapture(hidden=hidden, keys=keys, attention=attention, has_cls=False,
                             sample_index=torch.tensor(samples, device=device), layout=layout)

    def _scores(self, attention_module: nn.Module, record: dict[str, Any], window_index: torch.Tensor,
                patches: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(substitute attention [units, h], keys [units, h, d]) per merged token, raster order."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        x, cu_seqlens, (cos, sin) = record["x"], record["cu_seqlens"], record["position_embeddings"]
        seq = x.shape[0]
        q, k, _ = attention_module.qkv(x).view(seq, 3, self.vision_num_heads, -1).unbind(1)
        q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, cos, sin)
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        q_groups, valid = pad_rows(q_rot, lengths)
        k_groups, _ = pad_rows(k_rot, lengths)
        received = received_attention(q_groups, k_groups, valid, attention_module.scaling)
        received = received.transpose(1, 2)[valid]  # [seq, h], window order
        # Windows never cross images, and each image's patches are contiguous in window order.
        per_image = torch.tensor(patches, device=x.device, dtype=torch.float32)
        received = received / per_image.repeat_interleave(torch.tensor(patches, device=x.device))[:, None]
        unit = self.merge ** 2
        restore = torch.argsort(window_index)
        attention = received.view(-1, unit, self.vision_num_heads).sum(1)[restore]
        keys = k.float().view(-1, unit, self.vision_num_heads, self.vision_head_dim).mean(1)[restore]
        return attention, keys

    def compress_rows(self, method, capture: VisionCapture) -> CompressionOutput:
        """One call per distinct merged grid; the output has one row per sample (text-only: empty)."""
        layout: QwenLayout = capture.layout
        return compress_grouped(method, capture, RowGroups(layout.counts, layout.grids, layout.image_sample,
                                                           layout.batch_size))

    def visual_inputs(self, compression: CompressionOutput, layout: Any = None):
        """Tokens (already in the LLM's width), mask, offsets (each token's raster index in its image's
        merged grid) and each sample's stock token count [B] (0 without an image)."""
        span = torch.zeros(compression.tokens.shape[0], dtype=torch.long, device=compression.tokens.device)
        if layout is not None and layout.image_sample:
            index = torch.tensor(layout.image_sample, device=span.device)
            span[index] = torch.tensor(layout.counts, device=span.device)
        return compression.tokens, compression.mask, compression.positions, span

    # ----------------------------------------------------------- the LLM side
    def position_ids(self, spliced, compression: CompressionOutput, layout: Any, batch: dict[str, Any],
                     visual_positions: str) -> torch.Tensor:
        """M-RoPE position ids [3, B, L] of the spliced sequence (see the module docstring)."""
        real = spliced.attention_mask.bool()
        visual = spliced.visual_mask.bool()
        contiguous = ((real.long().cumsum(1) - 1).clamp(min=0)) * real
        rows = contiguous.unsqueeze(0).expand(3, -1, -1).clone()
        if layout is None or not layout.image_sample or compression.tokens.shape[1] == 0:
            return rows
        device = visual.device
        cols = torch.ones(visual.shape[0], dtype=torch.long, device=device)
        extent = torch.zeros_like(cols)
        index = torch.tensor(layout.image_sample, device=device)
        cols[index] = torch.tensor([c for _, c in layout.grids], device=device)
        extent[index] = torch.tensor([max(r, c) for r, c in layout.grids], device=device)
        # The k-th visual slot of a sample holds the k-th real token of its compression row.
        mask = compression.mask.to(device)
        order = torch.argsort((~mask).long(), dim=1, stable=True)
        packed = compression.positions.to(device).gather(1, order)
        rank = (visual.long().cumsum(1) - 1).clamp(0, packed.shape[1] - 1)
        cell = packed.gather(1, rank)
        r, c = cell // cols[:, None], cell % cols[:, None]
        start = torch.where(visual, contiguous, torch.iinfo(torch.long).max).min(1).values
        start = torch.where(visual.any(1), start, 0)[:, None]
        num_visual = visual.sum(1, keepdim=True)
        if visual_positions == "contiguous":
            extent = (torch.where(visual, torch.maximum(r, c), -1).max(1).values + 1).clamp(min=0)
        after = visual.long().cumsum(1).bool() & ~visual
        text = torch.where(after, contiguous - num_visual + extent[:, None], contiguous)
        rows[0] = torch.where(visual, start, text)
        rows[1] = torch.where(visual, start + r, text)
        rows[2] = torch.where(visual, start + c, text)
        return rows * real

    def language_model(self, inputs_embeds, attention_mask, position_ids=None, labels=None, **kwargs):
        self.model.model.rope_deltas = None  # only used without position ids; never a stale one
        return super().language_model(inputs_embeds, attention_mask, position_ids, labels=labels, **kwargs)

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("position_ids") is None:
            raise ValueError("qwen2.5-vl: generate needs the M-RoPE position_ids [3, B, L] of the prompt")
        self.model.model.rope_deltas = None
        return super().generate(inputs_embeds, attention_mask, **kwargs)

    # -------------------------------------------------- the stock model's own inputs (api.py)
    def batch_from_stock_inputs(self, input_ids, attention_mask, images, image_grid_thw=None, mm_token_type_ids=None,
                                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, **extra):
        """The processor's inputs (each image's run of ``<|image_pad|>`` ids, flat ``pixel_values``,
        ``image_grid_thw``) -> the family's batch: one placeholder per image, per-sample pixel rows."""
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise NotImplementedError("qwen2.5-vl: videos are not supported")
        device = self.device
        input_ids = input_ids.to(device)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        is_image, first, run = single_image_runs(input_ids, real, self.image_token_id)
        has_image = run > 0
        batch_size = input_ids.shape[0]
        features = 3 * self.visual.config.temporal_patch_size * self.visual.config.patch_size ** 2
        pixel_values = torch.zeros(batch_size, 0, features, device=device)
        grid = torch.zeros(batch_size, 3, dtype=torch.long, device=device)
        if bool(has_image.any()):
            if images is None or image_grid_thw is None:
                raise ValueError("input_ids hold image placeholders but pixel_values or image_grid_thw is missing")
            thw = image_grid_thw.to(device).long()
            if thw.shape[0] != int(has_image.sum()):
                raise ValueError(f"image_grid_thw has {thw.shape[0]} images for {int(has_image.sum())} samples with one")
            expected = thw.prod(-1) // self.merge ** 2
            if bool((run[has_image] != expected).any()):
                raise ValueError(f"each image needs image_grid_thw.prod() / {self.merge ** 2} consecutive "
                                 f"{self.image_token_id} placeholders; found {run[has_image].tolist()}, "
                                 f"expected {expected.tolist()}")
            rows, _ = pad_rows(images.to(device), thw.prod(-1).tolist())
            pixel_values = rows.new_zeros(batch_size, rows.shape[1], features)
            pixel_values[has_image] = rows
            grid[has_image] = thw
        ids, attention, question = pack_stock_ids(input_ids, real & (~is_image | first), self.pad_token_id,
                                                  self.image_token_id, extra.get("question_mask"))
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "question_mask": question,
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            "has_image": has_image,
        }

    def batch_builder(self, mode: BatchMode, max_length: int | None = None) -> FamilyBatchBuilder:
        return self.chat_template_builder(mode, max_length, QwenImages(self.image_processor, pad_to_square=False),
                                          FamilyBatchBuilder, extra_fields=image_token_types(self.image_token_id))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, vision={self.vision_num_layers}x"
                f"{self.vision_num_heads}x{self.vision_head_dim}, merged_width={self.vision_hidden_size}, "
                f"device={self.device}, dtype={self.dtype})")

    # ---------------------------------------------------------------- tiny checkpoints
    @classmethod
    def build_tiny(cls, folder: str | os.PathLike, seed: int = 0, max_tokens: int = 64,
                   initializer_range: float = 0.6) -> str:
        """A tiny random-weight Qwen2.5-VL in the layout of Qwen/Qwen2.5-VL-7B-Instruct, saved to
        ``folder`` (config, weights, tokenizer, processor with its chat template; the video
        processor's entry without torchvision): ViT depth 4, width 32, 2 heads, window 56 px (2x2
        merged units), full attention in blocks 1 and 3; LLM width 64, 2 layers, M-RoPE sections
        [2, 3, 3]; images of 4 to ``max_tokens`` merged tokens. Seeded."""
        from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, \
            Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        folder = str(folder)
        tokenizer = build_qwen2_tokenizer(TINY_TEXTS, QWEN_SPECIAL_TOKENS)
        ids = {name: tokenizer.convert_tokens_to_ids(name)
               for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
        config = Qwen2_5_VLConfig(
            vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[1, 3], tokens_per_second=2, hidden_act="silu",
                               initializer_range=initializer_range),
            text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             rms_norm_eps=1e-6, initializer_range=initializer_range,
                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                             bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True, initializer_range=initializer_range,
        )
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                                   eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id])
        image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 4 * 28 * 28, "longest_edge": max_tokens * 28 * 28},
                                                   patch_size=14, temporal_patch_size=2, merge_size=2)
        video = VideoProcessorStub(video_processor_type="Qwen2VLVideoProcessor",
                                   size={"shortest_edge": 4 * 28 * 28, "longest_edge": max_tokens * 28 * 28},
                                   patch_size=14, temporal_patch_size=2, merge_size=2,
                                   image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std),
                                   do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, resample=3)
        with allow_missing_video_processor():
            processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                            chat_template=QWEN_CHAT_TEMPLATE)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder


def _record_attention_inputs(record: dict[str, Any]):
    """A forward pre-hook on a ViT block's attention keeping its input, ``cu_seqlens`` and rotary embedding."""

    def hook(module, args, kwargs):
        record["x"] = args[0] if args else kwargs["hidden_states"]
        record["cu_seqlens"] = kwargs["cu_seqlens"]
        record["position_embeddings"] = kwargs["position_embeddings"]

    return hook


def _window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The ViT's permutation of merged units into window order (as its forward computes it)."""
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)
    return index.to(grid_thw.device)


QWEN_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template Qwen/Qwen2.5-VL-7B-Instruct ships (system line, then each image as
# <|vision_start|><|image_pad|><|vision_end|> before the text).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
