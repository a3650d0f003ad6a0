"""Loading checkpoints from a hub id or a local folder, honouring offline mode, and the dtype policy."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

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


