"""The model side: families (one file each in ``families/``), the vision-side capture, splicing
compressed tokens into the LLM's input, the LLM-side hook point and tiny test checkpoints."""

from sparsezip_pl.models.compressed import CompressedLlava, CompressedLlavaOutput
from sparsezip_pl.models.families import (
    ModelFamily,
    detect_family,
    family_from_model,
    family_names,
    get_family,
    load_family,
    register_family,
    vision_patch_count,
)
from sparsezip_pl.models.loading import ModelNotAvailableError
from sparsezip_pl.models.splice import SplicedInputs, splice_visual_tokens

#: Names of earlier versions.
LlavaBackend = ModelFamily
load_backend = load_family
backend_from_model = family_from_model

__all__ = [
    "CompressedLlava",
    "CompressedLlavaOutput",
    "LlavaBackend",
    "ModelFamily",
    "ModelNotAvailableError",
    "SplicedInputs",
    "backend_from_model",
    "detect_family",
    "family_from_model",
    "family_names",
    "get_family",
    "load_backend",
    "load_family",
    "register_family",
    "splice_visual_tokens",
    "vision_patch_count",
]
