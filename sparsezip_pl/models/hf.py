"""Backend for transformers' ``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-*-hf)."""

from __future__ import annotations

import os

import torch

from sparsezip_pl.models.backend import (
    BatchMode,
    LlavaBackend,
    freeze,
    is_offline,
    resolve_pretrained,
    torch_dtype,
)
from sparsezip_pl.models.batching import BatchBuilder, ChatTemplateFormat, ImagePreprocessor, Tokenization


class HFLlavaBackend(LlavaBackend):
    """transformers' Llava: processor + chat template, ``<image>`` placeholder, ``vision_feature_*`` config.

    ``processor`` is the model's ``LlavaProcessor`` (its tokenizer, image processor and chat
    template are used); it may be None when the backend only serves already built inputs.
    """

    family = "hf"

    def __init__(self, model, tokenizer=None, image_processor=None, processor=None) -> None:
        self.processor = processor
        if processor is not None:
            tokenizer = tokenizer or processor.tokenizer
            image_processor = image_processor or processor.image_processor
        super().__init__(model, tokenizer, image_processor)
        if not isinstance(model.config.vision_feature_layer, int):
            raise NotImplementedError("several vision feature layers (concatenated features) are not supported")

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

    def batch_builder(self, mode: BatchMode, max_length: int | None = None) -> BatchBuilder:
        if self.tokenizer is None or self.image_processor is None:
            raise ValueError("batch_builder needs the model's processor (load with load_backend)")
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the processor has no chat template")
        return BatchBuilder(
            mode,
            ChatTemplateFormat(self.tokenizer, template),
            Tokenization(self.tokenizer, self.image_token_id, split_on_marker=False),
            ImagePreprocessor(self.image_processor, pad_to_square=False),
            pad_token_id=self.pad_token_id,
            eos_token=self.tokenizer.eos_token,
            max_length=max_length,
        )
