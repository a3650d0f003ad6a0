"""lmms-eval's entry point for the ``sparsezip`` model (group ``lmms_eval.models`` in pyproject.toml).

lmms-eval loads every entry point of that group each time ``lmms_eval.models`` is imported, while
that package is still initialising, and one failing plug-in hides the plug-ins after it. So this
module imports nothing at all at import time, and only lmms-eval's registry module when called;
the model class (:mod:`sparsezip_pl.integrations.lmms_eval`) loads only for ``--model sparsezip``.
"""

MODEL_ID = "sparsezip"
CLASS_PATH = "sparsezip_pl.integrations.lmms_eval.SparseZipLMM"


def manifests():
    """The ``sparsezip`` model's manifest (a "simple" model: one prompt and its images per request)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("sparsezip_pl",))]
