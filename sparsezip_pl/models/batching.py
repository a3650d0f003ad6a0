"""Picklable collate functions that turn sample dicts into model batches, per LLaVA family.

A sample (from ``sparsezip_pl.data``) is a dict with ``sample_id``, ``task`` (``mme`` / ``pope`` /
``instruct``), ``category``, ``image`` (PIL RGB or None), ``image_path``, ``question`` (eval
prompt text without ``<image>``), ``answer``, ``conversations`` (instruct: ``[{"from": "human" |
"gpt", "value": ...}]`` with ``<image>`` in the first human turn) and ``pair_id``.

The prompt is rendered with the family's own template (llava-hf's chat template, or the original
code's ``vicuna_v1`` conversation), tokenized once with character offsets, and the rendered
spans of the messages decide which tokens are answer tokens (``labels``) and question tokens
(``question_mask``). Each sample with an image gets exactly one placeholder id in ``input_ids``;
the model expands it into that image's visual tokens.

A prompt that cannot fit the LLM's context (see :class:`ContextLimit`) is never cut: cutting
would drop the question (or the answer) and score garbage. :meth:`BatchBuilder.build` reports it
as a :class:`PromptTooLongError` naming the sample and the lengths; ``__call__`` raises it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsezip_pl.models.splice import IGNORE_INDEX

IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class ContextLimit:
    """How long a prompt may be once its placeholder becomes visual tokens.

    ``max_positions`` is the LLM's context (``max_position_embeddings``, or the tokenizer's
    ``model_max_length`` when smaller); ``visual_tokens`` the most tokens one image can become
    (an upper bound: the compressor's ``T_max``, or N patches for a distillation teacher);
    ``new_tokens`` the tokens generated after the prompt. A prompt is accepted when
    ``text tokens - placeholders + placeholders * visual_tokens + new_tokens <= max_positions``.
    """

    max_positions: int
    visual_tokens: int
    new_tokens: int = 0


class PromptTooLongError(ValueError):
    """A sample whose prompt does not fit the LLM's context; ``reason`` is its skip reason."""

    reason = "prompt_too_long"

    def __init__(self, sample_id: Any, message: str) -> None:
        super().__init__(message)
        self.sample_id = sample_id


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str
    image: bool = False


@dataclass
class Rendered:
    """A prompt string with the character spans of its parts."""

    text: str
    answers: list[tuple[int, int]] = field(default_factory=list)
    questions: list[tuple[int, int]] = field(default_factory=list)


def sample_turns(sample: dict[str, Any], mode: str) -> list[Turn]:
    """The conversation a sample stands for; in ``generate`` mode it ends with a user turn."""
    has_image = sample.get("image") is not None
    conversations = sample.get("conversations")
    if conversations:
        turns = [
            Turn(
                "user" if message["from"] == "human" else "assistant",
                message["value"].replace(IMAGE_MARKER, "").strip(),
            )
            for message in conversations
        ]
        if turns[0].role != "user":  # as LLaVA's preprocessing: a conversation starts with the user
            turns = turns[1:]
    else:
        turns = [Turn("user", (sample.get("question") or "").strip())]
        if mode == "train" and sample.get("answer") is not None:
            turns.append(Turn("assistant", str(sample["answer"]).strip()))
    if mode == "generate":
        while turns and turns[-1].role != "user":
            turns.pop()
        if not turns:
            raise ValueError(f"sample {sample.get('sample_id')!r} has no user turn to answer")
    if has_image:
        turns[0].image = True
    return turns


_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class PromptFormat:
    """Renders turns to text with the family's template."""

    def render_text(self, turns: list[Turn], add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def render(self, turns: list[Turn], add_generation_prompt: bool, eos_token: str | None) -> Rendered:
        """The rendered prompt with the exact character spans of every message.

        The template is rendered once with a private-use sentinel in place of each message, the
        sentinels are then replaced by the messages while their spans are recorded, and the result
        is checked against a plain rendering (a template that rewrites message text fails loudly).
        """
        marked = [Turn(turn.role, _SENTINEL.format(i), turn.image) for i, turn in enumerate(turns)]
        template_text = self.render_text(marked, add_generation_prompt)
        pieces, spans, cursor, length = [], {}, 0, 0
        for match in _SENTINEL_RE.finditer(template_text):
            pieces.append(template_text[cursor : match.start()])
            length += match.start() - cursor
            message = turns[int(match.group(1))].text
            spans[int(match.group(1))] = (length, length + len(message))
            pieces.append(message)
            length += len(message)
            cursor = match.end()
        pieces.append(template_text[cursor:])
        text = "".join(pieces)
        if text != self.render_text(turns, add_generation_prompt):
            raise ValueError(f"{type(self).__name__} does not render messages verbatim; cannot locate answers")
        rendered = Rendered(text)
        for i, turn in enumerate(turns):
            if not turn.text or i not in spans:
                continue
            start, end = spans[i]
            if turn.role == "assistant":
                # The end-of-turn token that the template writes right after an answer is trained too.
                if eos_token and text.startswith(eos_token, end):
                    end += len(eos_token)
                rendered.answers.append((start, end))
            else:
                rendered.questions.append((start, end))
        return rendered


class ChatTemplateFormat(PromptFormat):
    """A transformers chat template (llava-hf's: ``USER: <image>\\n... ASSISTANT: ...``)."""

    def __init__(self, tokenizer, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def render_text(self, turns: list[Turn], add_generation_prompt: bool) -> str:
        if not turns:
            return ""
        messages = []
        for turn in turns:
            content = [{"type": "image"}] if turn.image else []
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )


class ConversationFormat(PromptFormat):
    """A template of the original code's ``llava.conversation.conv_templates`` (default ``vicuna_v1``)."""

    def __init__(self, template: str = "vicuna_v1") -> None:
        self.template = template

    def render_text(self, turns: list[Turn], add_generation_prompt: bool) -> str:
        from llava.conversation import conv_templates

        conversation = conv_templates[self.template].copy()
        roles = {"user": conversation.roles[0], "assistant": conversation.roles[1]}
        for turn in turns:
            # LLaVA's preprocessing puts the image marker first: "<image>\n" + question.
            conversation.append_message(roles[turn.role], f"{IMAGE_MARKER}\n{turn.text}" if turn.image else turn.text)
        if add_generation_prompt:
            conversation.append_message(roles["assistant"], None)
        return conversation.get_prompt()


class Tokenization:
    """Text -> (ids, char offsets), with exactly the placeholder handling of one family."""

    def __init__(self, tokenizer, image_token_id: int, split_on_marker: bool) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        # True: the original code's ``tokenizer_image_token`` (tokenize the chunks around each
        # "<image>" separately, drop their BOS, put the placeholder id between them).
        # False: the tokenizer itself maps "<image>" to one special id (llava-hf).
        self.split_on_marker = split_on_marker

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer(text, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]

    def __call__(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not self.split_on_marker:
            return self._encode(text)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        bos = self.tokenizer.bos_token_id
        position = 0
        strip_bos = False
        for i, chunk in enumerate(text.split(IMAGE_MARKER)):
            chunk_ids, chunk_offsets = self._encode(chunk)
            if i == 0:
                strip_bos = bool(chunk_ids) and chunk_ids[0] == bos
            else:
                ids.append(self.image_token_id)
                offsets.append((position - len(IMAGE_MARKER), position))
                if strip_bos and chunk_ids:
                    chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
            ids.extend(chunk_ids)
            offsets.extend((start + position, end + position) for start, end in chunk_offsets)
            position += len(chunk) + len(IMAGE_MARKER)
        return ids, offsets


def _overlaps(offsets: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    if not spans or offsets.numel() == 0:
        return torch.zeros(offsets.shape[0], dtype=torch.bool)
    bounds = torch.tensor(spans)
    starts, ends = offsets[:, :1], offsets[:, 1:]
    # Zero-width offsets (special tokens such as BOS) belong to no span.
    return ((starts < bounds[:, 1]) & (ends > bounds[:, 0]) & (ends > starts)).any(1)


class ImagePreprocessor:
    """PIL images -> pixel_values [N, 3, H, W]; ``pad_to_square`` is LLaVA-1.5's ``pad`` aspect ratio."""

    def __init__(self, image_processor, pad_to_square: bool) -> None:
        self.image_processor = image_processor
        self.pad_to_square = pad_to_square

    @property
    def size(self) -> tuple[int, int]:
        crop = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        if isinstance(crop, dict):
            if "height" in crop:
                return crop["height"], crop["width"]
            return crop["shortest_edge"], crop["shortest_edge"]
        return crop.height, crop.width

    def __call__(self, images: list) -> torch.Tensor:
        if self.pad_to_square:
            background = tuple(int(x * 255) for x in self.image_processor.image_mean)
            images = [expand2square(image, background) for image in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def batch_fields(self, images: list, has_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's image fields for the RGB ``images`` of the samples where ``has_image`` [B]:
        here ``pixel_values`` [B, 3, H, W] with zeros for text-only samples. Families whose
        processors return more (image sizes, grids) override this, one row per sample."""
        height, width = self.size
        pixel_values = torch.zeros(has_image.shape[0], 3, height, width)
        if images:
            pixel_values[has_image] = self(images).to(pixel_values.dtype)
        return {"pixel_values": pixel_values}


def expand2square(image, background):
    """Pad a PIL image to a square, centred, with ``background`` (as ``llava.mm_utils.expand2square``)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


class BatchBuilder:
    """``list[dict] -> dict`` collate function for one family and one mode (picklable).

    Returns ``input_ids`` [B, T] (left-padded), ``attention_mask`` [B, T], ``labels`` [B, T]
    (``train``: answer tokens, -100 elsewhere), ``question_mask`` [B, T] bool, ``pixel_values``
    [B, 3, H, W] (zeros for text-only samples), ``has_image`` [B] bool and ``meta`` (the sample
    dicts without the PIL image). ``None`` samples are dropped.

    ``context`` (settable after construction) rejects prompts that would not fit the LLM; the
    older ``max_length`` rejects prompts of more text tokens than that. Neither ever truncates.
    """

    def __init__(
        self,
        mode: str,
        prompt_format: PromptFormat,
        tokenization: Tokenization,
        images: ImagePreprocessor,
        pad_token_id: int,
        eos_token: str | None,
        max_length: int | None = None,
        context: ContextLimit | None = None,
    ) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        self.mode = mode
        self.prompt_format = prompt_format
        self.tokenization = tokenization
        self.images = images
        self.pad_token_id = pad_token_id
        self.eos_token = eos_token
        self.max_length = max_length
        self.context = context

    def encode(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One sample -> ids, labels and question mask (1-D tensors)."""
        turns = sample_turns(sample, self.mode)
        rendered = self.prompt_format.render(turns, self.mode == "generate", self.eos_token)
        ids, offsets = self.tokenization(rendered.text)
        ids_t = torch.tensor(ids, dtype=torch.long)
        offsets_t = torch.tensor(offsets, dtype=torch.long).view(-1, 2)
        labels = torch.where(_overlaps(offsets_t, rendered.answers), ids_t, IGNORE_INDEX)
        question = _overlaps(offsets_t, rendered.questions) & (ids_t != self.tokenization.image_token_id)
        num_placeholders = int((ids_t == self.tokenization.image_token_id).sum())
        if num_placeholders != int(sample.get("image") is not None):
            raise ValueError(
                f"sample {sample.get('sample_id')!r}: {num_placeholders} image placeholders in {rendered.text!r}"
            )
        self._check_length(sample, len(ids), num_placeholders)
        return {"input_ids": ids_t, "labels": labels, "question_mask": question}

    def _check_length(self, sample: dict[str, Any], num_ids: int, num_placeholders: int) -> None:
        sample_id = sample.get("sample_id")
        if self.max_length is not None and num_ids > self.max_length:
            raise PromptTooLongError(
                sample_id, f"sample {sample_id!r}: prompt of {num_ids} tokens exceeds max_length={self.max_length}"
            )
        limit = self.context
        if limit is None:
            return
        text = num_ids - num_placeholders
        visual = num_placeholders * limit.visual_tokens
        total = text + visual + limit.new_tokens
        if total > limit.max_positions:
            raise PromptTooLongError(
                sample_id,
                f"sample {sample_id!r}: prompt too long for the LLM: {text} text tokens + up to {visual} visual "
                f"tokens + {limit.new_tokens} generated tokens = {total} > context of {limit.max_positions} positions",
            )

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        """The batch of ``samples``; raises :class:`PromptTooLongError` for a prompt that does not fit."""
        batch, too_long = self.build(samples)
        if too_long:
            raise too_long[0]
        return batch

    def build(self, samples: list[dict[str, Any] | None]) -> tuple[dict[str, Any] | None, list[PromptTooLongError]]:
        """The batch of the samples that fit the context (None if none does) and the errors of those that do not."""
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            raise ValueError("every sample of the batch was None")
        encoded, kept, too_long = [], [], []
        for sample in samples:
            try:
                encoded.append(self.encode(sample))
                kept.append(sample)
            except PromptTooLongError as error:
                too_long.append(error)
        if not kept:
            return None, too_long
        return self._collate(kept, encoded), too_long

    def _collate(self, samples: list[dict[str, Any]], encoded: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        length = max(len(e["input_ids"]) for e in encoded)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        question_mask = torch.zeros((batch_size, length), dtype=torch.bool)
        for row, e in enumerate(encoded):  # left padding
            n = len(e["input_ids"])
            input_ids[row, length - n :] = e["input_ids"]
            attention_mask[row, length - n :] = 1
            labels[row, length - n :] = e["labels"]
            question_mask[row, length - n :] = e["question_mask"]

        has_image = torch.tensor([sample.get("image") is not None for sample in samples], dtype=torch.bool)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "question_mask": question_mask,
        }
        images = [sample["image"].convert("RGB") for sample in samples if sample.get("image") is not None]
        batch.update(self.images.batch_fields(images, has_image))
        batch["has_image"] = has_image
        batch["meta"] = [{k: v for k, v in sample.items() if k != "image"} for sample in samples]
        if self.mode == "train":
            batch["labels"] = labels
        return batch


def llm_context_length(model, tokenizer=None) -> int | None:
    """The positions a LLaVA's LLM can attend over: its ``max_position_embeddings``, or the
    tokenizer's ``model_max_length`` when that is set and smaller (the original LLaVA-1.5 ships
    2048 there, its training length). None when neither is known."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text_config, "max_position_embeddings", None)]
    if tokenizer is not None:
        limits.append(getattr(tokenizer, "model_max_length", None))
    # transformers uses a huge sentinel (1e30) for "no limit".
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**9]
    return min(limits) if limits else None
