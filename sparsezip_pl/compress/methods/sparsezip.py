"""``sparsezip``: registered by its class, :class:`sparsezip_pl.compress.compressor.SparseZipCompressor`
(the method spans ``scoring``, ``budget``, ``merge`` and ``output``)."""

from sparsezip_pl.compress.compressor import SparseZipCompressor

__all__ = ["SparseZipCompressor"]
