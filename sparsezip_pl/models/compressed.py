"""A frozen LLaVA (either family) with a trainable SparseZip compressor between its tower and its LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsezip_pl.compress import SparseZipCompressor
from sparsezip_pl.compress.baselines import compress_none
from sparsezip_pl.compress.config import CompressionOutput, SparseZipConfig, VisionCapture
from sparsezip_pl.models.backend import LlavaBackend
from sparsezip_pl.models.capture import encode_with_capture
from sparsezip_pl.models.splice import SplicedInputs, splice_visual_tokens


@dataclass
class CompressedLlavaOutput:
    """The LLM's output on the spliced sequence, and how the images were compressed.

    ``labels``, ``attention_mask``, ``position_ids`` and ``visual_mask`` are those of the spliced
    sequence (aligned with ``logits``), not of the input batch.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    labels: torch.Tensor | None
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    visual_mask: torch.Tensor
    compression: CompressionOutput


class CompressedLlava(nn.Module):
    """``backend``'s frozen LLaVA whose image placeholders receive SparseZip-compressed visual tokens.

    Per batch: the tower runs up to its feature layer while hooks capture the scoring layers'
    CLS queries and keys; the compressor turns each image into its own number of tokens (the
    question's token embeddings reach it for text-aware scoring); the projector maps them into
    the LLM; each sample's placeholder is replaced by exactly its real tokens. Only the
    compressor has trainable parameters. ``compressor`` replaces the default
    ``SparseZipCompressor(config, ...)``, e.g. for experiments with other token selectors.
    """

    def __init__(
        self, backend: LlavaBackend, config: SparseZipConfig | None = None, compressor: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.backend = backend
        self.llava = backend.model
        self.config = config or SparseZipConfig()
        if compressor is None:
            compressor = SparseZipCompressor(
                self.config,
                backend.vision_num_heads,
                backend.vision_head_dim,
                text_dim=backend.text_hidden_size,
                num_patches=backend.num_patches,
            )
        self.compressor = compressor.to(backend.device)

    def train(self, mode: bool = True) -> CompressedLlava:
        super().train(mode)
        self.llava.eval()  # the frozen LLaVA never runs dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.compressor.parameters() if p.requires_grad]

    def _compressor_dtype(self) -> torch.dtype:
        param = next(iter(self.compressor.parameters()), None)
        return torch.float32 if param is None or not param.is_floating_point() else param.dtype

    # ------------------------------------------------------------- pipeline
    def compress(
        self,
        pixel_values: torch.Tensor,
        method: str | None = None,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> CompressionOutput:
        """Images [B, 3, H, W] -> compressed visual features (tower width, before the projector)."""
        method = self._resolve_method(method)
        stock = method == "none" and self.config.method != "none"
        scoring_layers = [] if stock else list(self.config.layers)
        with torch.no_grad():
            capture = encode_with_capture(
                self.backend.vision_tower,
                self.backend.pixels_for_tower(pixel_values),
                self.backend.feature_layer,
                scoring_layers,
            )
        if stock:
            return compress_none(capture.hidden)
        dtype = self._compressor_dtype()
        capture = VisionCapture(capture.hidden.to(dtype), capture.queries.to(dtype), capture.keys.to(dtype))
        if text_embeds is not None:
            text_embeds = text_embeds.detach().to(dtype)
        return self.compressor(capture, text_embeds=text_embeds, text_mask=text_mask)

    def _resolve_method(self, method: str | None) -> str:
        if method is None:
            return self.config.method
        if method not in ("none", self.config.method):
            raise ValueError(f"method override must be 'none' or {self.config.method!r}, got {method!r}")
        return method

    def prepare_inputs(
        self, batch: dict[str, Any], method: str | None = None
    ) -> tuple[SplicedInputs, CompressionOutput]:
        """Batch -> what the LLM receives (spliced embeddings, mask, positions, labels) and the compression."""
        input_ids = batch["input_ids"].to(self.backend.device)
        question_mask = batch.get("question_mask")
        question_mask = None if question_mask is None else question_mask.to(input_ids.device).bool()
        with torch.no_grad():
            text_embeds = self.backend.embed_tokens(input_ids)
        compression = self.compress(batch["pixel_values"], method, text_embeds, question_mask)
        return self.splice(batch, compression, text_embeds), compression

    def splice(
        self, batch: dict[str, Any], compression: CompressionOutput, text_embeds: torch.Tensor | None = None
    ) -> SplicedInputs:
        """Project the compressed tokens and put each sample's real ones in place of its placeholder."""
        device = self.backend.device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch.get("attention_mask")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        has_image = batch.get("has_image")
        labels = batch.get("labels")
        if text_embeds is None:
            with torch.no_grad():
                text_embeds = self.backend.embed_tokens(input_ids)
        original = self.config.visual_positions == "original"
        return splice_visual_tokens(
            text_embeds,
            input_ids,
            attention_mask,
            self.backend.image_token_id,
            self.backend.project(compression.tokens),
            compression.mask,
            has_image=None if has_image is None else has_image.to(device),
            labels=None if labels is None else labels.to(device),
            visual_positions=compression.positions if original else None,
            image_span=self.backend.num_patches if original else None,
        )

    def forward(self, batch: dict[str, Any], method: str | None = None) -> CompressedLlavaOutput:
        """Logits (and loss when the batch has ``labels``) of the LLM on the compressed sequence.

        ``method="none"`` runs the stock path (all patches), e.g. for a distillation teacher.
        """
        spliced, compression = self.prepare_inputs(batch, method)
        output = self.backend.language_model(
            spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids, labels=spliced.labels
        )
        return CompressedLlavaOutput(
            logits=output.logits,
            loss=getattr(output, "loss", None),
            labels=spliced.labels,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            visual_mask=spliced.visual_mask,
            compression=compression,
        )

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], max_new_tokens: int = 16, method: str | None = None, **kwargs
    ) -> tuple[torch.Tensor, CompressionOutput]:
        """Greedy decoding (by default) after the compressed prefill: new ids [B, new] and the compression."""
        spliced, compression = self.prepare_inputs(batch, method)
        if self.config.visual_positions == "original":
            # Decoding continues from the last prompt position + 1 (transformers' generate extends
            # given position ids); the default, from the attention mask, would count real tokens.
            kwargs.setdefault("position_ids", spliced.position_ids)
        generated = self.backend.generate(
            spliced.inputs_embeds, spliced.attention_mask, max_new_tokens=max_new_tokens, **kwargs
        )
        return generated, compression
