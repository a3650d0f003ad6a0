"""Calibrate SparseZip's dynamic K to a mean budget on your own images.

With ``dynk.rule: attention_entropy`` the number of dominant tokens is ``K = scale * n_eff + c``
per image, so the mean budget depends on the model and the images. This finds the ``dynk.scale``
at which a compressor config averages ``--target`` visual tokens per image (CLS, dominant and
contextual tokens, as ``budget/tokens_mean`` counts them) on a folder of images, by bisection (the
budget never shrinks as the scale grows). The tower runs once; each trial only reruns the
compressor. Calibrate on images like, but not from, the evaluation set.

    python -m sparsezip_pl.calibrate --config configs/methods/sparsezip.yaml \\
        --model-path llava-hf/llava-1.5-7b-hf --images path/to/images --target 64
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import yaml
from PIL import Image

from sparsezip_pl.compress import CompressorConfig, build_method
from sparsezip_pl.compress.types import VisionCapture
from sparsezip_pl.models import LlavaBackend, load_backend
from sparsezip_pl.models.compressed import geometry_of

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def config_from_yaml(path: str | Path) -> CompressorConfig:
    """The ``model.compressor`` section of a CLI config file as a :class:`CompressorConfig`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    section = (data.get("model") or {}).get("compressor")
    if section is None:
        raise ValueError(f"{path}: no model.compressor section")
    return CompressorConfig.coerce(section)


def find_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted), at most ``limit``."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return paths[:limit] if limit else paths


@torch.no_grad()
def capture_images(backend: LlavaBackend, paths: list[Path], layers, batch_size: int = 16) -> list[VisionCapture]:
    """The tower's feature-layer states and the scoring layers' q/k for every image, batch by batch."""
    preprocess = backend.batch_builder("generate").images
    captures = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch_size]]
        capture = backend.encode_images({"pixel_values": preprocess(images)}, list(layers))
        captures.append(VisionCapture(capture.hidden.float(), capture.queries.float(), capture.keys.float()))
    return captures


@torch.no_grad()
def budgets(backend: LlavaBackend, config: CompressorConfig, captures: list[VisionCapture]) -> torch.Tensor:
    """Visual tokens per image that ``config`` keeps (a fresh compressor: its trainable parts at their defaults)."""
    compressor = build_method(config, geometry_of(backend)).eval()
    return torch.cat([compressor(capture).num_tokens.float() for capture in captures])


def calibrate_scale(backend: LlavaBackend, config: CompressorConfig, captures: list[VisionCapture], target: float,
                    low: float = 0.01, high: float = 20.0, steps: int = 30) -> tuple[float, torch.Tensor]:
    """The ``dynk.scale`` whose mean budget is closest to ``target`` (bisection), with its budgets."""
    options = config.sparsezip
    if config.method != "sparsezip" or not options.dynamic_k or options.dynk.rule != "attention_entropy":
        raise ValueError("calibration needs method: sparsezip, sparsezip.dynamic_k: true and "
                         "sparsezip.dynk.rule: attention_entropy")

    def at(scale: float) -> torch.Tensor:
        dynk = dataclasses.replace(options.dynk, scale=scale)
        return budgets(backend, dataclasses.replace(config, sparsezip=dataclasses.replace(options, dynk=dynk)), captures)

    low_tokens, high_tokens = at(low), at(high)
    low_budget, high_budget = low_tokens.mean().item(), high_tokens.mean().item()
    if not low_budget <= target <= high_budget:
        raise ValueError(f"target {target} is outside what dynk.scale in [{low}, {high}] reaches "
                         f"({low_budget:.1f} .. {high_budget:.1f}); change k_min / k_max / contextual_num")
    for _ in range(steps):
        middle = (low + high) / 2
        tokens = at(middle)
        if tokens.mean().item() < target:
            low, low_tokens = middle, tokens
        else:
            high, high_tokens = middle, tokens
    if abs(low_tokens.mean().item() - target) <= abs(high_tokens.mean().item() - target):
        return low, low_tokens
    return high, high_tokens


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a CLI config file with a model.compressor section")
    parser.add_argument("--backend", default="hf", help="the model family (hf, llava, ...)")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--target", type=float, default=64.0, help="mean visual tokens per image")
    args = parser.parse_args(argv)

    config = config_from_yaml(args.config)
    backend = load_backend(args.backend, args.model_path, dtype=args.dtype, device=args.device)
    paths = find_images(args.images, args.max_images)
    captures = capture_images(backend, paths, config.sparsezip.layers)
    scale, tokens = calibrate_scale(backend, config, captures, args.target)
    print(f"{len(paths)} images from {args.images}: dynk.scale {scale:.3f} gives {tokens.mean().item():.2f} "
          f"visual tokens per image on average (min {tokens.min().item():.0f}, max {tokens.max().item():.0f})")
    return scale


if __name__ == "__main__":
    main()
