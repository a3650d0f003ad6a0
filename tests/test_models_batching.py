"""Batch builders of both families: the stock templates, one placeholder, labels, picklable."""

import pickle

import pytest
import torch

from sparsezip_pl.models import load_backend
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples


@pytest.fixture(scope="module", params=["hf", "llava"])
def backend(request):
    return load_backend(request.param, cached_tiny_llava(request.param, image_size=112))


def _instruct(image):
    return {
        "sample_id": "instruct-0",
        "task": "instruct",
        "category": "conversation",
        "image": image,
        "image_path": None,
        "question": None,
        "answer": None,
        "conversations": [
            {"from": "human", "value": "What is in the picture?\n<image>"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Where is it?"},
            {"from": "gpt", "value": "Top left."},
        ],
        "pair_id": None,
    }


def _decode(backend, ids):
    return backend.tokenizer.decode(ids.clamp(min=0))


def test_generate_batch_layout(backend):
    samples = synthetic_samples(3, with_answer=False)
    batch = backend.batch_builder("generate")([samples[0], None, samples[1], samples[2]])
    assert batch["input_ids"].shape[0] == 3 and "labels" not in batch
    assert [m["sample_id"] for m in batch["meta"]] == [s["sample_id"] for s in samples]
    assert all("image" not in m for m in batch["meta"])
    assert (batch["input_ids"] == backend.image_token_id).sum(1).tolist() == [1, 1, 1]
    assert batch["pixel_values"].shape == (3, 3, 112, 112)
    assert batch["has_image"].tolist() == [True] * 3
    for row, sample in enumerate(samples):
        real = batch["attention_mask"][row].bool()
        assert not real[: (~real).sum()].any(), "left padding"
        assert _decode(backend, batch["input_ids"][row][real]).rstrip().endswith("ASSISTANT:")
        question = _decode(backend, batch["input_ids"][row][batch["question_mask"][row]])
        assert question.replace(" ", "") == sample["question"].replace(" ", "")


def test_train_labels_cover_answers_only(backend):
    image_sample = _instruct(synthetic_samples(1)[0]["image"])
    text_sample = {**_instruct(None), "sample_id": "text-only"}
    batch = backend.batch_builder("train")([image_sample, text_sample])
    eos = backend.tokenizer.eos_token
    for row in range(2):
        labels = batch["labels"][row]
        answer_text = backend.tokenizer.decode(labels[labels != -100])
        expected = f"A red square.{eos} Top left.{eos}" if backend.family == "llava" else "A red square. Top left."
        assert answer_text.replace(" ", "") == expected.replace(" ", "")
    assert batch["has_image"].tolist() == [True, False]
    assert (batch["input_ids"][1] == backend.image_token_id).sum() == 0
    assert torch.all(batch["pixel_values"][1] == 0)
    # The image marker was moved to the front of the first turn, as LLaVA's preprocessing does.
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    position = (first == backend.image_token_id).nonzero().item()
    assert _decode(backend, first[:position]).rstrip().endswith("USER:")


def test_builder_is_picklable(backend):
    builder = backend.batch_builder("train")
    clone = pickle.loads(pickle.dumps(builder))
    samples = synthetic_samples(2)
    a, b = builder(samples), clone(samples)
    for key in ("input_ids", "attention_mask", "labels", "question_mask", "pixel_values", "has_image"):
        assert torch.equal(a[key], b[key])


def test_llava_builder_matches_the_original_preprocessing():
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    backend = load_backend("llava", cached_tiny_llava("llava", image_size=112))
    sample = synthetic_samples(1)[0]
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + sample["question"])
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), backend.tokenizer, return_tensors="pt")
    batch = backend.batch_builder("generate")([sample])
    assert torch.equal(batch["input_ids"][0], ids)
    images = process_images([sample["image"]], backend.image_processor, backend.model.config)
    assert torch.equal(batch["pixel_values"], images)


def test_hf_builder_matches_the_processor():
    from transformers import AutoProcessor

    path = cached_tiny_llava("hf", image_size=112)
    backend = load_backend("hf", path)
    processor = AutoProcessor.from_pretrained(path)
    sample = synthetic_samples(1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    stock = processor(images=sample["image"], text=prompt, return_tensors="pt")
    batch = backend.batch_builder("generate")([sample])
    image_id = backend.image_token_id
    stock_ids = stock["input_ids"][0]
    assert (stock_ids == image_id).sum() == backend.num_patches
    first = (stock_ids == image_id).nonzero()[0].item()
    collapsed = torch.cat([stock_ids[: first + 1], stock_ids[first + backend.num_patches :]])
    assert torch.equal(batch["input_ids"][0], collapsed)
    assert torch.equal(batch["pixel_values"], stock["pixel_values"])
