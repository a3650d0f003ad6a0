"""The shipped tiny LLaVA: a plain llava-hf folder the hf backend loads, 576 image tokens, and it
answers the synthetic world as documented through the project's own `test` command.

How it was trained (and the lab's own checks of that) is examples/tiny_llava's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparsezip_pl.data import synthetic as S
from sparsezip_pl.benchmarks.mme import parse_mme_answer

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "checkpoints" / "tiny-llava-synth"
# the held-out slice: a fresh world from the card's held-out seed, read back from its files
SLICE = dict(n_mme_images=10, n_pope_images=10, n_instruct=0)
FAMILIES = [f"mme/{f}" for f in S.MME_FAMILIES] + [f"pope/{s}" for s in S.POPE_SPLITS]

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


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


def test_folder_size_and_pointer_to_the_card():
    size = sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file())
    assert size <= 25e6
    readme = (CKPT / "README.md").read_text()
    assert "examples/tiny_llava/MODEL_CARD.md" in readme
    assert (REPO / "examples" / "tiny_llava" / "MODEL_CARD.md").is_file()


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
    assert parse_mme_answer(answer) in ("yes", "no")


def test_heldout_slice_accuracy_as_documented_through_the_test_command(tmp_path, documented):
    """The demo's evaluation config with all 576 tokens (``none``) on a fresh slice of the card's
    held-out world: the question-weighted accuracy is within the documented margin of the card's."""
    from sparsezip_pl.cli import main

    world = S.generate_world(tmp_path / "heldout", seed=documented["eval_seed"], **SLICE)
    cli = main([
        "test", "--config", str(REPO / "configs/demo/eval.yaml"), "--config", str(REPO / "configs/methods/none.yaml"),
        f"--model.model_path={CKPT}", f"--data.init_args.mme_root={world['mme_root']}",
        f"--data.init_args.pope_source={world['pope_root']}",
        f"--data.init_args.pope_image_dir={world['pope_image_folder']}",
        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.enable_progress_bar=false",
    ])
    results = cli.model.eval_results
    accuracy = {f: float(results[f"test/{f}/{'acc' if f.startswith('mme') else 'accuracy'}"]) for f in FAMILIES}
    questions = {f"mme/{f}": 2 * SLICE["n_mme_images"] for f in S.MME_FAMILIES}
    for split in S.POPE_SPLITS:
        questions[f"pope/{split}"] = len(Path(world["pope_files"][split]).read_text().splitlines())
    overall = sum(accuracy[f] * questions[f] for f in FAMILIES) / sum(questions.values())
    floor = documented["overall_all"] - documented["test_margin"]
    assert overall >= floor, (overall, floor, accuracy)
    # the families the compression demo leans on (small objects) are solid on their own
    for family in ("mme/existence", "pope/random", "pope/popular", "pope/adversarial"):
        assert accuracy[family] >= 85.0, (family, accuracy[family])
