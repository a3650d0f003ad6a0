"""The interface both LLaVA families implement, and loading from a hub id or a local folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Family = Literal["hf", "llava"]
BatchMode = Literal["train", "generate"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRUE = {"1", "ON", "YES", "TRUE"}
# huggingface_hub's CLI (1.0 removed the older `huggingface-cli`).
DOWNLOAD_COMMAND = "hf download"


class ModelNotAvailableError(FileNotFoundError):
    """Weights that are neither a local folder nor (offline) in the Hugging Face cache."""


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (read now, not at import)."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device, stock_gpu_dtype: torch.dtype) -> torch.dtype:
    """The weights' dtype for ``dtype="auto"``: what the family's stock loader gives on a GPU
    (``stock_gpu_dtype``), and float32 on a CPU (half-precision matmuls there are slow or missing).
    Any other value is taken as given."""
    if dtype != "auto":
        return torch_dtype(dtype)
    return stock_gpu_dtype if torch.device(device).type != "cpu" else torch.float32


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a folder.
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_pretrained(name_or_path: str | os.PathLike, what: str = "model") -> str:
    """Return a local folder, or a hub id that ``from_pretrained`` can load.

    Raises :class:`ModelNotAvailableError` with what to download and where when ``name_or_path``
    is a missing folder, or a hub id that is not cached while offline mode is on.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_local_path(name):
        raise ModelNotAvailableError(f"The {what} folder {str(path)!r} does not exist.")
    if not is_offline():
        return name
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    raise ModelNotAvailableError(
        f"The {what} {name!r} is not available: offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) "
        f"and {name!r} is neither a local folder (no {str(path.resolve())!r}) nor in the Hugging Face cache "
        f"({HF_HUB_CACHE}).\n"
        f"On a machine with network access run\n"
        f"    {DOWNLOAD_COMMAND} {name}\n"
        f"and copy the cache folder to {HF_HUB_CACHE} here (or point HF_HOME at it), or run\n"
        f"    {DOWNLOAD_COMMAND} {name} --local-dir /path/to/{name.split('/')[-1]}\n"
        f"and pass that folder instead of {name!r}."
    )


def vision_patch_count(family: Family, model_path: str | os.PathLike) -> int:
    """N, the patches the vision tower of a checkpoint produces per image, read from its config
    files alone (no weights): ``(image_size // patch_size) ** 2``."""
    from transformers import AutoConfig, CLIPVisionConfig

    path = resolve_pretrained(model_path, f"LLaVA checkpoint ({family})")
    offline = is_offline()
    if family == "hf":
        vision = AutoConfig.from_pretrained(path, local_files_only=offline).vision_config
    elif family == "llava":
        import json

        from huggingface_hub import hf_hub_download

        folder = Path(path)
        config_file = folder / "config.json" if folder.is_dir() else Path(hf_hub_download(path, "config.json"))
        tower = json.loads(config_file.read_text(encoding="utf-8")).get("mm_vision_tower")
        if tower is None:
            raise ValueError(f"{config_file}: no 'mm_vision_tower' (is this an original LLaVA checkpoint?)")
        if folder.is_dir() and not Path(tower).is_absolute() and (folder / tower).is_dir():
            tower = str(folder / tower)
        vision = CLIPVisionConfig.from_pretrained(resolve_pretrained(tower, f"vision tower of {model_path}"),
                                                  local_files_only=offline)
    else:
        raise ValueError(f"family must be 'hf' or 'llava', got {family!r}")
    return (vision.image_size // vision.patch_size) ** 2


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The CLIP vision model inside a LLaVA of either family (found by walking modules)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        # The original code wraps the tower in a CLIPVisionTower (not a PreTrainedModel) that
        # shares its config; the transformers model is the one inside.
        if isinstance(module, PreTrainedModel) and module.config.model_type == "clip_vision_model":
            return module
    raise ValueError(f"no CLIP vision model found inside {type(model).__name__} (is its vision tower loaded?)")


def find_projector(model: nn.Module) -> nn.Module:
    """The multimodal projector (``multi_modal_projector`` in transformers, ``mm_projector`` in llava)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("multi_modal_projector", "mm_projector"):
            return module
    raise ValueError(f"no multimodal projector found inside {type(model).__name__}")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class LlavaBackend:
    """One LLaVA checkpoint seen through the few operations that visual-token compression needs.

    Subclasses fill in the family-specific parts: where the feature layer and placeholder are
    configured, how the LLM runs on ``inputs_embeds``, and how prompts and images are prepared.
    The backend holds the stock model unchanged; it is not an ``nn.Module`` itself so that the
    model is registered once, by whoever owns the backend (``CompressedLlava``).
    """

    family: Family

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

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids -> stripped texts (special tokens and padding dropped)."""
        if self.tokenizer is None:
            raise ValueError("this backend was built without a tokenizer")
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, feature_layer={self.feature_layer}, "
            f"vision={self.vision_num_layers}x{self.vision_num_heads}x{self.vision_head_dim}, "
            f"text_hidden={self.text_hidden_size}, device={self.device}, dtype={self.dtype})"
        )


def load_backend(
    family: Family,
    model_path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    **kwargs,
) -> LlavaBackend:
    """Load a frozen LLaVA of ``family`` (``hf`` or ``llava``) from a hub id or a local folder.

    ``hf``: transformers' ``LlavaForConditionalGeneration`` and its ``AutoProcessor``
    (llava-hf/llava-1.5-7b-hf, -13b-hf, or a folder of the same layout). ``llava``: the original
    code's ``LlavaLlamaForCausalLM`` (liuhaotian/llava-v1.5-7b ...), whose vision tower loads from
    ``mm_vision_tower`` in its config (``vision_tower=`` overrides it). Extra ``kwargs`` go to the
    family's loader (e.g. ``attn_implementation``). Offline mode is honoured; missing weights raise
    :class:`ModelNotAvailableError` saying what to download.
    """
    if family == "hf":
        from sparsezip_pl.models.hf import HFLlavaBackend

        return HFLlavaBackend.from_pretrained(model_path, dtype=dtype, device=device, **kwargs)
    if family == "llava":
        from sparsezip_pl.models.llava_original import OriginalLlavaBackend

        return OriginalLlavaBackend.from_pretrained(model_path, dtype=dtype, device=device, **kwargs)
    raise ValueError(f"family must be 'hf' or 'llava', got {family!r}")


def detect_family(model: nn.Module) -> Family:
    """``hf`` for transformers' Llava models, ``llava`` for the original code's (without importing it)."""
    if hasattr(model, "prepare_inputs_labels_for_multimodal") or type(model).__module__.startswith("llava."):
        return "llava"
    if getattr(getattr(model, "config", None), "model_type", None) == "llava":
        return "hf"
    raise TypeError(f"{type(model).__name__} is neither a transformers Llava model nor an original llava model")


def backend_from_model(model: nn.Module, tokenizer=None, image_processor=None) -> LlavaBackend:
    """Wrap an already loaded LLaVA (either family) without changing it."""
    if detect_family(model) == "hf":
        from sparsezip_pl.models.hf import HFLlavaBackend

        return HFLlavaBackend(model, tokenizer, image_processor)
    from sparsezip_pl.models.llava_original import OriginalLlavaBackend

    return OriginalLlavaBackend(model, tokenizer, image_processor)
