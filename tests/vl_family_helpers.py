"""Shared pieces of the LLaVA-OneVision and Qwen2.5-VL family tests: samples with images of given
sizes, the stock processor's inputs for the same prompts, a no-cache recompute of a generation,
and a tiny MME run through the Lightning CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

QUESTIONS = ["What is shown in this image?", "Is there a dog in the image? Answer yes or no."]


def image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8))


def samples_of(sizes: list[tuple[int, int]]) -> list[dict]:
    """Sample dicts (the data contract) with random images of ``sizes`` (H, W)."""
    return [
        {"sample_id": f"s{i}", "task": "mme", "category": "test", "image": image(h, w, i), "image_path": None,
         "question": QUESTIONS[i % len(QUESTIONS)], "answer": None, "conversations": None, "pair_id": f"p{i}"}
        for i, (h, w) in enumerate(sizes)
    ]


def processor_inputs(processor, samples: list[dict]) -> dict:
    """What a user hands the stock model: the processor's output for the samples' chat prompts."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}],
            add_generation_prompt=True,
        )
        for s in samples
    ]
    return dict(processor(images=[s["image"] for s in samples], text=prompts, return_tensors="pt", padding=True))


def first_eos_cut(tokens: torch.Tensor, eos) -> list[list[int]]:
    """Each row's tokens up to and including its first end-of-sequence id."""
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    rows = []
    for row in tokens.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


@torch.no_grad()
def recompute_greedy(compressed, batch: dict, steps: int) -> torch.Tensor:
    """Greedy tokens computed without a KV cache: the whole spliced sequence is run again for every
    new token, whose position is the last one + 1 (on every rotary row)."""
    family = compressed.backend
    spliced, _ = compressed.prepare_inputs(batch)
    embeds, mask, positions = spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
    new = []
    for _ in range(steps):
        logits = family.language_model(embeds, mask, positions).logits[:, -1]
        token = logits.argmax(-1)
        new.append(token)
        embeds = torch.cat([embeds, family.embed_tokens(token[:, None]).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    return torch.stack(new, dim=1)


def write_cli_config(tmp_path: Path, family: str, model_path: str, mme_root: Path, compressor: dict) -> str:
    config = {
        "model": {"backend": family, "model_path": model_path, "max_new_tokens": 3, "compressor": compressor},
        "trainer": {
            "accelerator": "cpu",
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": family}},
            "enable_progress_bar": False,
        },
        # The kept-token pictures draw LLaVA-1.5's single square view only.
        "pictures": {"num_images": 0},
        "data": {"class_path": "sparsezip_pl.lit.datamodules.MMEDataModule",
                 "init_args": {"root": str(mme_root), "batch_size": 4}},
    }
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)
