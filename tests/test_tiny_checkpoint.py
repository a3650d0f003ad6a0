"""The shipped tiny LLaVA: llava-hf layout, 576 image tokens, the documented accuracy, and it needs its eyes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparsezip_pl.data import synthetic as S
from sparsezip_pl.demo import evaluate as E
from sparsezip_pl.demo.tiny_llava import check_fast_paths

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llava-synth"
# the held-out slice: a fresh world from the card's held-out seed, read back from its files
SLICE = dict(n_mme_images=10, n_pope_images=10, n_instruct=0)


@pytest.fixture(scope="module")
def documented():
    return json.loads((CKPT / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(1)
    model = LlavaForConditionalGeneration.from_pretrained(CKPT)
    processor = AutoProcessor.from_pretrained(CKPT)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def world(tmp_path_factory, documented):
    seed = documented["eval_seed"]
    return S.generate_world(tmp_path_factory.mktemp("heldout"), seed=seed, **SLICE)


def _overall(results: dict) -> float:
    n = sum(results[f]["n"] for f in E.FAMILIES)
    return sum(results[f]["acc"] * results[f]["n"] for f in E.FAMILIES) / n


def test_folder_size_and_card(documented):
    size = sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file())
    assert size <= 25e6
    assert "examples/tiny_llava/MODEL_CARD.md" in (CKPT / "README.md").read_text()
    card = (CKPT.parents[1] / "examples" / "tiny_llava" / "MODEL_CARD.md").read_text()
    assert f"{documented['params']['total']:,}" in card
    assert documented["command"] in card
    for fam in E.FAMILIES:  # the card's table is the script's measurement
        assert f"| {fam} | {documented['eval']['all'][fam]['acc']:.1f} |" in card


def test_llava_hf_layout_and_576_image_tokens(loaded):
    model, processor = loaded
    c = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert c.vision_config.model_type == "clip_vision_model" and c.text_config.model_type == "llama"
    assert (c.vision_config.image_size, c.vision_config.patch_size) == (336, 14)
    assert c.vision_feature_layer == -2 and c.vision_feature_select_strategy == "default"
    assert c.projector_hidden_act == "gelu"
    q = "Is there a star in the image?" + S.SHORT_ANSWER
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{q} ASSISTANT:"
    turn = processor.apply_chat_template(msgs + [{"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}])
    assert turn == f"USER: <image>\n{q} ASSISTANT: Yes</s>"
    image = Image.fromarray(S.render(S.sample_scene(S.rng_for(9, "extra", 0))))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == c.image_token_id).sum()) == 576
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert E.parse_mme(answer) in ("yes", "no")


def test_training_fast_path_equals_stock_forward(loaded):
    model, processor = loaded
    image = Image.fromarray(S.render(S.sample_scene(S.rng_for(9, "extra", 1))))
    turns = [("Is there a red star in the image?" + S.SHORT_ANSWER, "No"), ("How many stars are there?", "There is one star.")]
    assert check_fast_paths(model, processor, image, turns) < 1e-4


def test_heldout_slice_accuracy_as_documented(loaded, world, documented):
    model, processor = loaded
    res = E.evaluate_world(model, processor, world, honest=True)  # processor + generate, as the hf backend
    floor = documented["overall_all"] - documented["test_margin"]
    assert _overall(res) >= floor, (_overall(res), floor)
    # the families the compression demo leans on (small objects) are solid on their own
    for fam in ("mme_existence", "pope_random", "pope_popular", "pope_adversarial"):
        assert res[fam]["acc"] >= 85.0, (fam, res[fam]["acc"])


def test_careless_token_dropping_costs_accuracy(loaded, world, documented):
    model, processor = loaded
    full = E.evaluate_world(model, processor, world)
    dropped = E.evaluate_world(model, processor, world, keep_policy="random", n_keep=64)
    assert _overall(full) - _overall(dropped) >= 10.0


def test_multi_seed_evaluation_reports_each_world_and_their_mean(tmp_path):
    columns = E.main(["--model-path", str(CKPT), "--seeds", "7", "8", "--mme-images", "2", "--pope-images", "1",
                      "--out", str(tmp_path), "--threads", "1"])
    assert list(columns) == ["seed 7", "seed 8", "mean"]
    assert (tmp_path / "seed7" / "MME_Benchmark_release_version").is_dir()
    for family in E.FAMILIES:
        accs = [columns[f"seed {s}"][family]["acc"] for s in (7, 8)]
        assert columns["mean"][family]["acc"] == pytest.approx(sum(accs) / 2)
        assert columns["seed 7"][family]["n"] == 4 if family.startswith("mme") else columns["seed 7"][family]["n"] > 0


def test_training_builds_the_shipped_tokenizer(tmp_path):
    """`train_tiny_llava` rebuilds its tokenizer from `synthetic.world_texts` on every run, also when it
    continues from saved weights (--init-from): if that corpus drifted with the world's question
    sampler, the continued weights would silently read other token ids."""
    from sparsezip_pl.demo.tiny_llava import build_processor

    build_processor(S.world_texts(0), tmp_path / "build").save_pretrained(tmp_path / "saved")
    built = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert built == json.loads((CKPT / "tokenizer.json").read_text())
