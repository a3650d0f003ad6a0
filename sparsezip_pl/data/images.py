"""Image loading: any source -> a fully decoded RGB ``PIL.Image``.

Mode conversion (documented choice):

* RGBA, LA, PA and palette images with a transparency entry are composited on a **white**
  background. (LLaVA's scripts call ``.convert("RGB")``, which drops alpha and shows whatever colour
  the transparent pixels happen to hold, often black; the two differ only on transparent pixels.)
* 16-bit greyscale (``I;16``) is scaled to 8 bits; every other mode (L, P, CMYK, 1, YCbCr, ...)
  goes through ``Image.convert("RGB")``.
* No resizing (that is the processor's job) and no EXIF rotation (the reference pipelines do not
  apply it either). Pillow's decompression-bomb limit stays in force: an image above it is reported
  as ``corrupt_image``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageLoadError(Exception):
    """An image could not be read; ``reason`` is ``missing_image`` or ``corrupt_image``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (alpha composited on white, see the module doc)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16"):
        array = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(source: Any, name: str | None = None) -> Image.Image:
    """Read and decode an image now; returns RGB.

    Args:
        source: a file path, raw bytes, a ``{"bytes": ..., "path": ...}`` dict (Hugging Face's
            undecoded ``Image`` feature) or a ``PIL.Image``.
        name: how to call the image in error messages (defaults to the path).

    Raises:
        ImageLoadError: the file is missing (``missing_image``) or cannot be decoded
            (``corrupt_image``).
    """
    if isinstance(source, Image.Image):
        try:
            source.load()
            return to_rgb(source)
        except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
            raise ImageLoadError(f"image {name or '<PIL image>'}: cannot decode: {err}", "corrupt_image") from err
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and path is None:
            raise ImageLoadError(f"image {name or '?'}: empty image entry (no bytes, no path)", "missing_image")
        name = name or path
        source = data if data is not None else path
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        stream: Any = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        if not Path(source).is_file():
            raise ImageLoadError(f"image file not found: {source}", "missing_image")
        stream = source
    else:
        raise ImageLoadError(f"image {name or '?'}: unsupported source type {type(source).__name__}", "corrupt_image")
    try:
        with Image.open(stream) as image:
            image.load()
            return to_rgb(image)
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
        raise ImageLoadError(f"image {label}: cannot decode: {err}", "corrupt_image") from err
