"""Which patches a method keeps, measured against the synthetic world's ground truth.

    python examples/tiny_llava/object_coverage.py                       # the demo's methods on 64 scenes of seed 4321
    python examples/tiny_llava/object_coverage.py --config configs/methods/visionzip.yaml --config configs/demo/sparsezip.yaml

For each method (its compressor block read from the CLI config files, layered in order like
``--config`` does), on fresh scenes rendered by ``sparsezip_pl.data.synthetic`` and fed to the
tiny LLaVA's tower: the mean number of visual tokens per image, the share of object patches
(patches an object covers by at least 20%) that are kept as dominant tokens, small objects
(< 38 px) and large ones apart, and the share of objects with at least one dominant patch. A
method that keeps most object patches and still loses accuracy loses it elsewhere (background
context, the merged tokens, positions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # this checkout's sparsezip_pl, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from sparsezip_pl.api import build_config  # noqa: E402
from sparsezip_pl.data import synthetic as S  # noqa: E402
from sparsezip_pl.models import CompressedLlava, load_backend  # noqa: E402
import training_world as W  # noqa: E402

DEFAULT_METHODS = (
    ["configs/methods/visionzip.yaml"],
    ["configs/demo/sparsezip.yaml"],
)


def compressor_settings(paths: list[str]) -> dict:
    """The ``model.compressor`` block of config files layered in order (nested blocks merged)."""
    merged: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            block = (yaml.safe_load(f) or {}).get("model", {}).get("compressor", {})
        for key, value in block.items():
            if isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="checkpoints/tiny-llava-synth")
    parser.add_argument("--config", action="append", help="a config file; repeat to layer (default: the demo's methods)")
    parser.add_argument("--seed", type=int, default=4321, help="world seed of the scenes")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tiny_llava import normalize_images

    backend = load_backend("hf", args.model_path)
    scenes = [S.sample_scene(S.rng_for(args.seed, "extra", i)) for i in range(args.images)]
    pixels = torch.from_numpy(normalize_images(np.stack([W.jpeg_roundtrip(S.render(s)) for s in scenes])))
    patches = [[W.object_patches(o) for o in s.objects] for s in scenes]
    methods = [args.config] if args.config else DEFAULT_METHODS

    print(f"{args.images} scenes of world seed {args.seed}, model {args.model_path}\n")
    print("| method | tokens / image | object patches kept: small | large | objects with a kept patch |")
    print("|---|---:|---:|---:|---:|")
    for paths in methods:
        model = CompressedLlava(backend, build_config(compressor_settings(paths))).eval()
        with torch.no_grad():
            out = model.compress(pixels)
        kept_share = {True: [], False: []}
        touched = []
        for b, scene in enumerate(scenes):
            kept = out.kept_indices[b]
            kept = set(kept[kept >= 0].tolist())
            for obj, cells in zip(scene.objects, patches[b]):
                hit = len(kept.intersection(cells.tolist()))
                kept_share[obj.small].append(hit / max(1, len(cells)))
                touched.append(hit > 0)
        tokens = out.mask.sum(1).float().mean().item()
        print(f"| {' + '.join(paths)} | {tokens:.1f} | {100 * np.mean(kept_share[True]):.1f}% "
              f"| {100 * np.mean(kept_share[False]):.1f}% | {100 * np.mean(touched):.1f}% |")


if __name__ == "__main__":
    main()
