"""sparsezip_pl: SparseZip visual-token compression for LLaVA-style models, with PyTorch Lightning.

    from sparsezip_pl import sparsezip, unwrap
    model = sparsezip(model, method="visionzip", dominant=54, contextual=10)
"""

__version__ = "0.1.0"
__all__ = ["sparsezip", "unwrap"]


def __getattr__(name: str):
    # Imported lazily so that `import sparsezip_pl.data` does not pull in the model stack.
    if name in __all__:
        from sparsezip_pl import api

        return getattr(api, name)
    raise AttributeError(f"module 'sparsezip_pl' has no attribute {name!r}")
