"""Visual-token compression methods: pure PyTorch, batched, one file per method.

    from sparsezip_pl.compress import CompressorConfig, Geometry, build_method
    method = build_method(CompressorConfig(method="visionzip", budget=64), Geometry(num_heads=16, head_dim=64))
    out = method(capture)          # VisionCapture in, CompressionOutput out

``get_method(name)`` finds a method in the registry, ``method_names()`` lists them; a method is
a class registered with ``@register_method(name, config=...)`` in ``compress/methods/``.
"""

from .compressor import SparseZipCompressor
from .config import Alphas, DynKConfig, MergingConfig, SparseZipConfig, SparseZipOptions
from .method import BudgetOutOfReach, LLMMethod, VisionMethod, resolve_budget
from .registry import MethodSpec, get_method, method_names, methods, register_method
from .settings import CompressorConfig, CompressorSettings, build_method
from .types import CompressionOutput, Geometry, VisionCapture

__all__ = [
    "Alphas",
    "BudgetOutOfReach",
    "CompressionOutput",
    "CompressorConfig",
    "CompressorSettings",
    "DynKConfig",
    "Geometry",
    "LLMMethod",
    "MergingConfig",
    "MethodSpec",
    "SparseZipCompressor",
    "SparseZipConfig",
    "SparseZipOptions",
    "VisionCapture",
    "VisionMethod",
    "build_method",
    "get_method",
    "method_names",
    "methods",
    "register_method",
    "resolve_budget",
]
