"""``llava-next``: transformers' ``LlavaNextForConditionalGeneration`` with its ``LlavaNextProcessor``
(llava-hf/llava-v1.6-vicuna-7b-hf, -mistral-7b-hf, ..., or a folder of the same layout).

Images are anyres views (a base view and the crops of the best pinpoint resolution); the options
``compress_views`` (``per_view`` | ``together``) and ``newlines`` (``occupied`` | ``all`` |
``none``) say how they are compressed and how ``image_newline`` tokens are kept: see
:mod:`sparsezip_pl.models.families._anyres` and :mod:`sparsezip_pl.models.anyres`. With method
``none`` the LLM receives exactly the stock sequence.
"""

from __future__ import annotations

import os

import torch

from sparsezip_pl.models.anyres import Tiling, max_views, unpad_window
from sparsezip_pl.models.batching import BatchBuilder
from sparsezip_pl.models.families._anyres import AnyresFamily, AnyresImages
from sparsezip_pl.models.families._vl_common import single_image_runs
from sparsezip_pl.models.families.base import BatchMode, register_family
from sparsezip_pl.models.families.llava_hf import HFLlavaBackend
from sparsezip_pl.models.loading import freeze, is_offline, resolve_pretrained, torch_dtype


@register_family("llava-next", aliases=("llava-next-hf", "llava_next_hf"))
class HFLlavaNextBackend(AnyresFamily, HFLlavaBackend):
    """transformers' LLaVA-NeXT: processor + chat template, ``<image>`` placeholder, anyres views
    (``image_sizes`` as (height, width), transformers' convention)."""

    def __init__(self, model, tokenizer=None, image_processor=None, processor=None,
                 compress_views: str = "per_view", newlines: str = "occupied") -> None:
        super().__init__(model, tokenizer, image_processor, processor)
        self.configure_anyres(compress_views, newlines)

    @classmethod
    def matches(cls, model) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "llava_next"

    @classmethod
    def patch_count(cls, model_path: str | os.PathLike) -> int:
        """The patches an image can have at most (p^2 x max views: 576 x 5 = 2880 for LLaVA-1.6):
        the bound of a per-image budget."""
        from transformers import AutoConfig

        path = resolve_pretrained(model_path, "LLaVA-NeXT checkpoint (transformers)")
        config = AutoConfig.from_pretrained(path, local_files_only=is_offline())
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 * max_views(config.image_grid_pinpoints, vision.image_size)

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        compress_views: str = "per_view",
        newlines: str = "occupied",
        **kwargs,
    ) -> HFLlavaNextBackend:
        """Load as ``LlavaNextForConditionalGeneration.from_pretrained`` does (``dtype="auto"``: the
        checkpoint's own dtype on a GPU, float16 for llava-hf/llava-v1.6-*-hf; float32 on a CPU)."""
        from transformers import AutoProcessor, LlavaNextForConditionalGeneration

        path = resolve_pretrained(model_path, "LLaVA-NeXT checkpoint (transformers)")
        offline = is_offline()
        device = torch.device(device)
        if device.type != "cpu":
            kwargs.setdefault("device_map", {"": device})
        if dtype == "auto":
            dtype = "auto" if device.type != "cpu" else torch.float32
        model = LlavaNextForConditionalGeneration.from_pretrained(
            path, dtype=dtype if dtype == "auto" else torch_dtype(dtype), local_files_only=offline, **kwargs
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=offline)
        return cls(freeze(model.to(device)), processor=processor, compress_views=compress_views, newlines=newlines)

    # ------------------------------------------------------------ anyres
    @property
    def pinpoints_hw(self) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in self.model.config.image_grid_pinpoints]

    def stock_tiling(self, size: tuple[int, int]) -> Tiling:
        """transformers' own functions: ``get_anyres_image_grid_shape``, ``image_size_to_num_patches``
        and ``unpad_image`` (on a map of indices)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        pinpoints = self.model.config.image_grid_pinpoints
        grid_h, grid_w = get_anyres_image_grid_shape(list(size), pinpoints, self.tower_image_size)
        views = image_size_to_num_patches(list(size), pinpoints, self.tower_image_size)
        if views != 1 + grid_h * grid_w:
            raise ValueError(f"image of size {size}: {views} views for a {grid_h}x{grid_w} crop grid")
        window = unpad_window(lambda t: unpad_image(t, list(size)), grid_h * self.side, grid_w * self.side)
        return Tiling(views, (grid_h, grid_w), window)

    # ------------------------------------------------------------ stock inputs
    def batch_from_stock_inputs(self, input_ids, attention_mask, images, image_sizes=None, **extra):
        """The processor wrote each image's stock number of placeholders; the first of each run
        stands for it. ``image_sizes`` (the processor's, (height, width)) are required."""
        if image_sizes is None and images is not None:
            raise ValueError("LLaVA-NeXT's generate needs image_sizes (the processor's output) beside pixel_values")
        input_ids = input_ids.to(self.device)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        is_image, first, run = single_image_runs(input_ids, real, self.image_token_id)
        sizes = [] if image_sizes is None else [tuple(int(v) for v in size) for size in torch.as_tensor(image_sizes).tolist()]
        has_image = run > 0
        counts = run[has_image].tolist()
        expected = [self.stock_tokens(size) for size in sizes]
        if len(counts) == len(expected) and counts != expected:
            raise ValueError(
                f"each image needs its stock number of {self.image_token_id} placeholders: found {counts}, "
                f"the image sizes {sizes} give {expected}"
            )
        return self._pack_anyres_inputs(input_ids, real & (~is_image | first), has_image, images, sizes,
                                        extra.get("question_mask"))

    def batch_builder(self, mode: BatchMode, max_length: int | None = None) -> BatchBuilder:
        views = AnyresImages(self.image_processor, self.tower_image_size, _ProcessorViews(self.image_processor))
        return self.chat_template_builder(mode, max_length, views)


class _ProcessorViews:
    """The stock image processor's views of each image ([views, 3, S, S], zero views dropped)."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, images: list) -> list[torch.Tensor]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        out = self.image_processor(images=images, return_tensors="pt")
        processor = self.image_processor
        crop = processor.crop_size
        size = crop["height"] if isinstance(crop, dict) else crop.height
        return [
            pixels[: image_size_to_num_patches(hw.tolist(), processor.image_grid_pinpoints, size)]
            for pixels, hw in zip(out["pixel_values"], out["image_sizes"])
        ]
