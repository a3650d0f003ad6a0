"""The two-line API: wrap an already loaded LLaVA (either family) and call ``generate`` as before.

    model = sparsezip(model, method="visionzip", dominant=54, contextual=10)
    output_ids = model.generate(**inputs, max_new_tokens=32)

``inputs`` are what the stock model takes: for transformers' Llava the processor's output
(``input_ids`` with the expanded ``<image>`` placeholders, ``attention_mask``, ``pixel_values``);
for the original llava code ``input_ids`` with one ``IMAGE_TOKEN_INDEX`` (-200) per image and
``images=``. The return value has the stock model's layout (prompt + new ids for transformers,
new ids only for llava). Nothing global is patched; ``unwrap(model)`` gives the stock model back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsezip_pl.compress.config import SparseZipConfig
from sparsezip_pl.models.backend import backend_from_model
from sparsezip_pl.models.compressed import CompressedLlava, CompressedLlavaOutput
from sparsezip_pl.models.splice import left_pack


def build_config(
    base: SparseZipConfig | None = None,
    method: str | None = None,
    dominant: int | None = None,
    contextual: int | None = None,
    **fields: Any,
) -> SparseZipConfig:
    """``base`` (default ``SparseZipConfig()``) with fields replaced; nested ones (``alphas``,
    ``dynk``, ``merging``) accept dicts of their own fields, ``contextual`` sets ``merging.contextual_num``."""
    base = base or SparseZipConfig()
    updates: dict[str, Any] = {}
    for name, value in fields.items():
        current = getattr(base, name, None)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = dataclasses.replace(current, **value)
        updates[name] = value
    if method is not None:
        updates["method"] = method
    if dominant is not None:
        updates["dominant"] = dominant
    if contextual is not None:
        merging = updates.get("merging", base.merging)
        updates["merging"] = dataclasses.replace(merging, contextual_num=contextual)
    return dataclasses.replace(base, **updates)


class SparseZipModel(nn.Module):
    """A stock LLaVA with SparseZip between its vision tower and its LLM.

    ``generate`` and ``forward`` take the stock model's inputs; any other attribute is the
    stock model's. The stock model itself is not modified.
    """

    def __init__(self, model: nn.Module, config: SparseZipConfig, compressor: nn.Module | None = None) -> None:
        super().__init__()
        self.sparsezip = CompressedLlava(backend_from_model(model), config, compressor)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "sparsezip" not in modules:
                raise
            return getattr(modules["sparsezip"].llava, name)

    @property
    def compressor(self) -> nn.Module:
        return self.sparsezip.compressor

    @property
    def family(self) -> str:
        return self.sparsezip.backend.family

    # ------------------------------------------------------------ inputs
    def _batch_from_stock_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | list | None,
    ) -> dict[str, torch.Tensor]:
        """Stock inputs -> our batch: one placeholder per image, left padding, one pixel row per sample."""
        backend = self.sparsezip.backend
        image_id = backend.image_token_id
        device = backend.device
        input_ids = input_ids.to(device)
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            real = attention_mask.to(device).bool()
        is_image = (input_ids == image_id) & real
        if backend.family == "hf":
            # The processor wrote N placeholders per image; keep the first of each run.
            first = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
            runs = first.sum(1)
            if bool((runs > 1).any()):
                raise NotImplementedError("more than one image per sample is not supported")
            if bool(((is_image.sum(1) != backend.num_patches) & (runs == 1)).any()):
                raise ValueError(f"each image needs {backend.num_patches} consecutive {image_id} placeholders")
            keep = real & (~is_image | first)
            has_image = runs == 1
        else:
            keep = real
            has_image = is_image.any(1)
        ids, attention, _ = left_pack(input_ids, keep, backend.pad_token_id)

        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack([p if p.dim() == 3 else p.squeeze(0) for p in pixel_values])
        if pixel_values is None:
            if bool(has_image.any()):
                raise ValueError("input_ids hold image placeholders but no images were given")
            size = backend.vision_tower.config.image_size
            pixel_values = torch.zeros(batch_size, 3, size, size, device=device)
        elif backend.family == "hf" and pixel_values.shape[0] != batch_size:
            # transformers' processor gives one pixel row per image, not per sample.
            full = pixel_values.new_zeros(batch_size, *pixel_values.shape[1:])
            full[has_image] = pixel_values
            pixel_values = full
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "question_mask": attention.bool() & (ids != image_id),
            "pixel_values": pixel_values,
            "has_image": has_image,
        }

    def _stock_inputs(self, input_ids, inputs, images, pixel_values):
        input_ids = input_ids if input_ids is not None else inputs
        if input_ids is None:
            raise ValueError("input_ids are required")
        return input_ids, pixel_values if pixel_values is not None else images

    # --------------------------------------------------------------- calls
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        image_sizes=None,
        **kwargs,
    ):
        """The stock ``generate`` with compressed visual tokens (greedy unless told otherwise).

        ``image_sizes`` is accepted and ignored: only 'anyres' models (LLaVA-1.6) use it.
        """
        input_ids, pixels = self._stock_inputs(input_ids, inputs, images, pixel_values)
        batch = self._batch_from_stock_inputs(input_ids, attention_mask, pixels)
        generated, _ = self.sparsezip.generate(batch, **kwargs)
        if self.family == "llava":
            return generated
        sequences = generated if isinstance(generated, torch.Tensor) else generated.sequences
        sequences = torch.cat([input_ids.to(sequences.device), sequences], dim=1)
        if isinstance(generated, torch.Tensor):
            return sequences
        generated.sequences = sequences
        return generated

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        **kwargs,
    ) -> CompressedLlavaOutput:
        """Logits on the compressed sequence (its own length; see ``CompressedLlavaOutput``)."""
        input_ids, pixels = self._stock_inputs(input_ids, inputs, images, pixel_values)
        batch = self._batch_from_stock_inputs(input_ids, attention_mask, pixels)
        if labels is not None:
            raise NotImplementedError("labels: build batches with backend.batch_builder('train') and CompressedLlava")
        return self.sparsezip(batch)


def sparsezip(
    model: nn.Module,
    method: str = "sparsezip",
    dominant: int | None = None,
    contextual: int | None = None,
    config: SparseZipConfig | None = None,
    compressor: nn.Module | None = None,
    **more_config: Any,
) -> SparseZipModel:
    """Wrap a loaded LLaVA (transformers' ``LlavaForConditionalGeneration`` or the original
    ``LlavaLlamaForCausalLM``) so that its ``generate`` uses compressed visual tokens.

    ``method``: ``sparsezip``, ``visionzip`` or ``none``; ``dominant`` / ``contextual``: the token
    budget (``contextual`` is ``merging.contextual_num``); ``more_config``: any other
    :class:`SparseZipConfig` field (nested ones as dicts), applied over ``config``.
    """
    if isinstance(model, SparseZipModel):
        raise TypeError("the model is already wrapped; unwrap(model) first")
    return SparseZipModel(model, build_config(config, method, dominant, contextual, **more_config), compressor)


def unwrap(model: nn.Module) -> nn.Module:
    """The stock model inside a :func:`sparsezip` wrapper (the model itself when not wrapped)."""
    return model.sparsezip.llava if isinstance(model, SparseZipModel) else model
