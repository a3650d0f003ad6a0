"""The two-line API on stock inputs of both families."""

import pytest
import torch

from sparsezip_pl.api import build_config, sparsezip, unwrap
from sparsezip_pl.compress import SparseZipConfig
from sparsezip_pl.models import CompressedLlava, load_backend
from sparsezip_pl.models.families.llava import cache_kwarg_compat
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples


@pytest.fixture(scope="module", params=["hf", "llava"])
def backend(request):
    return load_backend(request.param, cached_tiny_llava(request.param))


def _stock_inputs(backend, samples):
    """What a user of the stock model passes to ``generate`` (batched, the family's own padding)."""
    if backend.family == "hf":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(backend.model.name_or_path)
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}],
                add_generation_prompt=True,
            )
            for s in samples
        ]
        return dict(processor(images=[s["image"] for s in samples], text=prompts, padding=True, return_tensors="pt"))
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    ids = []
    for s in samples:
        conv = conv_templates["vicuna_v1"].copy()
        conv.append_message(conv.roles[0], "<image>\n" + s["question"])
        conv.append_message(conv.roles[1], None)
        ids.append(tokenizer_image_token(conv.get_prompt(), backend.tokenizer, return_tensors="pt"))
    length = max(len(i) for i in ids)
    # The original code pads on the right (its tokenizer_padding_side).
    input_ids = torch.stack([torch.cat([i, i.new_zeros(length - len(i))]) for i in ids])
    attention_mask = torch.stack([torch.arange(length) < len(i) for i in ids]).long()
    images = process_images([s["image"] for s in samples], backend.image_processor, backend.model.config)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "images": images}


def _new_tokens(backend, inputs, output):
    return output[:, inputs["input_ids"].shape[1] :] if backend.family == "hf" else output


def test_wrapped_generate_equals_compressed_llava(backend):
    samples = synthetic_samples(3, seed=5)
    model = sparsezip(backend.model, method="visionzip", dominant=20, contextual=6)
    assert model.sparsezip.config.visionzip.dominant == 20 and model.sparsezip.config.visionzip.contextual == 6
    inputs = _stock_inputs(backend, samples)
    output = model.generate(**inputs, max_new_tokens=5)
    if backend.family == "hf":
        assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    reference = CompressedLlava(backend, model.sparsezip.config)
    expected, _ = reference.generate(backend.batch_builder("generate")(samples), max_new_tokens=5)
    assert torch.equal(_new_tokens(backend, inputs, output), expected)


def test_wrapped_method_none_equals_stock_generate(backend):
    sample = synthetic_samples(1, seed=7)
    inputs = _stock_inputs(backend, sample)
    stock_inputs = dict(inputs)
    if backend.family == "llava":
        stock_inputs = {"inputs": inputs["input_ids"], "images": inputs["images"]}
    with cache_kwarg_compat(backend.model):  # the original code's generate needs it on transformers >= 5.24
        stock = backend.model.generate(**stock_inputs, max_new_tokens=6, do_sample=False)
    wrapped = sparsezip(backend.model, method="none")
    assert torch.equal(wrapped.generate(**inputs, max_new_tokens=6), stock)


def test_unwrap_and_proxies_leave_the_stock_model_untouched(backend):
    model = backend.model
    forward, generate = type(model).forward, type(model).generate
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    wrapped = sparsezip(model, method="sparsezip", k_max=32, dynk={"scale": 0.25})
    assert wrapped.sparsezip.config.sparsezip.dynk.scale == 0.25 and wrapped.sparsezip.config.sparsezip.k_max == 32
    assert unwrap(wrapped) is model
    assert unwrap(model) is model
    assert wrapped.config is model.config
    assert wrapped.get_input_embeddings() is model.get_input_embeddings()
    assert wrapped.family == backend.family
    wrapped.generate(**_stock_inputs(backend, synthetic_samples(1)), max_new_tokens=2)
    assert type(model).forward is forward and type(model).generate is generate
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    with pytest.raises(TypeError, match="already wrapped"):
        sparsezip(wrapped)


def test_build_config_rejects_unknown_fields():
    assert build_config(method="none").method == "none"
    legacy = build_config(SparseZipConfig(dominant=5), contextual=3)  # the flat config of earlier versions
    assert legacy.sparsezip.dominant == 5 and legacy.sparsezip.merging.contextual_num == 3
    visionzip = build_config(method="visionzip", dominant=54, contextual=10, budget=None)
    assert (visionzip.visionzip.dominant, visionzip.visionzip.contextual) == (54, 10)
    assert build_config(method="visionzip", budget=128).budget == 128
    with pytest.raises(TypeError, match="has no option"):
        build_config(not_a_field=1)
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods: .*visionzip"):
        build_config(method="nope")


QUESTION_FAMILIES = {"hf": [(336, 336), (200, 300)], "llava-next": [(60, 100), (130, 50)],
                     "llava-onevision": [(80, 120), (150, 60)], "qwen2.5-vl": [(80, 120), (150, 60)]}


@pytest.mark.parametrize("family_name", list(QUESTION_FAMILIES))
def test_question_mask_gives_text_aware_methods_the_clis_question(family_name):
    """``question_mask=`` over the user's ``input_ids`` reaches the batch as the CLI's own question
    (the same tokens, after the image placeholders are collapsed and the rows left-packed); without
    it the question is every text token. Through the API, CDPruner then answers as in the CLI."""
    from vl_family_helpers import processor_inputs, samples_of

    from sparsezip_pl.models import CompressedLlava, load_family
    from sparsezip_pl.models.tiny import cached_tiny_llava_next

    path = cached_tiny_llava_next(family_name, image_size=56) if "next" in family_name else cached_tiny_llava(family_name)
    family = load_family(family_name, str(path))
    samples = samples_of(QUESTION_FAMILIES[family_name])
    cli = family.batch_builder("generate")(samples)
    inputs = processor_inputs(family.processor, samples)
    ids = inputs["input_ids"]
    question_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(len(samples)):  # the user marks the question's tokens in their own ids
        question = cli["input_ids"][row][cli["question_mask"][row]].tolist()
        start = next(i for i in range(ids.shape[1]) if ids[row, i:i + len(question)].tolist() == question)
        question_mask[row, start:start + len(question)] = True
    extra = {name: inputs[name] for name in family.stock_input_names if name in inputs}

    def batch(**kwargs):
        return family.batch_from_stock_inputs(ids, inputs["attention_mask"], inputs["pixel_values"], **extra, **kwargs)

    marked, default = batch(question_mask=question_mask), batch()
    assert torch.equal(marked["input_ids"], cli["input_ids"])
    assert torch.equal(marked["question_mask"], cli["question_mask"])
    assert (default["question_mask"] & ~marked["question_mask"]).any(1).all()  # roles and template words too
    with pytest.raises(ValueError, match="question_mask has shape"):
        batch(question_mask=question_mask[:, 1:])
    with pytest.raises(ValueError, match=r"marks no text token in row\(s\) \[1\]"):
        batch(question_mask=question_mask & (torch.arange(len(samples)) == 0)[:, None])

    if family_name == "hf":
        config = {"method": "cdpruner", "budget": 8}
        wrapped = sparsezip(family.model, **config)
        try:
            through_api = wrapped.generate(**inputs, question_mask=question_mask, max_new_tokens=4)[:, ids.shape[1]:]
        finally:
            unwrap(wrapped)
        expected, _ = CompressedLlava(family, config).generate(cli, max_new_tokens=4)
        assert torch.equal(through_api, expected)
