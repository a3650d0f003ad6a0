"""``llava-next-original``: LLaVA-1.6 in the original LLaVA code (PyPI ``llava-torch``; liuhaotian/llava-v1.6-*):
the same ``LlavaLlamaForCausalLM`` as LLaVA-1.5, with ``image_aspect_ratio: anyres`` and
``mm_patch_merge_type: spatial_unpad`` in its config.

A family of its own rather than a branch of ``llava``: the model class and loading are LLaVA-1.5's
(inherited from :class:`~sparsezip_pl.models.families.llava.OriginalLlavaBackend`), but everything
compression touches (views, crop grids, unpadding, newlines, ``image_sizes``, budgets per view) is
LLaVA-NeXT's and shared with the transformers family ``llava-next``
(:class:`~sparsezip_pl.models.families._anyres.AnyresFamily`); LLaVA-1.5's path stays as it was.
``llava`` keeps the checkpoints whose ``image_aspect_ratio`` is not ``anyres``; this family the others.

The stock conventions kept: images preprocessed by ``llava.mm_utils.process_anyres_image`` (base view
squashed to S x S, crops of the image letterboxed in black to the best pinpoint), ``image_sizes`` as
PIL's ``image.size`` = (width, height) in the stock ``generate`` (the batches here hold (height,
width) like transformers'), the grid and the unpadding by the original code's own
``get_anyres_image_grid_shape`` and ``unpad_image``.
"""

from __future__ import annotations

import ast
import os

import torch

from sparsezip_pl.models.anyres import Tiling, max_views, unpad_window
from sparsezip_pl.models.batching import BatchBuilder, ConversationFormat, Tokenization
from sparsezip_pl.models.families._anyres import AnyresFamily, AnyresImages
from sparsezip_pl.models.families.base import BatchMode, register_family
from sparsezip_pl.models.families.llava import IMAGE_TOKEN_INDEX, OriginalLlavaBackend


def _pinpoints(value) -> list[tuple[int, int]]:
    """The config's ``image_grid_pinpoints`` (a list, or its string form) as (width, height) pairs."""
    points = ast.literal_eval(value) if isinstance(value, str) else value
    return [(int(w), int(h)) for w, h in points]


def is_anyres(config) -> bool:
    """Whether an original-code config describes LLaVA-1.6's anyres images."""
    return getattr(config, "image_aspect_ratio", None) == "anyres"


@register_family("llava-next-original", aliases=("llava-next-llava", "llava_next_original"))
class OriginalLlavaNextBackend(AnyresFamily, OriginalLlavaBackend):
    """The original code's LLaVA-1.6: ``vicuna_v1`` template, -200 placeholder, anyres views."""

    def __init__(self, model, tokenizer=None, image_processor=None, conv_template: str = "vicuna_v1",
                 compress_views: str = "per_view", newlines: str = "occupied") -> None:
        config = model.config
        if not is_anyres(config):
            raise ValueError(
                f"image_aspect_ratio {getattr(config, 'image_aspect_ratio', None)!r}: this family is LLaVA-1.6's "
                "'anyres' (LLaVA-1.5 checkpoints belong to the 'llava' family)"
            )
        merge = getattr(config, "mm_patch_merge_type", "flat")
        if merge != "spatial_unpad":
            raise NotImplementedError(
                f"mm_patch_merge_type {merge!r}: only LLaVA-1.6's 'spatial_unpad' (crops stitched, unpadded, "
                "one image_newline per row) is supported"
            )
        super().__init__(model, tokenizer, image_processor, conv_template)
        self.configure_anyres(compress_views, newlines)
        crop = getattr(self.image_processor, "crop_size", None)
        crop = crop["height"] if crop is not None else self.tower_image_size
        if crop != self.tower_image_size:
            raise ValueError(f"the image processor crops {crop} px, the vision tower takes {self.tower_image_size} px")

    @classmethod
    def matches(cls, model) -> bool:
        original = hasattr(model, "prepare_inputs_labels_for_multimodal") or type(model).__module__.startswith("llava.")
        return original and is_anyres(getattr(model, "config", None))

    @classmethod
    def patch_count(cls, model_path: str | os.PathLike) -> int:
        """The patches an image can have at most (p^2 x max views: 576 x 5 = 2880 for LLaVA-1.6):
        the bound of a per-image budget."""
        config, vision = cls.read_configs(model_path)
        if config.get("image_aspect_ratio") != "anyres" or "image_grid_pinpoints" not in config:
            raise ValueError(f"{model_path}: not an anyres (LLaVA-1.6) checkpoint of the original code")
        pinpoints = [(h, w) for w, h in _pinpoints(config["image_grid_pinpoints"])]
        return (vision.image_size // vision.patch_size) ** 2 * max_views(pinpoints, vision.image_size)

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", vision_tower: str | os.PathLike | None = None,
                        conv_template: str = "vicuna_v1", compress_views: str = "per_view",
                        newlines: str = "occupied", **kwargs) -> OriginalLlavaNextBackend:
        """Load as ``llava.model.builder.load_pretrained_model`` does (see the ``llava`` family)."""
        family = super().from_pretrained(model_path, dtype=dtype, device=device, vision_tower=vision_tower,
                                         conv_template=conv_template, **kwargs)
        family.configure_anyres(compress_views, newlines)
        return family

    # ------------------------------------------------------------ anyres
    @property
    def pinpoints_hw(self) -> list[tuple[int, int]]:
        return [(h, w) for w, h in _pinpoints(self.model.config.image_grid_pinpoints)]

    def stock_tiling(self, size: tuple[int, int]) -> Tiling:
        """The original code's ``get_anyres_image_grid_shape`` and ``unpad_image`` (both take
        (width, height)) on an image of (height, width) ``size``."""
        from llava.mm_utils import get_anyres_image_grid_shape
        from llava.model.llava_arch import unpad_image

        height, width = size
        grid_w, grid_h = get_anyres_image_grid_shape((width, height), self.model.config.image_grid_pinpoints,
                                                     self.tower_image_size)
        window = unpad_window(lambda t: unpad_image(t, (width, height)), grid_h * self.side, grid_w * self.side)
        return Tiling(1 + grid_h * grid_w, (grid_h, grid_w), window)

    # ------------------------------------------------------------ stock inputs
    def batch_from_stock_inputs(self, input_ids, attention_mask, images, image_sizes=None, **extra):
        """One -200 placeholder per image; ``images`` as ``process_images`` gives them (a list of
        [views, 3, S, S], or one [N, views, 3, S, S] tensor) and ``image_sizes`` as the stock
        ``generate`` takes them: PIL's ``image.size`` = (width, height) per image."""
        input_ids = input_ids.to(self.device)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        placeholders = ((input_ids == IMAGE_TOKEN_INDEX) & real).sum(1)
        if bool((placeholders > 1).any()):
            raise NotImplementedError("more than one image per sample is not supported")
        has_image = placeholders == 1
        if image_sizes is None and bool(has_image.any()):
            raise ValueError("LLaVA-1.6's generate needs image_sizes=[image.size for each image] (width, height)")
        sizes = [] if image_sizes is None else [(int(h), int(w)) for w, h in image_sizes]
        return self._pack_anyres_inputs(input_ids, real, has_image, images, sizes, extra.get("question_mask"))

    def batch_builder(self, mode: BatchMode, max_length: int | None = None) -> BatchBuilder:
        if self.tokenizer is None or self.image_processor is None:
            raise ValueError("batch_builder needs the tokenizer and image processor (load with load_family)")
        return BatchBuilder(
            mode,
            ConversationFormat(self.conv_template),
            Tokenization(self.tokenizer, self.image_token_id, split_on_marker=True),
            AnyresImages(self.image_processor, self.tower_image_size,
                         _OriginalViews(self.image_processor, self.model.config.image_grid_pinpoints)),
            pad_token_id=self.pad_token_id,
            eos_token=self.tokenizer.eos_token,
            max_length=max_length,
        )


class _OriginalViews:
    """``llava.mm_utils.process_anyres_image`` of each image ([views, 3, S, S])."""

    def __init__(self, image_processor, pinpoints) -> None:
        self.image_processor = image_processor
        self.pinpoints = pinpoints

    def __call__(self, images: list) -> list[torch.Tensor]:
        from llava.mm_utils import process_anyres_image

        return [process_anyres_image(image, self.image_processor, self.pinpoints) for image in images]
