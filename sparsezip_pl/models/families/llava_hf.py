"""``hf``: transformers' ``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-7b-hf, -13b-hf, or a
folder of the same layout, like the embedded tiny demo model)."""

from __future__ import annotations

import os

import torch

from sparsezip_pl.models.batching import BatchBuilder, ImagePreprocessor
from sparsezip_pl.models.families._vl_common import single_image_runs
from sparsezip_pl.models.families.base import BatchMode, ModelFamily, register_family
from sparsezip_pl.models.loading import freeze, is_offline, resolve_pretrained, torch_dtype


@register_family("hf", aliases=("llava-hf", "llava_hf"))
class HFLlavaBackend(ModelFamily):
    """transformers' Llava: processor + chat template, ``<image>`` placeholder, ``vision_feature_*`` config.

    ``processor`` is the model's ``LlavaProcessor`` (its tokenizer, image processor and chat
    template are used); it may be None when the backend only serves already built inputs.
    """

    def __init__(self, model, tokenizer=None, image_processor=None, processor=None) -> None:
        self.processor = processor
        if processor is not None:
            tokenizer = tokenizer or processor.tokenizer
            image_processor = image_processor or processor.image_processor
        super().__init__(model, tokenizer, image_processor)
        if not isinstance(model.config.vision_feature_layer, int):
            raise NotImplementedError("several vision feature layers (concatenated features) are not supported")

    @classmethod
    def matches(cls, model) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) == "llava"

    @classmethod
    def patch_count(cls, model_path: str | os.PathLike) -> int:
        from transformers import AutoConfig

        path = resolve_pretrained(model_path, "LLaVA checkpoint (transformers)")
        vision = AutoConfig.from_pretrained(path, local_files_only=is_offline()).vision_config
        return (vision.image_size // vision.patch_size) ** 2

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> HFLlavaBackend:
        """Load as ``LlavaForConditionalGeneration.from_pretrained`` does. ``dtype="auto"``: the
        checkpoint's own dtype on a GPU (float16 for llava-hf/llava-1.5-*-hf), which is what
        ``from_pretrained`` gives by default in transformers 5; float32 on a CPU."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        path = resolve_pretrained(model_path, "LLaVA checkpoint (transformers)")
        offline = is_offline()
        device = torch.device(device)
        if device.type != "cpu":
            kwargs.setdefault("device_map", {"": device})
        if dtype == "auto":
            dtype = "auto" if device.type != "cpu" else torch.float32
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype if dtype == "auto" else torch_dtype(dtype), local_files_only=offline, **kwargs
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=offline)
        return cls(freeze(model.to(device)), processor=processor)

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

    def batch_from_stock_inputs(self, input_ids, attention_mask, images, **extra):
        """The processor wrote N placeholders per image; the first of each run stands for it."""
        input_ids = input_ids.to(self.device)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        is_image, first, run = single_image_runs(input_ids, real, self.image_token_id)
        if bool(((run != self.num_patches) & (run > 0)).any()):
            raise ValueError(f"each image needs {self.num_patches} consecutive {self.image_token_id} placeholders")
        return self._pack_stock_inputs(input_ids, real, real & (~is_image | first), run > 0, images,
                                       extra.get("question_mask"))

    def batch_builder(self, mode: BatchMode, max_length: int | None = None) -> BatchBuilder:
        return self.chat_template_builder(mode, max_length, ImagePreprocessor(self.image_processor, pad_to_square=False))
