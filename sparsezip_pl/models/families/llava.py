"""``llava``: the original LLaVA code (PyPI ``llava-torch``, imported as ``llava``; liuhaotian/llava-v1.5-*).

``llava`` is imported lazily, so users of the transformers backend never need it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from sparsezip_pl.models.batching import BatchBuilder, ConversationFormat, ImagePreprocessor, Tokenization
from sparsezip_pl.models.families.base import BatchMode, ModelFamily, register_family
from sparsezip_pl.models.loading import (
    ModelNotAvailableError,
    freeze,
    is_offline,
    resolve_dtype,
    resolve_pretrained,
)

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX


def _import_llava():
    try:
        from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    except ImportError as error:
        raise ImportError(
            "the 'llava' backend needs the original LLaVA code: pip install llava-torch --no-deps accelerate"
        ) from error
    return LlavaConfig, LlavaLlamaForCausalLM


@contextlib.contextmanager
def cache_kwarg_compat(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Let the original code's ``forward`` run under transformers' generation loop of any 5.x.

    From transformers 5.24 the generation loop passes the KV cache as ``cache=``, while the original
    ``LlavaLlamaForCausalLM.forward`` only knows ``past_key_values=`` (so even its own ``generate``
    fails with "unexpected keyword argument 'cache'"). Inside this context a forward pre-hook renames
    the keyword for ``model``; the hook is removed on exit, so the model is left as it was. With a
    ``forward`` that accepts ``cache`` the context does nothing.
    """
    if "cache" in inspect.signature(model.forward).parameters:
        yield model
        return

    def rename_cache(module, args, kwargs):
        if "cache" in kwargs:
            kwargs["past_key_values"] = kwargs.pop("cache")
        return args, kwargs

    handle = model.register_forward_pre_hook(rename_cache, with_kwargs=True)
    try:
        with warnings.catch_warnings():
            # The original code passes ``past_key_values`` to transformers, which now warns about it
            # on every call; nothing a user can act on.
            warnings.filterwarnings("ignore", message=r".*`past_key_values`.*", category=FutureWarning)
            yield model
    finally:
        handle.remove()


@register_family("llava", aliases=("llava-original",))
class OriginalLlavaBackend(ModelFamily):
    """The original code's ``LlavaLlamaForCausalLM``: ``vicuna_v1`` template, -200 placeholder, ``pad`` images."""

    #: whether the family handles LLaVA-1.6's anyres images (``llava-next-original`` does)
    anyres: bool = False

    def __init__(self, model, tokenizer=None, image_processor=None, conv_template: str = "vicuna_v1") -> None:
        if getattr(model.config, "image_aspect_ratio", None) == "anyres" and not self.anyres:
            raise ValueError("an 'anyres' (LLaVA-1.6) checkpoint: use the family 'llava-next-original'")
        wrapper = model.get_vision_tower()
        if wrapper is None or not getattr(wrapper, "is_loaded", False):
            raise ValueError("the model's vision tower is not loaded (call get_vision_tower().load_model())")
        image_processor = image_processor or getattr(wrapper, "image_processor", None)
        self.conv_template = conv_template
        super().__init__(model, tokenizer, image_processor)

    @classmethod
    def matches(cls, model) -> bool:
        """The original code's models, except LLaVA-1.6's anyres ones (family ``llava-next-original``)."""
        original = hasattr(model, "prepare_inputs_labels_for_multimodal") or type(model).__module__.startswith("llava.")
        return original and getattr(getattr(model, "config", None), "image_aspect_ratio", None) != "anyres"

    @classmethod
    def read_configs(cls, model_path: str | os.PathLike) -> tuple[dict, object]:
        """The checkpoint's ``config.json`` (a dict) and its vision tower's ``CLIPVisionConfig``,
        without loading weights."""
        import json

        from huggingface_hub import hf_hub_download
        from transformers import CLIPVisionConfig

        path = resolve_pretrained(model_path, "LLaVA checkpoint (original llava code)")
        folder = Path(path)
        config_file = folder / "config.json" if folder.is_dir() else Path(hf_hub_download(path, "config.json"))
        config = json.loads(config_file.read_text(encoding="utf-8"))
        tower = config.get("mm_vision_tower")
        if tower is None:
            raise ValueError(f"{config_file}: no 'mm_vision_tower' (is this an original LLaVA checkpoint?)")
        if folder.is_dir() and not Path(tower).is_absolute() and (folder / tower).is_dir():
            tower = str(folder / tower)
        vision = CLIPVisionConfig.from_pretrained(resolve_pretrained(tower, f"vision tower of {model_path}"),
                                                  local_files_only=is_offline())
        return config, vision

    @classmethod
    def patch_count(cls, model_path: str | os.PathLike) -> int:
        _, vision = cls.read_configs(model_path)
        return (vision.image_size // vision.patch_size) ** 2

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        vision_tower: str | os.PathLike | None = None,
        conv_template: str = "vicuna_v1",
        **kwargs,
    ) -> OriginalLlavaBackend:
        """Load as ``llava.model.builder.load_pretrained_model`` does for a full (non-LoRA) checkpoint.

        The steps are the stock loader's: the slow tokenizer; the LLM by ``from_pretrained`` in
        ``dtype`` (``"auto"``: float16 on a GPU, the stock loader's only dtype, float32 on a CPU),
        which leaves float32 buffers such as the rotary ``inv_freq`` in float32; the optional
        image tokens; then the vision tower from ``mm_vision_tower`` in its own checkpoint's
        dtype, not cast (the stock loader casts it only when given an explicit ``device_map``).
        Nothing is cast with ``.to(dtype)`` afterwards: that would also round those buffers.

        The checkpoint holds no tower weights: the tower loads from ``mm_vision_tower`` (a hub id
        such as openai/clip-vit-large-patch14-336, or a folder; a relative folder is looked up
        inside the checkpoint folder), or from ``vision_tower`` when given.
        """
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

        llava_config_cls, model_cls = _import_llava()
        path = resolve_pretrained(model_path, "LLaVA checkpoint (original llava code)")
        offline = is_offline()
        config = llava_config_cls.from_pretrained(path, local_files_only=offline)
        tower_name = str(vision_tower or config.mm_vision_tower)
        if not Path(tower_name).is_absolute() and (Path(path) / tower_name).is_dir():
            tower_name = str(Path(path) / tower_name)
        try:
            tower_name = resolve_pretrained(tower_name, f"vision tower of {model_path}")
        except ModelNotAvailableError as error:
            raise ModelNotAvailableError(
                f"{error}\n(A liuhaotian LLaVA checkpoint holds no vision-tower weights; they load from its "
                "config's mm_vision_tower, or pass vision_tower=FOLDER.)"
            ) from None
        # The original code only accepts an existing folder or an openai/laion hub id here.
        config.mm_vision_tower = tower_name
        device = torch.device(device)
        dtype = resolve_dtype(dtype, device, torch.float16)
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, local_files_only=offline)
        model = model_cls.from_pretrained(
            path, config=config, dtype=dtype, low_cpu_mem_usage=True, local_files_only=offline, **kwargs
        )
        # As load_pretrained_model: optional extra tokens, then the tower.
        extra = []
        if getattr(config, "mm_use_im_patch_token", True):
            extra.append("<im_patch>")
        if getattr(config, "mm_use_im_start_end", False):
            extra += ["<im_start>", "<im_end>"]
        if extra:
            tokenizer.add_tokens(extra, special_tokens=True)
            model.resize_token_embeddings(len(tokenizer))
        wrapper = model.get_vision_tower()
        if not wrapper.is_loaded:
            # The body of CLIPVisionTower.load_model, with the offline flag.
            wrapper.image_processor = CLIPImageProcessor.from_pretrained(tower_name, local_files_only=offline)
            wrapper.vision_tower = CLIPVisionModel.from_pretrained(tower_name, local_files_only=offline)
            wrapper.vision_tower.requires_grad_(False)
            wrapper.is_loaded = True
        model = freeze(model.to(device))
        return cls(model, tokenizer, conv_template=conv_template)

    @property
    def feature_layer(self) -> int:
        return self.model.config.mm_vision_select_layer

    @property
    def select_strategy(self) -> str:
        select = getattr(self.model.config, "mm_vision_select_feature", "patch")
        return {"patch": "default", "cls_patch": "full"}.get(select, select)

    @property
    def image_token_id(self) -> int:
        return IMAGE_TOKEN_INDEX

    @property
    def image_aspect_ratio(self) -> str:
        return getattr(self.model.config, "image_aspect_ratio", "square")

    def pixels_for_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """In the LLM's dtype first, as LLaVA's evaluation scripts pass ``images`` (the tower, which
        may keep another dtype, then casts them again)."""
        return pixel_values.to(device=self.device, dtype=self.dtype)

    def language_model(self, *args, **kwargs):
        with cache_kwarg_compat(self.model):
            return super().language_model(*args, **kwargs)

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        with cache_kwarg_compat(self.model):
            return super().generate(inputs_embeds, attention_mask, **kwargs)

    stock_generate_returns_prompt = False  # the original generate returns the new ids only

    def batch_from_stock_inputs(self, input_ids, attention_mask, images, **extra):
        """One -200 placeholder per image already; the original code pads on the right."""
        input_ids = input_ids.to(self.device)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        has_image = ((input_ids == self.image_token_id) & real).any(1)
        return self._pack_stock_inputs(input_ids, real, real, has_image, images, extra.get("question_mask"))

    def batch_builder(self, mode: BatchMode, max_length: int | None = None) -> BatchBuilder:
        if self.tokenizer is None or self.image_processor is None:
            raise ValueError("batch_builder needs the tokenizer and image processor (load with load_backend)")
        if self.image_aspect_ratio not in ("pad", "square", None):
            raise NotImplementedError(f"image_aspect_ratio {self.image_aspect_ratio!r} (LLaVA-1.5 uses 'pad')")
        return BatchBuilder(
            mode,
            ConversationFormat(self.conv_template),
            Tokenization(self.tokenizer, self.image_token_id, split_on_marker=True),
            ImagePreprocessor(self.image_processor, pad_to_square=self.image_aspect_ratio == "pad"),
            pad_token_id=self.pad_token_id,
            eos_token=self.tokenizer.eos_token,
            max_length=max_length,
        )
