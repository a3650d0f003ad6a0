"""SparseZip visual-token compression: pure PyTorch, batched and trainable.

    from sparsezip_pl.compress import SparseZipCompressor, SparseZipConfig, VisionCapture
    comp = SparseZipCompressor(SparseZipConfig(), num_heads=16, head_dim=64)
    out = comp(VisionCapture(hidden, queries, keys))   # CompressionOutput
"""

from .compressor import SparseZipCompressor
from .config import (
    Alphas,
    CompressionOutput,
    DynKConfig,
    MergingConfig,
    SparseZipConfig,
    VisionCapture,
)

__all__ = [
    "Alphas",
    "CompressionOutput",
    "DynKConfig",
    "MergingConfig",
    "SparseZipCompressor",
    "SparseZipConfig",
    "VisionCapture",
]
