"""Random-weight LLaVA models of published shapes for the benchmarks (no download), and a
LLaVA-NeXT-shaped workload built from LLaVA-1.5 weights.

Shapes:

* ``7b``: LLaVA-1.5-7B (CLIP ViT-L/14-336: 24 layers, width 1024, 16 heads, 577 tokens; Vicuna-7B:
  32 layers, width 4096, 32 heads, MLP 11008, vocabulary 32000; projector 1024 -> 4096 -> 4096).
  LLaVA-NeXT-7B (Vicuna) has the same tower, projector and LLM; what differs is how many visual
  tokens reach the LLM (see :class:`FiveViewLlava`).
* ``small``: the same tower, a LLaMA-style LLM scaled down to run on a small CPU (width 1024,
  8 layers, MLP 2816, vocabulary 32000: about 0.16 B parameters).
* ``tiny``: the test suite's tiny LLaVA (4-layer tower of width 64, LLM of width 64), still
  336 px / 14 px = 576 patches per view, with Vicuna-7B's 32 decoder layers, so that an LLM-side
  method's budget (an average over the decoder's layers) maps to the same kept counts as on 7B.

Weights are random: timings are meaningful, generated text is not.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from sparsezip_pl.models.capture import encode_with_capture
from sparsezip_pl.models.families.llava_hf import HFLlavaBackend
from sparsezip_pl.models.loading import freeze
from sparsezip_pl.models.tiny import TOKENIZER_CORPUS, TinyLlavaSpec, synthetic_samples, tiny_hf_llava
from sparsezip_pl.models.tokenizer import build_llama_tokenizer

CLIP_L_336 = dict(
    image_size=336, patch_size=14, vision_hidden_size=1024, vision_intermediate_size=4096, vision_layers=24,
    vision_heads=16,
)


def llava_spec(shape: str) -> TinyLlavaSpec:
    """The :class:`TinyLlavaSpec` of a named shape (``7b``, ``small`` or ``tiny``)."""
    if shape == "tiny":
        return TinyLlavaSpec(text_layers=32)
    common = dict(vocab_size=32000, initializer_range=0.02, vision_initializer_factor=1.0, seed=0, **CLIP_L_336)
    if shape == "7b":
        return TinyLlavaSpec(text_hidden_size=4096, text_intermediate_size=11008, text_layers=32, text_heads=32,
                             text_kv_heads=32, **common)
    if shape == "small":
        return TinyLlavaSpec(text_hidden_size=1024, text_intermediate_size=2816, text_layers=8, text_heads=16,
                             text_kv_heads=16, **common)
    raise ValueError(f"unknown model shape {shape!r}; known: 7b, small, tiny")


def build_llava(spec: TinyLlavaSpec, device: torch.device | str, dtype: torch.dtype) -> HFLlavaBackend:
    """A frozen random-weight LLaVA-1.5 (transformers) of ``spec``'s shape, built on ``device``
    (initialized there: a 7B model never passes through host memory) and cast to ``dtype``."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_llama_tokenizer(TOKENIZER_CORPUS * 8, folder, add_bos_token=True)
    with torch.device(device):
        model, processor = tiny_hf_llava(spec, tokenizer)
    model = freeze(model.to(device=device, dtype=dtype))
    return HFLlavaBackend(model, processor=processor)


class FiveViewLlava(HFLlavaBackend):
    """A LLaVA-NeXT-shaped workload on LLaVA-1.5 weights: every image goes through the tower as 5
    views of 576 patches (LLaVA-NeXT's anyres at 672 x 672: the resized image plus 4 crops), each
    view is compressed on its own (``sample_index`` tells a method which sample a row belongs to),
    and the LLM receives the views' tokens one after another: 2880 visual tokens uncompressed.

    What it leaves out of LLaVA-NeXT: the ``image_newline`` tokens (one per row of the crop grid,
    about 24 here: under 1% of the sequence) and the unpadding of non-square images. The views are
    the image and four flipped or transposed copies of it (the content does not matter for timing).
    A vision-side budget applies per view (a total of 320 tokens is 64 per view, as the NeXT
    scripts of VisPruner and CDPruner count), an LLM-side one to the whole sequence.
    """

    views = 5

    @property
    def max_stock_tokens(self) -> int:
        return self.num_patches * self.views

    def encode_images(self, batch: dict[str, Any], scoring_layers: list[int]):
        pixels = self.pixels_for_tower(batch["pixel_values"])
        views = torch.stack(
            [pixels, pixels.flip(-1), pixels.flip(-2), pixels.flip(-1).flip(-2), pixels.transpose(-1, -2)], dim=1
        ).flatten(0, 1)  # [B * 5, 3, H, W], sample-major
        capture = encode_with_capture(self.vision_tower, views, self.feature_layer, scoring_layers)
        capture.sample_index = torch.arange(pixels.shape[0], device=pixels.device).repeat_interleave(self.views)
        capture.layout = self.views
        return capture

    def visual_inputs(self, compression, layout: Any = None):
        tokens = self.project(compression.tokens)  # [B * 5, T, D]
        rows, width, dim = tokens.shape
        batch = rows // self.views
        shift = torch.arange(self.views, device=tokens.device).repeat(batch).unsqueeze(1) * self.num_patches
        return (
            tokens.reshape(batch, self.views * width, dim),
            compression.mask.reshape(batch, self.views * width),
            (compression.positions + shift).reshape(batch, self.views * width),
            self.num_patches * self.views,
        )


def five_view(backend: HFLlavaBackend) -> FiveViewLlava:
    """The same model and processor seen as :class:`FiveViewLlava`."""
    return FiveViewLlava(backend.model, processor=backend.processor)


def make_batch(backend: HFLlavaBackend, size: int, seed: int = 0) -> dict[str, Any]:
    """A generation batch of ``size`` synthetic samples (one image and a short question each)."""
    batch = backend.batch_builder("generate")(synthetic_samples(size, seed=seed))
    return {key: value.to(backend.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
