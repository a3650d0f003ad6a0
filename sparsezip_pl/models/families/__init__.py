"""Model families: one file each, registered by name (see :mod:`.base`)."""

from sparsezip_pl.models.families.base import (
    BatchMode,
    ModelFamily,
    detect_family,
    family_from_model,
    family_names,
    get_family,
    load_family,
    register_family,
    vision_patch_count,
)

__all__ = [
    "BatchMode",
    "ModelFamily",
    "detect_family",
    "family_from_model",
    "family_names",
    "get_family",
    "load_family",
    "register_family",
    "vision_patch_count",
]
