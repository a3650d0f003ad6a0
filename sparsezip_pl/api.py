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
import os
from typing import Any

import torch
from torch import nn

from sparsezip_pl.compress import CompressorConfig, get_method
from sparsezip_pl.integrations.tuned import TunedCompressor, TunedCompressorError, load_tuned_compressor, model_path_of
from sparsezip_pl.models.compressed import CompressedLlava, CompressedLlavaOutput
from sparsezip_pl.models.families import family_from_model


def build_config(
    base: Any = None,
    method: str | None = None,
    dominant: int | None = None,
    contextual: int | None = None,
    budget: int | float | None = None,
    **fields: Any,
) -> CompressorConfig:
    """``base`` (default ``CompressorConfig()``; a dict or the flat ``SparseZipConfig`` of earlier
    versions work too) with ``method``, ``budget`` and the method's own options replaced.

    ``dominant`` and ``contextual`` are the counts VisionZip takes (``visionzip.dominant``,
    ``visionzip.contextual``) and SparseZip's fixed budget (``sparsezip.dominant``,
    ``sparsezip.merging.contextual_num``). Any other keyword is an option of the chosen method
    (nested ones as dicts), or one of SparseZip's for the flat keywords of earlier versions;
    an unknown one is a TypeError listing the method's options.
    """
    config = CompressorConfig.coerce(base if base is not None else CompressorConfig())
    updates: dict[str, Any] = {}
    if method is not None:
        updates["method"] = method
    if budget is not None:
        updates["budget"] = budget
    config = dataclasses.replace(config, **updates) if updates else config
    spec = get_method(config.method)
    options = config.options()
    names = {f.name for f in dataclasses.fields(options)}
    if dominant is not None:
        fields["dominant"] = dominant
    if contextual is not None:
        if "contextual" in names:
            fields["contextual"] = contextual
        else:
            fields["merging"] = {**fields.get("merging", {}), "contextual_num": contextual}
    if not fields:
        return config
    target = config.method if names >= set(fields) else "sparsezip"
    section = config.options() if target == config.method else config.sparsezip
    allowed = {f.name for f in dataclasses.fields(section)}
    unknown = set(fields) - allowed
    if unknown:
        raise TypeError(f"method {spec.name!r} has no option(s) {sorted(unknown)}; its options: {sorted(names)}")
    updated = {}
    for name, value in fields.items():
        current = getattr(section, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = dataclasses.replace(current, **value)
        updated[name] = value
    return dataclasses.replace(config, **{target: dataclasses.replace(section, **updated)})


class SparseZipModel(nn.Module):
    """A stock model with a token-reduction method between its vision tower and its LLM.

    ``generate`` and ``forward`` take the stock model's inputs; any other attribute is the
    stock model's. The stock model itself is not modified.
    """

    def __init__(self, model: nn.Module, config: Any, compressor: nn.Module | None = None,
                 visual_positions: str | None = None, family_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        family = family_from_model(model, **(family_options or {}))
        self.sparsezip = CompressedLlava(family, config, compressor, visual_positions)

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

    def _batch(self, input_ids, inputs, images, pixel_values, attention_mask, kwargs: dict[str, Any]):
        """The family's batch from the stock inputs (popping the family's extra inputs and
        ``question_mask`` from ``kwargs``)."""
        family = self.sparsezip.backend
        input_ids = input_ids if input_ids is not None else inputs
        if input_ids is None:
            raise ValueError("input_ids are required")
        extra = {name: kwargs.pop(name) for name in (*family.stock_input_names, "question_mask") if name in kwargs}
        pixels = pixel_values if pixel_values is not None else images
        return input_ids, family.batch_from_stock_inputs(input_ids, attention_mask, pixels, **extra)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        **kwargs,
    ):
        """The stock ``generate`` with compressed visual tokens (greedy unless told otherwise); the
        output has the stock layout (prompt + new ids for transformers' models, new ids only for
        the original LLaVA's). ``question_mask=`` (bool, shaped like ``input_ids``) marks the
        question for text-aware methods; without it they read every text token of the prompt."""
        input_ids, batch = self._batch(input_ids, inputs, images, pixel_values, attention_mask, kwargs)
        kwargs.pop("image_sizes", None)  # LLaVA-1.5's stock generate accepts and ignores it too
        generated, _ = self.sparsezip.generate(batch, **kwargs)
        if not self.sparsezip.backend.stock_generate_returns_prompt:
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
        if labels is not None:
            raise NotImplementedError("labels: build batches with the family's batch_builder('train') and CompressedLlava")
        _, batch = self._batch(input_ids, inputs, images, pixel_values, attention_mask, kwargs)
        return self.sparsezip(batch)


def sparsezip(
    model: nn.Module,
    method: str | None = None,
    dominant: int | None = None,
    contextual: int | None = None,
    config: Any = None,
    compressor: nn.Module | str | os.PathLike | None = None,
    budget: int | float | None = None,
    visual_positions: str | None = None,
    family_options: dict[str, Any] | None = None,
    **more_config: Any,
) -> SparseZipModel:
    """Wrap a loaded model of any registered family (its family detected) so that its ``generate``
    uses compressed visual tokens.

    ``method``: a registered method (``sparsezip`` by default; ``none``, ``visionzip``,
    ``divprune``, ``fastv`` ...); ``budget``: visual tokens per image reaching the LLM, or a
    fraction; ``dominant`` / ``contextual``: VisionZip's counts (SparseZip's fixed budget);
    ``more_config``: options of the method (nested ones as dicts), applied over ``config``;
    ``visual_positions``: ``contiguous`` (default) or ``original``; ``family_options``: options of
    the model's family (LLaVA-NeXT: ``{"compress_views": "together", "newlines": "all"}``).

    ``compressor``: a ready method module, or a tuned compressor (a folder written by ``python -m
    sparsezip_pl export``, or its hub id): its settings, weights and visual positions apply;
    ``budget`` and the method's options may still be given over them, another ``method`` may
    not. A model of another architecture than the one it was tuned on is an error, another
    checkpoint of the same shapes a warning.

    Text-aware methods (CDPruner, SparseZip's ``cross_beta`` / ``instruction_beta`` terms) read
    the question from the prompt. The CLI and the lmms-eval model render the prompt themselves and
    read the question alone. Here the prompt is the user's ``input_ids``: pass
    ``question_mask=`` (bool, shaped like ``input_ids``, True on the question's tokens) to
    ``generate`` / ``forward`` for the same selections as the CLI; without it they read every text
    token of the prompt (system prompt and role words included).
    """
    if isinstance(model, SparseZipModel):
        raise TypeError("the model is already wrapped; unwrap(model) first")
    if isinstance(compressor, (str, os.PathLike, TunedCompressor)):
        return _with_tuned(model, compressor, method, dominant, contextual, config, budget, visual_positions,
                           family_options, more_config)
    if method is None and config is None:
        method = "sparsezip"
    built = build_config(config, method, dominant, contextual, budget, **more_config)
    return SparseZipModel(model, built, compressor, visual_positions, family_options)


def _with_tuned(model, source, method, dominant, contextual, config, budget, visual_positions, family_options,
                more_config):
    """:func:`sparsezip` with a tuned compressor (see there)."""
    tuned = load_tuned_compressor(source)
    if config is not None:
        raise TypeError("give either config= or a tuned compressor, not both")
    if method is not None and method != tuned.config.method:
        raise TunedCompressorError(f"method={method!r}, but the tuned compressor {tuned.source} is a "
                                   f"{tuned.config.method!r} compressor")
    built = build_config(tuned.config, None, dominant, contextual, budget, **more_config)
    wrapped = SparseZipModel(model, built, None, visual_positions or tuned.visual_positions, family_options)
    inner = wrapped.sparsezip
    tuned.load_into(inner.compressor, inner.backend.num_patches, inner.backend.family, model_path_of(model))
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The stock model inside a :func:`sparsezip` wrapper (the model itself when not wrapped)."""
    return model.sparsezip.llava if isinstance(model, SparseZipModel) else model
