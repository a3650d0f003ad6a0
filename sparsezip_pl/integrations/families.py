"""Which registered model family a checkpoint belongs to, from its ``config.json`` alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# config.json's model_type -> family name, where the two differ (a registered family named like
# its model_type, or with it as an alias, is found without an entry here).
MODEL_TYPE_FAMILIES = {"llava": "hf", "llava_llama": "llava"}


def read_checkpoint_config(model_path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a local folder or a hub id (the Hugging Face cache only in offline mode)."""
    from sparsezip_pl.models.loading import is_offline, resolve_pretrained

    path = resolve_pretrained(model_path)
    folder = Path(path)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{folder} has no config.json: not a model checkpoint folder")
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(path, "config.json", local_files_only=is_offline()))
    return json.loads(config_file.read_text(encoding="utf-8"))


def detect_checkpoint_family(model_path: str | os.PathLike) -> str:
    """The registered family of a checkpoint: the original LLaVA code's checkpoints name their
    tower in ``mm_vision_tower`` (family ``llava``); otherwise the config's ``model_type`` decides
    (``llava`` -> ``hf``, or a family registered under that name). Anything else is an error that
    asks for ``family=``."""
    from sparsezip_pl.models.families import family_names, get_family

    config = read_checkpoint_config(model_path)
    model_type = config.get("model_type")
    candidates = ["llava"] if config.get("mm_vision_tower") else []
    candidates += [MODEL_TYPE_FAMILIES.get(model_type), model_type]
    for name in candidates:
        if not name:
            continue
        try:
            return get_family(name).family
        except ValueError:
            continue
    raise ValueError(f"cannot tell which model family {str(model_path)!r} belongs to (config.json model_type "
                     f"{model_type!r}); name it: family=NAME, one of {', '.join(family_names())}")
