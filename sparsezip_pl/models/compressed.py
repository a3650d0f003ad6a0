"""A frozen vision-language model (any registered family) with a token-reduction method between its
vision tower and its LLM (vision side) or inside its decoder (LLM side)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sparsezip_pl.compress import CompressorConfig, Geometry, LLMMethod, build_method
from sparsezip_pl.compress.baselines import compress_none
from sparsezip_pl.compress.types import CompressionOutput, VisionCapture
from sparsezip_pl.models.families.base import ModelFamily
from sparsezip_pl.models.llm_hook import llm_pruning
from sparsezip_pl.models.splice import SplicedInputs, splice_visual_tokens

VisualPositions = Literal["contiguous", "original"]
VISUAL_POSITIONS = ("contiguous", "original")


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


def geometry_of(family: ModelFamily) -> Geometry:
    """The vision geometry a method is built for."""
    return Geometry(
        num_heads=family.vision_num_heads,
        head_dim=family.vision_head_dim,
        width=family.vision_hidden_size,
        num_patches=family.method_num_patches,
        has_cls=family.has_cls,
        text_dim=family.text_hidden_size,
    )


def _all_patches(capture: VisionCapture) -> CompressionOutput:
    """The stock path: every patch of every row."""
    return compress_none(capture.patches())


class CompressedLlava(nn.Module):
    """``family``'s frozen model whose image placeholders receive compressed visual tokens.

    Per batch: the family runs the tower up to its feature layer and captures what the method
    reads (the scoring layers' CLS queries and keys, or the family's substitute attention); a
    vision-side method turns each image into its own number of tokens (the question's token
    embeddings reach it for text-aware scoring); the family projects them; each sample's
    placeholder is replaced by exactly its real tokens. An LLM-side method (FastV, PyramidDrop)
    instead prunes inside the decoder at prefill (:mod:`sparsezip_pl.models.llm_hook`). Only the
    method has trainable parameters.

    Args:
        backend: the model family object (``load_family`` / ``family_from_model``).
        config: the compressor (:class:`~sparsezip_pl.compress.CompressorConfig`, a dict, or the
            flat ``SparseZipConfig`` of earlier versions).
        compressor: a ready method module, in place of the one ``config`` names.
        visual_positions: position ids of the kept tokens. ``contiguous`` (the published methods'
            choice): one after another, so the text after the image moves up. ``original``:
            each token keeps the position it had in the stock sequence (a merged token: its
            members' centroid), and the text keeps its positions; the sequence is just as short.
            None: the config's deprecated ``visual_positions``, else ``contiguous``.
    """

    def __init__(
        self,
        backend: ModelFamily,
        config: Any = None,
        compressor: nn.Module | None = None,
        visual_positions: VisualPositions | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.llava = backend.model
        self.config = CompressorConfig.coerce(config if config is not None else CompressorConfig())
        if visual_positions is None:
            visual_positions = self.config.visual_positions or "contiguous"
        if visual_positions not in VISUAL_POSITIONS:
            raise ValueError(f"visual_positions must be one of {VISUAL_POSITIONS}, got {visual_positions!r}")
        self.visual_positions = visual_positions
        self._layout = None  # the family's layout of the last batch's images (tiled families)
        self._stock_span: int | torch.Tensor = 0
        if compressor is None:
            # Initial weights (e.g. a text projection) drawn from a generator of their own: the same
            # config gives the same start wherever and whenever the model is built (one process or several).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(getattr(self.config.options(), "seed", 0))
                compressor = build_method(*backend.method_setup(self.config, geometry_of(backend)))
        self.compressor = compressor.to(backend.device)

    @property
    def llm_side(self) -> bool:
        """Whether the method prunes inside the LLM (then the vision side sends every patch)."""
        return isinstance(self.compressor, LLMMethod)

    def train(self, mode: bool = True) -> CompressedLlava:
        super().train(mode)
        self.llava.eval()  # the frozen model never runs dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.compressor.parameters() if p.requires_grad]

    def _compressor_dtype(self) -> torch.dtype:
        param = next(iter(self.compressor.parameters()), None)
        return torch.float32 if param is None or not param.is_floating_point() else param.dtype

    # ------------------------------------------------------------- pipeline
    def _stock(self, method: str | None) -> bool:
        if method is None:
            return self.llm_side or self.config.method == "none"
        if method not in ("none", self.config.method):
            raise ValueError(f"method override must be 'none' or {self.config.method!r}, got {method!r}")
        return method == "none" or self.llm_side

    def compress(
        self,
        batch: dict[str, Any] | torch.Tensor,
        method: str | None = None,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> CompressionOutput:
        """A batch's images -> compressed visual features (before the projector).

        ``batch`` is the family's batch dict (``pixel_values`` [B, 3, H, W] for LLaVA-1.5; a bare
        pixel tensor is accepted too). ``method="none"`` runs the stock path (all patches).
        """
        if isinstance(batch, torch.Tensor):
            batch = {"pixel_values": batch}
        stock = self._stock(method)
        scoring_layers = [] if stock else list(getattr(self.compressor, "scoring_layers", []))
        with torch.no_grad():
            capture = self.backend.encode_images(batch, scoring_layers)
        self._layout = capture.layout
        if stock:
            return self.backend.compress_rows(_all_patches, capture)
        dtype = self._compressor_dtype()
        if capture.sample_index is not None and text_embeds is not None:
            # Several rows per sample (the views of a tiled image): each row reads its sample's question.
            text_embeds = text_embeds[capture.sample_index]
            text_mask = None if text_mask is None else text_mask[capture.sample_index]
        capture = VisionCapture(
            hidden=capture.hidden.to(dtype),
            queries=None if capture.queries is None else capture.queries.to(dtype),
            keys=None if capture.keys is None else capture.keys.to(dtype),
            attention=None if capture.attention is None else capture.attention.to(dtype),
            has_cls=capture.has_cls,
            grid=capture.grid,
            text_embeds=None if text_embeds is None else text_embeds.detach().to(dtype),
            text_mask=text_mask,
            project=self.backend.project if getattr(self.compressor, "needs_projected", False) else None,
            sample_index=capture.sample_index,
            layout=capture.layout,
        )
        return self.backend.compress_rows(self.compressor, capture)

    def prepare_inputs(
        self, batch: dict[str, Any], method: str | None = None
    ) -> tuple[SplicedInputs, CompressionOutput]:
        """Batch -> what the LLM receives (spliced embeddings, mask, positions, labels) and the
        compression, one row per sample (a tiled family's views summed: ``sample_compression``)."""
        input_ids = batch["input_ids"].to(self.backend.device)
        question_mask = batch.get("question_mask")
        question_mask = None if question_mask is None else question_mask.to(input_ids.device).bool()
        with torch.no_grad():
            text_embeds = self.backend.embed_tokens(input_ids)
        compression = self.compress(batch, method, text_embeds, question_mask)
        spliced = self.splice(batch, compression, text_embeds)
        per_sample = self.backend.sample_compression(compression, self._layout)
        has_image = batch.get("has_image")
        has_image = torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device) if has_image is None \
            else has_image.to(input_ids.device)
        stock = torch.as_tensor(self._stock_span, device=input_ids.device).expand(len(input_ids))
        return spliced, dataclasses.replace(per_sample, input_tokens=spliced.visual_mask.sum(1),
                                            stock_tokens=stock.long() * has_image)

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
        tokens, mask, offsets, span = self.backend.visual_inputs(compression, self._layout)
        self._stock_span = span  # the stock visual token count, per sample when it varies
        original = self.visual_positions == "original"
        spliced = splice_visual_tokens(
            text_embeds,
            input_ids,
            attention_mask,
            self.backend.image_token_id,
            tokens,
            mask,
            has_image=None if has_image is None else has_image.to(device),
            labels=None if labels is None else labels.to(device),
            visual_positions=offsets if original else None,
            image_span=span if original else None,
        )
        # Families with multi-dimensional rotary positions (M-RoPE) lay out their own position ids.
        spliced.position_ids = self.backend.position_ids(spliced, compression, self._layout, batch,
                                                         self.visual_positions)
        return spliced

    def forward(self, batch: dict[str, Any], method: str | None = None) -> CompressedLlavaOutput:
        """Logits (and loss when the batch has ``labels``) of the LLM on the compressed sequence.

        ``method="none"`` runs the stock path (all patches), e.g. for a distillation teacher.
        """
        spliced, compression = self.prepare_inputs(batch, method)
        with self._pruning(spliced, method) as pruning:
            output = self.backend.language_model(
                spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids, labels=spliced.labels
            )
        compression = self._seen_by_llm(compression, pruning)
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
        """Greedy decoding (by default) after the compressed prefill: new ids [B, new] and the
        compression (after an LLM-side method, with the visual tokens its decoder layers saw)."""
        spliced, compression = self.prepare_inputs(batch, method)
        if self.visual_positions == "original" or spliced.position_ids.dim() == 3:
            # Decoding continues from the last prompt position + 1 (transformers' generate extends
            # given position ids); the default, from the attention mask, would count real tokens
            # (and know nothing of M-RoPE's 3-D positions).
            kwargs.setdefault("position_ids", spliced.position_ids)
        with self._pruning(spliced, method) as pruning:
            generated = self.backend.generate(
                spliced.inputs_embeds, spliced.attention_mask, max_new_tokens=max_new_tokens, **kwargs
            )
        return generated, self._seen_by_llm(compression, pruning)

    def _pruning(self, spliced: SplicedInputs, method: str | None):
        """The LLM-side method's hooks for the duration of a call (nothing for vision-side methods)."""
        if not self.llm_side or method == "none":
            return nullcontext()
        return llm_pruning(self.backend, self.compressor, spliced.visual_mask, spliced.attention_mask.bool())

    @staticmethod
    def _seen_by_llm(compression: CompressionOutput, pruning) -> CompressionOutput:
        """The compression with the visual tokens the decoder layers saw (mean over layers, and in
        the last layer) when an LLM-side method pruned; unchanged otherwise."""
        seen = None if pruning is None else pruning.visual_tokens()
        if seen is None:
            return compression
        return dataclasses.replace(compression, llm_visual_tokens=seen[0], llm_visual_tokens_final=seen[1])
