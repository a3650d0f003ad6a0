"""Numerical safety through the whole model (the compressor alone is covered by
tests/test_compress_*): a tiny LLaVA loaded in bfloat16 and float16 on CPU, fed constant-colour,
1x1 and very thin images, with and without uniform vision attention, trains (loss and gradients
finite) and answers (greedy generation) without NaN or a crash."""

import pytest
import torch
from PIL import Image

from sparsezip_pl.compress import MergingConfig, SparseZipConfig
from sparsezip_pl.lit.module import SparseZipModule
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples

IMAGES = [
    Image.new("RGB", (64, 64), (0, 0, 0)),
    Image.new("RGB", (64, 64), (255, 255, 255)),
    Image.new("RGB", (80, 48), (128, 128, 128)),
    Image.new("RGB", (1, 1), (255, 0, 0)),
    Image.new("RGB", (1, 300), (0, 0, 255)),
]


def _samples():
    samples = synthetic_samples(len(IMAGES), with_answer=True)
    for sample, image in zip(samples, IMAGES):
        sample["image"] = image
    return samples


def _uniform_attention(module) -> None:
    """Zero every vision query: all attention logits are 0, every attention row uniform."""
    for name, layer in module.backend.vision_tower.named_modules():
        if name.endswith("q_proj"):
            layer.weight.data.zero_()
            layer.bias.data.zero_()


@pytest.mark.parametrize(("dtype", "method", "uniform"), [
    ("bfloat16", "sparsezip", False), ("float16", "sparsezip", False),
    ("bfloat16", "visionzip", True), ("float16", "sparsezip", True),
])
def test_half_precision_model_trains_and_answers(dtype, method, uniform):
    config = SparseZipConfig(method=method, k_min=2, k_max=12, dominant=8, merging=MergingConfig(contextual_num=4))
    module = SparseZipModule(model_path=str(cached_tiny_llava("hf", image_size=112)), dtype=dtype, compressor=config,
                             objective="mix", budget_target=8.0, max_new_tokens=3)
    module.configure_model()
    assert module.backend.dtype == getattr(torch, dtype)
    if uniform:
        _uniform_attention(module)
    samples = _samples()

    module.train()
    loss, logs, compression = module._tuning_loss(module.collate_fn("train")(samples))
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in logs.values()), logs
    if method == "sparsezip":  # visionzip has nothing to train
        loss.backward()
    grads = [p.grad for p in module.model.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if method == "sparsezip":
        assert any(g.abs().sum() > 0 for g in grads), "the loss reaches the compressor"
    assert torch.isfinite(compression.tokens).all() and torch.isfinite(compression.scores).all()

    module.eval()
    answered = module._answer(module.collate_fn("generate")(samples))
    records = answered["records"]
    assert [r["sample_id"] for r in records] == [s["sample_id"] for s in samples]
    assert all(isinstance(r["prediction"], str) and r["parsed"] in ("yes", "no", "other") for r in records)
    limit = 1 + (12 if method == "sparsezip" else 8) + 4
    assert all(1 <= r["visual_tokens"] <= limit for r in records)
    assert torch.isfinite(answered["compression"].tokens).all()
