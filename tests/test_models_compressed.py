"""CompressedLlava on tiny models of both families: stock equality, per-sample budgets, training."""

import pytest
import torch

from sparsezip_pl.compress import SparseZipConfig
from sparsezip_pl.models import CompressedLlava, load_backend
from sparsezip_pl.models.families.llava import cache_kwarg_compat
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples

FAMILIES = ["hf", "llava"]


@pytest.fixture(scope="module", params=FAMILIES)
def backend(request):
    """112 px (64 patches): enough room for budgets to differ between images."""
    return load_backend(request.param, cached_tiny_llava(request.param, image_size=112))


@pytest.fixture(scope="module", params=FAMILIES)
def backend_576(request):
    """LLaVA-1.5's geometry: 336 px / 14 px = 576 patches."""
    return load_backend(request.param, cached_tiny_llava(request.param))


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _stock_inputs(backend, sample):
    """The stock model's own inputs for one sample (processor / original preprocessing)."""
    if backend.family == "hf":
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(backend.model.name_or_path)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        return dict(processor(images=sample["image"], text=prompt, return_tensors="pt"))
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + sample["question"])
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), backend.tokenizer, return_tensors="pt")[None]
    images = process_images([sample["image"]], backend.image_processor, backend.model.config)
    return {"input_ids": ids, "images": images}


def _stock_new_tokens(backend, inputs, max_new_tokens):
    if backend.family == "hf":
        out = backend.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[:, inputs["input_ids"].shape[1] :]
    # The original generate takes the ids as ``inputs`` and returns only the new tokens. Under
    # transformers >= 5.24 it needs the keyword shim the backend itself uses (see cache_kwarg_compat).
    with cache_kwarg_compat(backend.model):
        return backend.model.generate(
            inputs["input_ids"], images=inputs["images"], max_new_tokens=max_new_tokens, do_sample=False
        )


def test_method_none_equals_the_stock_model(backend_576):
    backend = backend_576
    model = CompressedLlava(backend, SparseZipConfig(method="none"))
    sample = synthetic_samples(1, seed=3)[0]
    stock = _stock_inputs(backend, sample)
    if backend.family == "hf":
        assert (stock["input_ids"] == backend.image_token_id).sum() == 576
    batch = backend.batch_builder("generate")([sample])
    with torch.no_grad():
        ours = model(batch)
        reference = backend.model(**stock)
    assert ours.compression.num_tokens.tolist() == [576]
    assert torch.equal(ours.logits, reference.logits)
    generated, _ = model.generate(batch, max_new_tokens=8)
    assert torch.equal(generated, _stock_new_tokens(backend, stock, 8))


def test_method_none_override_is_the_stock_path(backend):
    compressed = CompressedLlava(backend, SparseZipConfig(method="visionzip", dominant=12))
    stock = CompressedLlava(backend, SparseZipConfig(method="none"))
    batch = backend.batch_builder("train")(synthetic_samples(2))
    with torch.no_grad():
        teacher = compressed(batch, method="none")
        reference = stock(batch)
    assert torch.equal(teacher.logits, reference.logits)
    assert torch.equal(teacher.labels, reference.labels)
    assert teacher.compression.num_tokens.tolist() == [64, 64]


def test_batch_with_different_budgets_matches_each_sample_alone(backend):
    model = CompressedLlava(backend, SparseZipConfig())  # SparseZip with dynamic K
    samples = synthetic_samples(4, seed=0)
    builder = backend.batch_builder("generate")
    batch = builder(samples)
    with torch.no_grad():
        together = model(batch)
    generated, compression = model.generate(batch, max_new_tokens=6)
    budgets = compression.num_tokens.tolist()
    assert len(set(budgets)) > 1, f"budgets should differ between images, got {budgets}"
    for row, sample in enumerate(samples):
        alone_batch = builder([sample])
        with torch.no_grad():
            alone = model(alone_batch)
        alone_generated, alone_compression = model.generate(alone_batch, max_new_tokens=6)
        assert alone_compression.num_tokens.tolist() == [budgets[row]]
        assert torch.equal(generated[row], alone_generated[0])
        real = together.attention_mask[row].bool()
        torch.testing.assert_close(together.logits[row][real], alone.logits[0], rtol=1e-4, atol=1e-4)


def test_llm_receives_exactly_the_real_visual_tokens(backend, monkeypatch):
    model = CompressedLlava(backend, SparseZipConfig())
    batch = backend.batch_builder("generate")(synthetic_samples(3, seed=1))
    received = {}
    original = backend.language_model

    def spy(inputs_embeds, attention_mask, position_ids=None, labels=None, **kwargs):
        received.update(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return original(inputs_embeds, attention_mask, position_ids, labels=labels, **kwargs)

    monkeypatch.setattr(backend, "language_model", spy)
    with torch.no_grad():
        out = model(batch)
    compression = out.compression
    expected = 1 + compression.num_dominant + compression.num_contextual
    assert torch.equal(compression.num_tokens, expected)
    assert torch.equal(out.visual_mask.sum(1), expected)
    text_tokens = batch["attention_mask"].sum(1) - 1  # the placeholder is replaced
    assert torch.equal(received["attention_mask"].sum(1), text_tokens + expected)
    # The visual embeddings are the projected real tokens, in order, and nothing else.
    projected = backend.project(compression.tokens)
    for row in range(3):
        got = received["inputs_embeds"][row][out.visual_mask[row]]
        torch.testing.assert_close(got, projected[row][compression.mask[row]])


def test_labels_mask_prompt_and_image(backend):
    model = CompressedLlava(backend, SparseZipConfig(method="visionzip", dominant=10))
    batch = backend.batch_builder("train")(synthetic_samples(2))
    with torch.no_grad():
        out = model(batch)
    assert torch.all(out.labels[out.visual_mask] == -100)
    assert torch.all(out.labels[out.attention_mask == 0] == -100)
    eos = backend.tokenizer.eos_token if backend.family == "llava" else ""
    for row, answer in enumerate(["Yes", "No"]):
        labels = out.labels[row]
        assert backend.tokenizer.decode(labels[labels != -100]).replace(" ", "") == answer + eos
    assert out.loss is not None and torch.isfinite(out.loss)


def test_gradients_reach_the_compressor_only(backend):
    config = SparseZipConfig(cross_beta=0.5)
    model = CompressedLlava(backend, config)
    model.train()
    assert not backend.model.training
    batch = backend.batch_builder("train")(synthetic_samples(2))
    out = model(batch)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.compressor.named_parameters()}
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in backend.model.parameters())
    assert all(not p.requires_grad for p in backend.model.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.compressor.parameters()}
    model.compressor.zero_grad(set_to_none=True)


def test_question_embeddings_reach_the_compressor(backend, monkeypatch):
    model = CompressedLlava(backend, SparseZipConfig(cross_beta=1.0))
    batch = backend.batch_builder("generate")(synthetic_samples(2))
    seen = {}
    original = model.compressor.forward

    def record(capture):
        seen.update(text_embeds=capture.text_embeds, text_mask=capture.text_mask)
        return original(capture)

    monkeypatch.setattr(model.compressor, "forward", record)
    with torch.no_grad():
        model(batch)
    assert torch.equal(seen["text_mask"], batch["question_mask"])
    expected = backend.embed_tokens(batch["input_ids"])[batch["question_mask"]]
    torch.testing.assert_close(seen["text_embeds"][seen["text_mask"]], expected.float())


def test_no_hooks_are_left_behind(backend, monkeypatch):
    model = CompressedLlava(backend, SparseZipConfig())
    batch = backend.batch_builder("generate")(synthetic_samples(2))
    before = _hook_count(model)
    for _ in range(2):
        with torch.no_grad():
            model(batch)
        model.generate(batch, max_new_tokens=2)
    assert _hook_count(model) == before

    def boom(*args, **kwargs):
        raise RuntimeError("compressor failed")

    monkeypatch.setattr(model.compressor, "forward", boom)
    with pytest.raises(RuntimeError, match="compressor failed"):
        model(batch)
    assert _hook_count(model) == before


def test_cache_kwarg_compat_renames_only_inside_the_context():
    class OldSignature(torch.nn.Module):  # like the original code's forward: no ``cache`` keyword
        def forward(self, x, past_key_values=None):
            return past_key_values

    class NewSignature(torch.nn.Module):
        def forward(self, x, cache=None):
            return cache

    old, new = OldSignature(), NewSignature()
    with cache_kwarg_compat(old):
        assert old(1, cache="kv") == "kv"
    assert not old._forward_pre_hooks
    with pytest.raises(TypeError, match="cache"):
        old(1, cache="kv")
    with cache_kwarg_compat(new):
        assert not new._forward_pre_hooks and new(1, cache="kv") == "kv"
