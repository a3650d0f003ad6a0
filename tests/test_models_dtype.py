"""Stock dtype: with method ``none`` both families give exactly the stock model's logits and greedy
tokens in float16 and bfloat16 as well as float32, loaded the way each family's stock loader loads.

The original LLaVA's ``load_pretrained_model`` loads the LLM with ``from_pretrained(torch_dtype=
float16)``, which keeps float32 buffers (the rotary ``inv_freq``) in float32, and leaves the vision
tower in its checkpoint's dtype; casting the whole model with ``.to(dtype)`` would round those
buffers and move the logits (by up to 8e-4 in float16 and 6e-3 in bfloat16 on these models).
"""

import pytest
import torch

from sparsezip_pl.compress import SparseZipConfig
from sparsezip_pl.models import CompressedLlava, load_backend
from sparsezip_pl.models.families.llava import cache_kwarg_compat
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples


def _stock_llava(path, dtype):
    """The original code's model as its stock loader gives it: ``load_pretrained_model`` for
    float16 (its only dtype), the same steps with another ``torch_dtype`` otherwise."""
    from llava.model.builder import load_pretrained_model

    if dtype == torch.float16:
        tokenizer, model, processor, _ = load_pretrained_model(str(path), None, "llava-tiny", device="cpu")
        return tokenizer, model, processor
    from transformers import AutoTokenizer

    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(str(path), dtype=dtype, low_cpu_mem_usage=True)
    tower = model.get_vision_tower()
    tower.load_model()
    return tokenizer, model.eval(), tower.image_processor


def _stock_llava_inputs(tokenizer, processor, model, sample, dtype):
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + sample["question"])
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    # LLaVA's evaluation scripts pass the images in the model's dtype.
    images = process_images([sample["image"]], processor, model.config).to(dtype)
    return ids, images


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_original_llava_none_equals_its_stock_loader(dtype, monkeypatch):
    torch_dtype = getattr(torch, dtype)
    path = cached_tiny_llava("llava", image_size=112)
    monkeypatch.chdir(path)  # the stock loader resolves the relative mm_vision_tower from here
    backend = load_backend("llava", path, dtype=dtype)
    tokenizer, stock, processor = _stock_llava(path, torch_dtype)
    rotary = [m for name, m in backend.model.named_modules() if name.endswith("rotary_emb")]
    assert rotary and all(m.inv_freq.dtype == torch.float32 for m in rotary), "buffers stay float32"
    assert backend.dtype == torch_dtype
    assert backend.vision_tower.dtype == stock.get_vision_tower().vision_tower.dtype

    model = CompressedLlava(backend, SparseZipConfig(method="none"))
    sample = synthetic_samples(1, seed=5)[0]
    batch = backend.batch_builder("generate")([sample])
    ids, images = _stock_llava_inputs(tokenizer, processor, stock, sample, torch_dtype)
    assert torch.equal(batch["input_ids"][batch["attention_mask"].bool()], ids[0])
    with torch.no_grad():
        ours = model(batch).logits
        reference = stock(input_ids=ids, images=images).logits
        assert torch.equal(ours, reference)
        generated, _ = model.generate(batch, max_new_tokens=6)
        with cache_kwarg_compat(stock):
            expected = stock.generate(ids, images=images, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_llava_hf_none_equals_from_pretrained(dtype):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch_dtype = getattr(torch, dtype)
    path = cached_tiny_llava("hf", image_size=112)
    backend = load_backend("hf", path, dtype=dtype)
    stock = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(str(path))
    model = CompressedLlava(backend, SparseZipConfig(method="none"))
    sample = synthetic_samples(1, seed=5)[0]
    batch = backend.batch_builder("generate")([sample])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=sample["image"], text=prompt, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(batch).logits, stock(**inputs).logits)
        generated, _ = model.generate(batch, max_new_tokens=6)
        expected = stock.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("family", ["hf", "llava"])
def test_auto_dtype_is_float32_on_cpu(family):
    backend = load_backend(family, cached_tiny_llava(family, image_size=112))
    assert backend.dtype == torch.float32
