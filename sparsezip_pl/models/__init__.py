"""LLaVA backends (transformers' Llava and the original ``llava`` code), capture, splicing, tiny models."""

from sparsezip_pl.models.backend import (
    LlavaBackend,
    ModelNotAvailableError,
    backend_from_model,
    detect_family,
    load_backend,
)
from sparsezip_pl.models.capture import encode_with_capture
from sparsezip_pl.models.compressed import CompressedLlava, CompressedLlavaOutput
from sparsezip_pl.models.splice import SplicedInputs, splice_visual_tokens

__all__ = [
    "CompressedLlava",
    "CompressedLlavaOutput",
    "LlavaBackend",
    "ModelNotAvailableError",
    "SplicedInputs",
    "backend_from_model",
    "detect_family",
    "encode_with_capture",
    "load_backend",
    "splice_visual_tokens",
]
