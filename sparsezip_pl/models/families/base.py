"""The model-family interface and its registry.

A family is one file in ``models/families/``: a :class:`ModelFamily` subclass registered with
``@register_family(name)``. It says how a checkpoint loads (``from_pretrained``), how to tell
its models apart (``matches``), what its vision tower looks like (``has_cls``, the patch count,
the feature layer), how images become a :class:`~sparsezip_pl.compress.VisionCapture`
(``encode_images``), how the compressed tokens enter the LLM (``visual_inputs``) and how prompts
are built (``batch_builder``). Everything else (splicing, generation, the hook points) is shared.

The families of LLaVA-1.5 are ``hf`` (transformers' ``LlavaForConditionalGeneration``,
llava-hf/llava-1.5-*-hf) and ``llava`` (the original code, liuhaotian/llava-v1.5-*). The embedded
tiny demo model is an ``hf`` checkpoint (a llava-hf folder), so it needs no family of its own.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from sparsezip_pl.compress.types import CompressionOutput, Geometry, VisionCapture
from sparsezip_pl.models.batching import BatchBuilder, ChatTemplateFormat, Tokenization
from sparsezip_pl.models.capture import encode_with_capture
from sparsezip_pl.models.llm_hook import default_apply_rotary
from sparsezip_pl.models.loading import find_projector, find_vision_tower

BatchMode = Literal["train", "generate"]

_FAMILIES: dict[str, type[ModelFamily]] = {}
_ALIASES: dict[str, str] = {}
_DISCOVERED = False


def register_family(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: register a :class:`ModelFamily` under ``name`` (and ``aliases``)."""

    def decorate(cls: type[ModelFamily]) -> type[ModelFamily]:
        _FAMILIES[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        cls.family = name
        return cls

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        package = importlib.import_module("sparsezip_pl.models.families")
        for module in pkgutil.iter_modules(package.__path__):
            if module.name != "base" and not module.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        _DISCOVERED = True


def family_names() -> list[str]:
    """Registered family names."""
    _discover()
    return sorted(_FAMILIES)


def get_family(name: str) -> type[ModelFamily]:
    """The family class registered as ``name`` (or an alias); unknown names list the known ones."""
    _discover()
    name = _ALIASES.get(name, name)
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(family_names())}")
    return _FAMILIES[name]


def detect_family(model: nn.Module) -> str:
    """The family whose ``matches`` accepts an already loaded model."""
    _discover()
    for name, cls in _FAMILIES.items():
        if cls.matches(model):
            return name
    raise TypeError(f"{type(model).__name__} belongs to no registered model family ({', '.join(family_names())})")


def load_family(
    family: str,
    model_path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    **kwargs,
) -> ModelFamily:
    """Load a frozen model of ``family`` from a hub id or a local folder (see each family's
    ``from_pretrained``; ``dtype="auto"`` is what the family's stock loader gives on a GPU and
    float32 on a CPU). Offline mode is honoured; missing weights raise
    :class:`~sparsezip_pl.models.loading.ModelNotAvailableError` saying what to download."""
    return get_family(family).from_pretrained(model_path, dtype=dtype, device=device, **kwargs)


def family_from_model(model: nn.Module, tokenizer=None, image_processor=None, **options) -> ModelFamily:
    """Wrap an already loaded model (its family detected) without changing it; ``options`` are
    the family's own (e.g. LLaVA-NeXT's ``compress_views``)."""
    return get_family(detect_family(model))(model, tokenizer, image_processor, **options)


def vision_patch_count(family: str, model_path: str | os.PathLike) -> int:
    """N, the patches the stock model gives one image, read from the checkpoint's config files
    alone (no weights): the bound a per-image budget is checked against (a tiled family whose
    budget counts per image: all the views an image can have, 576 x 5 for LLaVA-1.6)."""
    return get_family(family).patch_count(model_path)


class ModelFamily:
    """One checkpoint of a model family, seen through the operations visual-token compression needs.

    Subclasses fill in the family-specific parts: loading, where the feature layer and the image
    placeholder are configured, how images become a capture and compressed tokens LLM inputs,
    and how prompts and images are prepared. The family object holds the stock model unchanged;
    it is not an ``nn.Module`` itself so that the model is registered once, by whoever owns it
    (``CompressedLlava``).
    """

    family: ClassVar[str] = ""
    #: whether the vision tower has a CLS token (CLIP: yes; SigLIP, Qwen's ViT: no)
    has_cls: ClassVar[bool] = True

    def __init__(self, model: nn.Module, tokenizer=None, image_processor=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.vision_tower = find_vision_tower(model)
        self.projector = find_projector(model)
        vision_config = self.vision_tower.config
        self.vision_num_heads: int = vision_config.num_attention_heads
        self.vision_hidden_size: int = vision_config.hidden_size
        self.vision_head_dim: int = vision_config.hidden_size // vision_config.num_attention_heads
        self.vision_num_layers: int = vision_config.num_hidden_layers
        self.num_patches: int = (vision_config.image_size // vision_config.patch_size) ** 2
        self.text_hidden_size: int = model.get_input_embeddings().embedding_dim
        if self.select_strategy != "default":
            raise NotImplementedError(
                f"vision feature select strategy {self.select_strategy!r}: only LLaVA-1.5's 'default' "
                "(patch tokens without CLS) is supported"
            )

    # ------------------------------------------------------------- loading
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether an already loaded ``model`` belongs to this family."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", **kwargs) -> ModelFamily:
        """Load a frozen checkpoint the way the family's stock loader does."""
        raise NotImplementedError

    @classmethod
    def patch_count(cls, model_path: str | os.PathLike) -> int:
        """N of :func:`vision_patch_count`, from the checkpoint's config files alone."""
        raise NotImplementedError

    # --------------------------------------------------------------- config
    @property
    def feature_layer(self) -> int:
        """The tower's feature layer, indexed like ``hidden_states`` (-2 for LLaVA-1.5)."""
        raise NotImplementedError

    @property
    def select_strategy(self) -> str:
        """``default``: the patch tokens without CLS (``patch`` in the original code)."""
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        """The id that stands for the image in ``input_ids`` (one per image in our batches)."""
        raise NotImplementedError

    @property
    def eos_token_id(self) -> int | list[int] | None:
        generation = getattr(self.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return eos

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        generation = getattr(self.model, "generation_config", None)
        pad = getattr(generation, "pad_token_id", None)
        if pad is None:
            eos = self.eos_token_id
            pad = eos[0] if isinstance(eos, list) else eos
        return 0 if pad is None else pad

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ----------------------------------------------------------- operations
    def encode_images(self, batch: dict[str, Any], scoring_layers: list[int]) -> VisionCapture:
        """Run the vision tower on a batch's images up to the feature layer, capturing the CLS
        queries and keys of ``scoring_layers`` (a CLIP tower; other towers override this)."""
        return encode_with_capture(self.vision_tower, self.pixels_for_tower(batch["pixel_values"]),
                                   self.feature_layer, scoring_layers)

    def method_setup(self, config: Any, geometry: Geometry) -> tuple[Any, Geometry]:
        """The compressor config and geometry the method is built with. Single-view families keep
        both; a tiled family may turn a per-image budget into a per-row one or say that rows vary."""
        return config, geometry

    def sample_compression(self, compression: CompressionOutput, layout: Any = None) -> CompressionOutput:
        """The compression as reported per sample (what ``CompressedLlava.forward`` / ``generate``
        return): the rows themselves when a row is a sample; a tiled family sums its views."""
        return compression

    def visual_inputs(self, compression: CompressionOutput, layout: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | torch.Tensor]:
        """What the LLM receives per sample: the projected tokens [B, V, D], their mask [B, V],
        their position offsets inside the image's stock span [B, V] (for original positions) and
        that span (the stock visual token count; an int, or [B] when it varies per sample).
        ``layout`` is the one the family put on the capture (tiled families reassemble views)."""
        return self.project(compression.tokens), compression.mask, compression.positions, self.num_patches

    # ------------------------------------------------- the stock model's own inputs (api.py)
    #: keyword inputs of the stock ``generate`` beyond ids, mask and images (e.g. ``image_sizes``)
    stock_input_names: ClassVar[tuple[str, ...]] = ()
    #: whether the stock ``generate`` returns the prompt ids before the new ones
    stock_generate_returns_prompt: ClassVar[bool] = True

    def batch_from_stock_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                                images: Any, **extra: Any) -> dict[str, Any]:
        """The family's batch (as its ``batch_builder`` makes them) from what a user passes to the
        stock model's ``generate``: one placeholder per image, left padding."""
        raise NotImplementedError

    def _pack_stock_inputs(self, input_ids: torch.Tensor, real: torch.Tensor, keep: torch.Tensor,
                           has_image: torch.Tensor, pixel_values: Any,
                           question_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Left-pack the kept ids and give every sample a pixel row (zeros for text-only ones)."""
        batch_size = input_ids.shape[0]
        ids, attention, question = pack_stock_ids(input_ids, keep, self.pad_token_id, self.image_token_id, question_mask)
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack([p if p.dim() == 3 else p.squeeze(0) for p in pixel_values])
        if pixel_values is None:
            if bool(has_image.any()):
                raise ValueError("input_ids hold image placeholders but no images were given")
            size = self.vision_tower.config.image_size
            pixel_values = torch.zeros(batch_size, 3, size, size, device=self.device)
        elif pixel_values.shape[0] != batch_size:
            # One pixel row per image (transformers' processors), not per sample.
            full = pixel_values.new_zeros(batch_size, *pixel_values.shape[1:])
            full[has_image] = pixel_values
            pixel_values = full
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "question_mask": question,
            "pixel_values": pixel_values,
            "has_image": has_image,
        }

    # ------------------------------------- hooks of families beyond LLaVA-1.5 (defaults: LLaVA-1.5)
    @property
    def method_num_patches(self) -> int | None:
        """N per row that a vision-side method is built for (its ``Geometry.num_patches``); None when
        the rows of a batch differ in length (images of different sizes, see :meth:`compress_rows`)."""
        return self.num_patches

    def compress_rows(self, method, capture: VisionCapture) -> CompressionOutput:
        """Run ``method`` (a vision-side method, or the stock path: a callable ``capture ->
        CompressionOutput``) on the capture's rows. All rows at once by default; a family whose rows
        differ in length groups them (one call per distinct row shape) and combines the outputs."""
        return method(capture)

    def position_ids(self, spliced, compression: CompressionOutput, layout: Any, batch: dict[str, Any],
                     visual_positions: str) -> torch.Tensor:
        """The position ids the LLM receives for a spliced sequence (``spliced``:
        :class:`~sparsezip_pl.models.splice.SplicedInputs`): the splice's 1-D ones [B, L] by default;
        a family with multi-dimensional rotary positions (Qwen2.5-VL's M-RoPE) returns [3, B, L]."""
        return spliced.position_ids

    @property
    def max_stock_tokens(self) -> int:
        """The most visual tokens the stock model gives one image (the prompt-length check's bound):
        N for a single-view family; tiled families (many views per image) override it."""
        return self.num_patches

    def max_visual_tokens(self, method) -> int:
        """The most visual tokens one image can send the LLM under ``method`` (the prompt-length
        check's bound): the method's output for a row of ``num_patches`` on a family with one row
        per image; the stock count for ``none`` and for an LLM-side method (it prunes inside the
        decoder, after the prompt is laid out). Tiled families override it."""
        output_length = getattr(method, "output_length", None)
        if output_length is None or is_stock(method):
            return self.max_stock_tokens
        return output_length(self.num_patches)

    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers (the LLM-side hook point)."""
        return self.model.get_decoder().layers

    def attention_module(self, layer: nn.Module) -> nn.Module:
        """The self-attention of a decoder layer (with ``q_proj``, ``k_proj``, ``head_dim``, ``scaling``)."""
        return layer.self_attn

    def apply_rotary(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, cos, sin):
        """The rotary embedding the attention module applies (its modeling file's ``apply_rotary_pos_emb``)."""
        return default_apply_rotary(attention, q, k, cos, sin)

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The rotary embeddings ``(cos, sin)`` the decoder hands its layers for ``position_ids``
        (``hidden`` gives dtype and device): the LLM's own ``rotary_emb``. The LLM-side hook uses it
        for the layers after a pruning layer that renumbers the kept tokens' positions."""
        return self.model.get_decoder().rotary_emb(hidden, position_ids)

    def pixels_for_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values as the stock pipeline hands them to the tower (on the model's device; the
        tower casts them to its own dtype)."""
        return pixel_values.to(self.device)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings; placeholder ids outside the vocabulary (llava's -200) embed as pad."""
        ids = input_ids.masked_fill(input_ids < 0, self.pad_token_id)
        return self.model.get_input_embeddings()(ids)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [..., C] -> LLM input embeddings [..., D]."""
        return self.projector(features.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def language_model(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """The LLM (with its LM head and loss) on ``inputs_embeds``; returns the model's output."""
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
            **kwargs,
        )

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Decoding from ``inputs_embeds`` (greedy unless told otherwise); returns only new ids [B, new]."""
        from transformers import GenerationMixin

        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("num_beams", 1)
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        if self.eos_token_id is not None:
            kwargs.setdefault("eos_token_id", self.eos_token_id)
        # GenerationMixin.generate directly: the original llava code overrides ``generate`` to
        # refuse ``inputs_embeds``; for transformers' Llava it is the method ``generate`` resolves to.
        return GenerationMixin.generate(
            self.model, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )

    def batch_builder(self, mode: BatchMode):
        """A picklable collate function ``list[dict] -> dict`` (see :mod:`sparsezip_pl.models.batching`)."""
        raise NotImplementedError

    def chat_template_builder(self, mode: BatchMode, max_length: int | None, images, builder=None, **kwargs):
        """The batch builder of a family loaded with a transformers processor: the processor's chat
        template, one ``image_token_id`` placeholder per image, ``images`` the image preprocessor
        and ``builder`` the builder class (:class:`~sparsezip_pl.models.batching.BatchBuilder`)."""
        if self.tokenizer is None or self.image_processor is None:
            raise ValueError("batch_builder needs the model's processor (load with load_family)")
        processor = getattr(self, "processor", None)
        template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the processor has no chat template")
        return (builder or BatchBuilder)(
            mode,
            ChatTemplateFormat(self.tokenizer, template),
            Tokenization(self.tokenizer, self.image_token_id, split_on_marker=False),
            images,
            pad_token_id=self.pad_token_id,
            eos_token=self.tokenizer.eos_token,
            max_length=max_length,
            **kwargs,
        )

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids -> stripped texts (special tokens and padding dropped)."""
        if self.tokenizer is None:
            raise ValueError("this model family object was built without a tokenizer")
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, feature_layer={self.feature_layer}, "
            f"vision={self.vision_num_layers}x{self.vision_num_heads}x{self.vision_head_dim}, "
            f"text_hidden={self.text_hidden_size}, device={self.device}, dtype={self.dtype})"
        )


#: The name of earlier versions.
LlavaBackend = ModelFamily


def is_stock(method) -> bool:
    """Whether ``method`` is the stock path (method ``none``): the legacy ``Compressor`` names its
    method in ``method``, the registered method modules in ``method_name``."""
    return getattr(method, "method", getattr(method, "method_name", None)) == "none"


def pack_stock_ids(input_ids: torch.Tensor, keep: torch.Tensor, pad_token_id: int, image_token_id: int,
                   question_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A user's stock ``input_ids`` with only the ``keep`` positions, left-padded: ids, attention
    mask and question mask. The question (what text-aware methods read) is the user's
    ``question_mask`` [B, L] over ``input_ids`` where given, else every text token of the prompt."""
    from sparsezip_pl.models.splice import left_pack

    extra = None
    if question_mask is not None:
        question_mask = torch.as_tensor(question_mask, device=input_ids.device)
        if question_mask.shape != input_ids.shape:
            raise ValueError(f"question_mask has shape {tuple(question_mask.shape)}; it must mark the tokens of "
                             f"input_ids, shape {tuple(input_ids.shape)}")
        extra = {"question_mask": question_mask.long()}
    ids, attention, packed = left_pack(input_ids, keep, pad_token_id, extra)
    question = attention.bool() & (ids != image_token_id)
    if question_mask is not None:
        question = question & packed["question_mask"].bool()
        empty = (~question.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"question_mask marks no text token in row(s) {empty} of input_ids")
    return ids, attention, question
