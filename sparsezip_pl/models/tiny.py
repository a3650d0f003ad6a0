"""Tiny random-weight LLaVA checkpoints (1.5 and 1.6, both codes), built from configs and saved to a folder.

The folders have the layout of real checkpoints, so :func:`sparsezip_pl.models.load_backend`
loads them exactly like ``llava-hf/llava-1.5-7b-hf`` (family ``hf``) or ``liuhaotian/llava-v1.5-7b``
(family ``llava``, whose vision tower lives in a separate folder named by ``mm_vision_tower``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from sparsezip_pl.models.tokenizer import IMAGE_TOKEN, build_llama_tokenizer

# The chat template that llava-hf/llava-1.5-*-hf ship with their processor.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# CLIP's normalization constants (openai/clip-vit-large-patch14-336).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VISION_TOWER_FOLDER = "vision_tower"

TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is shown in the image? ASSISTANT: The image shows a red bus on a street.",
    "Is there a dog in the image? Answer the question using a single word or phrase. Yes",
    "Is there a cat in the image? Please answer yes or no. No",
    "What color is the car? The car is blue. How many people are there? There are two people.",
    "Describe the scene in detail. A person is riding a bicycle next to a green tree and a white house.",
    "red green blue yellow black white circle square triangle left right top bottom large small",
]


@dataclass
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA. The defaults keep LLaVA-1.5's 336 px / 14 px = 576 patches."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    tokenizer_vocab_size: int = 512
    # A vocabulary larger than the tokenizer's (rows never produced by the tokenizer), e.g.
    # 32000 for a benchmark model of LLaMA's size; None: exactly the tokenizer's length.
    vocab_size: int | None = None
    max_position_embeddings: int = 4096
    feature_layer: int = -2
    # Larger than transformers' 0.02 so random-weight logits have clear argmaxes (stable greedy decoding).
    initializer_range: float = 0.1
    # CLIP scales its own init by this factor; 5 makes a random tower's CLS attention peaked and
    # image-dependent (as a trained tower's is), so dynamic budgets differ between images.
    vision_initializer_factor: float = 5.0
    seed: int = 0


def _vision_config(spec: TinyLlavaSpec):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
        hidden_act="quick_gelu",
        initializer_range=spec.initializer_range,
        initializer_factor=float(spec.vision_initializer_factor),
    )


def clip_image_processor(image_size: int):
    """LLaVA-1.5's image processor (CLIP's: bicubic resize, centre crop, CLIP mean / std) at ``image_size``."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )


def _llama_kwargs(spec: TinyLlavaSpec, tokenizer) -> dict:
    return dict(
        vocab_size=spec.vocab_size or len(tokenizer),
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _greedy_generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llava(
    family: Literal["hf", "llava"],
    folder: str | os.PathLike,
    spec: TinyLlavaSpec | None = None,
    texts: list[str] | None = None,
    **overrides,
) -> Path:
    """Build a tiny random-weight LLaVA of ``family`` and save it to ``folder`` (seeded).

    ``hf``: a ``LlavaForConditionalGeneration`` with its processor (image processor, tokenizer,
    LLaVA-1.5's chat template, 576 ``<image>`` placeholders at 336 px). ``llava``: the original
    code's ``LlavaLlamaForCausalLM`` without tower weights, and a ``CLIPVisionModel`` plus its
    image processor in ``folder/vision_tower`` that the config's ``mm_vision_tower`` names
    (relative to ``folder``). ``overrides`` replace fields of ``spec``. Returns ``folder``.
    """
    spec = TinyLlavaSpec(**{**asdict(spec or TinyLlavaSpec()), **overrides})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama_tokenizer(
        texts or TOKENIZER_CORPUS * 8, folder, vocab_size=spec.tokenizer_vocab_size, add_bos_token=True
    )
    if family == "hf":
        _build_hf(spec, folder, tokenizer)
    elif family == "llava":
        _build_llava(spec, folder, tokenizer)
    else:
        raise ValueError(f"family must be 'hf' or 'llava', got {family!r}")
    (folder / "tiny_spec.json").write_text(json.dumps({"family": family, **asdict(spec)}, indent=2))
    return folder


def _build_hf(spec: TinyLlavaSpec, folder: Path, tokenizer) -> None:
    model, processor = tiny_hf_llava(spec, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def tiny_hf_llava(spec: TinyLlavaSpec, tokenizer):
    """An in-memory random-weight ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` (seeded)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    num_patches = (spec.image_size // spec.patch_size) ** 2
    config = LlavaConfig(
        vision_config=_vision_config(spec).to_dict(),
        text_config=LlamaConfig(**_llama_kwargs(spec, tokenizer)).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.feature_layer,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = _greedy_generation_config(tokenizer)
    processor = LlavaProcessor(
        image_processor=clip_image_processor(spec.image_size),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def _build_llava(spec: TinyLlavaSpec, folder: Path, tokenizer, **config_fields) -> None:
    from transformers import CLIPVisionModel

    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    tower_dir = folder / VISION_TOWER_FOLDER
    torch.manual_seed(spec.seed)
    CLIPVisionModel(_vision_config(spec)).save_pretrained(tower_dir)
    clip_image_processor(spec.image_size).save_pretrained(tower_dir)

    # The fields LLaVA-1.5's training script writes into a liuhaotian checkpoint's config
    # (``config_fields`` replace them: LLaVA-1.6's anyres fields).
    fields = dict(
        mm_vision_tower=str(tower_dir.resolve()),
        mm_hidden_size=spec.vision_hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=spec.feature_layer,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
    )
    config = LlavaConfig(**_llama_kwargs(spec, tokenizer), **{**fields, **config_fields})
    torch.manual_seed(spec.seed + 1)
    # delay_load: the tower is not instantiated, so (like a liuhaotian checkpoint) its
    # weights are not part of the saved LLaVA state dict.
    model = LlavaLlamaForCausalLM(config)
    newline = getattr(model.get_model(), "image_newline", None)
    if newline is not None:
        # The original code creates it with torch.empty (training initialises it): draw it as
        # its initialize_vision_modules does, randn / sqrt(hidden size).
        with torch.no_grad():
            newline.copy_(torch.randn(newline.shape) / newline.numel() ** 0.5)
    model.generation_config = _greedy_generation_config(tokenizer)
    model.config.mm_vision_tower = VISION_TOWER_FOLDER
    model.save_pretrained(folder)


# ------------------------------------------------------------------ LLaVA-NeXT (1.6)
#: LLaVA-1.6's pinpoints ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]) in
#: tiles of the tower's image size; a tiny model scales them with its own image size.
LLAVA_NEXT_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
NEXT_FAMILIES = ("llava-next", "llava-next-original")


def llava_next_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-1.6's pinpoint resolutions for a tower of ``image_size`` px (336 -> the real ones)."""
    return [[rows * image_size, cols * image_size] for rows, cols in LLAVA_NEXT_TILES]


def next_image_processor(image_size: int, pinpoints: list[list[int]]):
    """llava-hf/llava-v1.6-*-hf's image processor (CLIP's resize, crop and mean / std; anyres
    crops of the best pinpoint) at ``image_size``."""
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_pad=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )


def tiny_hf_llava_next(spec: TinyLlavaSpec, tokenizer, pinpoints: list[list[int]] | None = None):
    """An in-memory random-weight ``LlavaNextForConditionalGeneration`` of ``spec``'s sizes and its
    ``LlavaNextProcessor`` (seeded). ``pinpoints`` default to LLaVA-1.6's, scaled to
    ``spec.image_size``; with ``TinyLlavaSpec(image_size=336, vision_hidden_size=1024,
    vision_layers=24, vision_heads=16, ...)`` it has LLaVA-1.6-7B's token geometry (576 patches
    per view, up to 5 views, 2928 stock tokens per image), e.g. for timing."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    pinpoints = pinpoints or llava_next_pinpoints(spec.image_size)
    num_patches = (spec.image_size // spec.patch_size) ** 2
    config = LlavaNextConfig(
        vision_config=_vision_config(spec).to_dict(),
        text_config=LlamaConfig(**_llama_kwargs(spec, tokenizer)).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        image_seq_length=num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.feature_layer,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config = _greedy_generation_config(tokenizer)
    processor = LlavaNextProcessor(
        image_processor=next_image_processor(spec.image_size, pinpoints),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        # llava-hf's vicuna v1.6 processors ship LLaVA-1.5's template ("USER: <image>\n... ASSISTANT:").
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def build_tiny_llava_next(
    folder: str | os.PathLike,
    family: Literal["llava-next", "llava-next-original"] = "llava-next",
    spec: TinyLlavaSpec | None = None,
    pinpoints: list[list[int]] | None = None,
    texts: list[str] | None = None,
    **overrides,
) -> Path:
    """Build a tiny random-weight LLaVA-1.6 of ``family`` and save it to ``folder`` (seeded).

    ``llava-next``: a ``LlavaNextForConditionalGeneration`` with its ``LlavaNextProcessor``
    (llava-hf/llava-v1.6-vicuna-7b-hf's layout). ``llava-next-original``: the original code's
    ``LlavaLlamaForCausalLM`` with ``image_aspect_ratio: anyres``, ``mm_patch_merge_type:
    spatial_unpad`` and the pinpoints (liuhaotian/llava-v1.6-vicuna-7b's config fields), its CLIP
    tower in ``folder/vision_tower``. Pinpoints default to LLaVA-1.6's scaled to the tower's image
    size (56 px: [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]). Returns ``folder``.
    """
    spec = TinyLlavaSpec(**{**asdict(spec or TinyLlavaSpec()), **overrides})
    pinpoints = [list(p) for p in (pinpoints or llava_next_pinpoints(spec.image_size))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama_tokenizer(
        texts or TOKENIZER_CORPUS * 8, folder, vocab_size=spec.tokenizer_vocab_size, add_bos_token=True
    )
    if family == "llava-next":
        model, processor = tiny_hf_llava_next(spec, tokenizer, pinpoints)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    elif family == "llava-next-original":
        _build_llava(spec, folder, tokenizer, image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                     image_grid_pinpoints=pinpoints, tokenizer_model_max_length=4096)
    else:
        raise ValueError(f"family must be one of {NEXT_FAMILIES}, got {family!r}")
    (folder / "tiny_spec.json").write_text(json.dumps({"family": family, "pinpoints": pinpoints, **asdict(spec)}, indent=2))
    return folder


_BUILT: dict[tuple, Path] = {}


def cached_tiny_llava(family: str, **overrides) -> Path:
    """``build_tiny_llava`` into a temporary folder, once per process and set of ``overrides`` (for tests).

    Families other than ``hf`` and ``llava`` build with their own ``build_tiny(folder, **overrides)``
    classmethod (e.g. ``llava-onevision``, ``qwen2.5-vl``)."""
    import atexit
    import shutil
    import tempfile

    key = (family, tuple(sorted(overrides.items())))
    if key not in _BUILT:
        folder = Path(tempfile.mkdtemp(prefix=f"tiny-llava-{family}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        if family in ("hf", "llava"):
            _BUILT[key] = build_tiny_llava(family, folder, **overrides)
        else:
            from sparsezip_pl.models.families import get_family

            _BUILT[key] = Path(get_family(family).build_tiny(folder, **overrides))
    return _BUILT[key]


def cached_tiny_llava_next(family: Literal["llava-next", "llava-next-original"] = "llava-next", **overrides) -> Path:
    """``build_tiny_llava_next`` into a temporary folder, once per process and set of ``overrides``."""
    import atexit
    import shutil
    import tempfile

    key = ("next", family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if key not in _BUILT:
        folder = Path(tempfile.mkdtemp(prefix=f"tiny-{family}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _BUILT[key] = build_tiny_llava_next(folder, family, **overrides)
    return _BUILT[key]


def synthetic_samples(count: int, seed: int = 0, task: str = "mme", with_answer: bool = True) -> list[dict]:
    """Sample dicts (the data contract) with varied synthetic images: noise, flat colour, boxes, stripes."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    questions = ["Is there a dog in the image?", "Is there a red circle in the image?", "Is the car blue?"]
    samples = []
    for i in range(count):
        height, width = rng.randint(40, 120, size=2)
        kind = i % 4
        if kind == 0:
            pixels = rng.rand(height, width, 3)
        elif kind == 1:
            pixels = np.ones((height, width, 3)) * rng.rand(3)
        elif kind == 2:
            pixels = np.zeros((height, width, 3))
            pixels[height // 4 : height // 2, width // 4 : width // 2] = rng.rand(3)
        else:
            pixels = np.zeros((height, width, 3))
            pixels[:, ::6] = rng.rand(3)
        samples.append(
            {
                "sample_id": f"{task}-{seed}-{i}",
                "task": task,
                "category": "synthetic",
                "image": Image.fromarray((pixels * 255).astype("uint8")),
                "image_path": None,
                "question": questions[i % len(questions)] + " Answer the question using a single word or phrase.",
                "answer": ("Yes" if i % 2 == 0 else "No") if with_answer else None,
                "conversations": None,
                "pair_id": f"pair-{i // 2}",
            }
        )
    return samples
