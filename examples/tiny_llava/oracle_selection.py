"""How much of the tiny model's MME-style score can any 64 patch tokens keep? An oracle answers.

    python examples/tiny_llava/oracle_selection.py                  # the demo's test world's MME images (seed 1234, 40 per subtask)
    python examples/tiny_llava/oracle_selection.py --seed 4321 --mme-images 20   # the demo's development world's
    python examples/tiny_llava/oracle_selection.py --budgets 64 96 128 192   # where the oracle reaches 95%

It writes the MME part of a synthetic world (``synthetic.generate_world``: with the demo's seed
and size, the demo's test images exactly) and regenerates every image's scene from the seed
(checked: the regenerated JPEG must equal the file on disk byte for byte). The
oracle then keeps the patches the scene's objects cover, most covered first, and fills the rest
of its budget with background patches spread evenly over the image; the tokens go to the LLM at
their original positions. The questions, generation, answer parsing and scoring are the demo's
test path (``MMEDataModule``, the backend's batch builder, ``CompressedLlava.generate``,
``MMEScore``), so the ``none`` and ``sparsezip default`` rows reproduce the demo table's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # this checkout's sparsezip_pl, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

from object_coverage import compressor_settings  # noqa: E402
from sparsezip_pl.api import build_config  # noqa: E402
from sparsezip_pl.compress import CompressionOutput  # noqa: E402
from sparsezip_pl.data import synthetic as S  # noqa: E402
from sparsezip_pl.lit.datamodules import MMEDataModule  # noqa: E402
from sparsezip_pl.benchmarks import MMEScore  # noqa: E402
from sparsezip_pl.models import CompressedLlava, load_backend  # noqa: E402
import training_world as W  # noqa: E402

FAMILIES = S.MME_FAMILIES


def world_scenes(mme_root: Path, seed: int) -> dict[str, S.Scene]:
    """``"family/NNNN.jpg"`` -> the scene ``synthetic.generate_world(seed=...)`` drew for it."""
    per_family = len(list((mme_root / FAMILIES[0]).glob("*.jpg")))
    scenes = {}
    for family, name, scene, _ in S.mme_scenes(seed, per_family):
        path = mme_root / family / f"{name}.jpg"
        if S.jpeg_bytes(S.render(scene)) != path.read_bytes():
            raise ValueError(f"{path}: not the image world seed {seed} draws (pass the world's --seed)")
        scenes[f"{family}/{path.name}"] = scene
    return scenes


def object_cover(scene: S.Scene) -> np.ndarray:
    """[GRID * GRID]: the largest share of each patch one of the scene's objects covers."""
    cover = np.zeros(S.GRID * S.GRID, np.float32)
    for o in scene.objects:
        cover = np.maximum(cover, W.patch_cover(o))
    return cover


def oracle_patches(scene: S.Scene, budget: int) -> np.ndarray:
    """Sorted patch indices: object patches by how much of them objects cover, then background
    patches spread evenly over the rest of the grid, ``budget`` in all."""
    cover = object_cover(scene)
    on_objects = np.flatnonzero(cover > 0)
    on_objects = on_objects[np.argsort(-cover[on_objects], kind="stable")][:budget]
    background = np.setdiff1d(np.arange(S.GRID * S.GRID), on_objects)
    fill = background[np.linspace(0, len(background) - 1, budget - len(on_objects)).round().astype(int)]
    return np.sort(np.concatenate([on_objects, fill]))


class OracleLlava(CompressedLlava):
    """Keeps the patches ``oracle_patches`` names for each image of the batch (no merged tokens)."""

    def __init__(self, backend, scenes: dict[str, S.Scene], budget: int) -> None:
        super().__init__(backend, build_config(method="none"), visual_positions="original")
        self.scenes, self.budget, self.batch_keys = scenes, budget, []

    def compress(self, pixel_values, method=None, text_embeds=None, text_mask=None) -> CompressionOutput:
        stock = super().compress(pixel_values, "none")
        keep = torch.stack([torch.from_numpy(oracle_patches(self.scenes[key], self.budget))
                            for key in self.batch_keys]).to(stock.tokens.device)
        batch, budget = keep.shape
        return CompressionOutput(
            tokens=stock.tokens.gather(1, keep[..., None].expand(-1, -1, stock.tokens.shape[-1])),
            mask=torch.ones(batch, budget, dtype=torch.bool, device=keep.device),
            kept_indices=keep,
            num_dominant=torch.full((batch,), budget, device=keep.device),
            num_contextual=torch.zeros(batch, dtype=torch.long, device=keep.device),
            cluster_map=torch.full_like(stock.cluster_map, -1),
            scores=stock.scores,
            expected_tokens=torch.full((batch,), float(budget), device=keep.device),
            positions=keep,
        )


def mme_total(model: CompressedLlava, backend, datamodule: MMEDataModule) -> tuple[dict, float]:
    """Per-family scores (acc + acc+, 0..200) and the mean visual tokens per image."""
    metric, tokens = MMEScore(), []
    for batch in datamodule.test_dataloader():
        if isinstance(model, OracleLlava):
            model.batch_keys = [f"{m['category']}/{Path(m['image_path']).name}" for m in batch["meta"]]
        generated, compression = model.generate(batch, max_new_tokens=8)
        metric.update_from_samples(batch["meta"], backend.decode(generated))
        tokens += compression.num_tokens.tolist()
    scores = metric.compute()
    return {f: float(scores[f"{f}/score"]) for f in FAMILIES}, float(np.mean(tokens))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="checkpoints/tiny-llava-synth")
    parser.add_argument("--world", default="data/generated/oracle-world", help="where the world is written")
    parser.add_argument("--seed", type=int, default=1234, help="the world's seed (the demo tests on 1234)")
    parser.add_argument("--mme-images", type=int, default=40, help="images per MME subtask (the demo's: 40)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64], help="the oracle's token budgets")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    world = S.generate_world(args.world, seed=args.seed, n_mme_images=args.mme_images, n_pope_images=1, n_instruct=0)
    mme_root = Path(world["mme_root"])
    scenes = world_scenes(mme_root, args.seed)
    backend = load_backend("hf", args.model_path)
    datamodule = MMEDataModule(str(mme_root), subtasks=list(FAMILIES), batch_size=8)
    datamodule.collate_fn = backend.batch_builder("generate")
    default = compressor_settings(["configs/demo/sparsezip.yaml"])
    rows = {
        "none (all 576)": CompressedLlava(backend, build_config(method="none")),
        "sparsezip default, original positions": CompressedLlava(backend, build_config(default),
                                                                 visual_positions="original"),
    }
    for budget in args.budgets:
        rows[f"oracle: object patches + spread background, {budget}, original positions"] = OracleLlava(
            backend, scenes, budget)
    print(f"{len(scenes)} MME-style images of {args.world} (seed {args.seed}), model {args.model_path}\n")
    print("| selection | visual tokens / image | " + " | ".join(FAMILIES) + " | total (/800) | vs all tokens |")
    print("|---|---:|" + "---:|" * (len(FAMILIES) + 2))
    full = None
    for name, model in rows.items():
        scores, tokens = mme_total(model.eval(), backend, datamodule)
        total = sum(scores.values())
        full = full or total
        print(f"| {name} | {tokens:.1f} | " + " | ".join(f"{scores[f]:.1f}" for f in FAMILIES)
              + f" | {total:.1f} | {100 * total / full:.1f}% |", flush=True)
    touched = np.array([(object_cover(scene) > 0).sum() for scene in scenes.values()])
    print(f"\nPatches an object touches, per image: mean {touched.mean():.1f}, median {np.median(touched):.0f}; "
          + ", ".join(f"more than {b} in {100 * (touched > b).mean():.1f}% of the images" for b in args.budgets))


if __name__ == "__main__":
    main()
