"""Shared parts of the families whose towers have no CLS token and whose images differ in token count
(``llava-onevision``, ``qwen2.5-vl``): loading their processors without torchvision, the substitute
for the CLS attention, running a method on rows of different lengths, per-sample image fields for
the prompt builder, and the tiny Qwen2 tokenizer of their test checkpoints.

**The substitute for the CLS attention** (``VisionCapture.attention`` [S, B, h, N] on these towers):
the mean attention each token *receives* in the scoring layer, per head. For every query of a
token's attention group (a SigLIP view; a Qwen window or, in Qwen's full-attention blocks, the
image) the softmax row over the group's keys is taken, and the rows are summed over the group's
queries and divided by the number of tokens of the image (a SigLIP view: of the view): each view's
or image's values sum to 1 per head, like a CLS row. It is computed from the layer's own queries
and keys (rotary embedding applied where the layer applies one) in blocks of queries; no attention
map larger than one block is ever kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsezip_pl.compress.types import CompressionOutput, VisionCapture
from sparsezip_pl.models.batching import BatchBuilder, ImagePreprocessor
from sparsezip_pl.models.loading import is_offline

#: elements of one block of attention scores (queries x keys x heads x groups) in the substitute
ATTENTION_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- processors
class VideoProcessorStub(dict):
    """Stands in for a video processor where torchvision is missing (the OneVision and Qwen2.5-VL
    processors require one). ``save_pretrained`` writes it as a plain dict, so the folder gets the
    ``video_processor`` entry a torchvision install loads normally."""

    _auto_class = None


@contextlib.contextmanager
def allow_missing_video_processor():
    """Let a processor be built with a :class:`VideoProcessorStub` (or None) as its video processor;
    every other sub-processor is still type-checked."""
    from transformers import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, argument):
        if name == "video_processor" and (argument is None or isinstance(argument, VideoProcessorStub)):
            return None
        return original(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def load_processor(path: str, processor_class: type):
    """``AutoProcessor.from_pretrained(path)``; without torchvision (the video processor cannot be
    built) an images-only ``processor_class`` whose ``video_processor`` is None."""
    from transformers import AutoProcessor

    offline = is_offline()
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=offline)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
    with allow_missing_video_processor():
        processor = processor_class.from_pretrained(path, video_processor=VideoProcessorStub(),
                                                    local_files_only=offline)
    processor.video_processor = None
    return processor


def read_config_json(path: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The first of ``names`` found in the checkpoint ``path`` (a folder or a hub id), parsed; None if none."""
    from transformers.utils import cached_file

    for name in names:
        file = os.path.join(path, name) if os.path.isdir(path) else cached_file(
            path, name, local_files_only=is_offline(), _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False)
        if file and os.path.isfile(file):
            with open(file) as handle:
                return json.load(handle)
    return None


def build_qwen2_tokenizer(texts: list[str], special_tokens: list[str], vocab_size: int = 400):
    """A tiny byte-level BPE with Qwen2's pre-tokenizer, as a left-padding ``Qwen2Tokenizer``
    (eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS, ``special_tokens`` added in order)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # padding_side must be a constructor argument: only then is it saved with the tokenizer.
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
                          model_max_length=32768, extra_special_tokens=special_tokens)


TINY_TEXTS = [
    "You are a helpful assistant. What is shown in this image? A cat is sitting on a red mat.",
    "Describe the picture in detail. There are two dogs playing in the park near a white house.",
    "Is there a dog in the image? Answer the question using a single word or phrase. Yes",
    "Is there a red circle in the image? Please answer yes or no. No",
    "Is the car blue? the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 left right top bottom",
] * 16


# -------------------------------------------------------------- the substitute attention
def received_attention(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each token receives, summed over the queries of its group.

    queries, keys [G, L, h, d] (G groups of at most L tokens; a token attends to the valid keys of
    its own group), valid [G, L] bool. Returns [G, h, L] float32: for each key, the sum over the
    group's valid queries of softmax(q k^T * scale) over the group's valid keys (0 on padding).
    Computed in blocks of queries of about :data:`ATTENTION_BLOCK_ELEMENTS` scores each.
    """
    groups, length, heads, _ = queries.shape
    q = queries.transpose(1, 2).float()  # [G, h, L, d]
    k = keys.transpose(1, 2).float()
    key_bias = torch.zeros(groups, 1, 1, length, device=q.device).masked_fill(~valid[:, None, None, :], float("-inf"))
    total = q.new_zeros(groups, heads, length)
    block = max(1, ATTENTION_BLOCK_ELEMENTS // max(1, groups * heads * length))
    for start in range(0, length, block):
        scores = torch.matmul(q[:, :, start:start + block], k.transpose(-1, -2)) * scale + key_bias
        weights = scores.softmax(dim=-1).nan_to_num(0.0)  # padded groups have no valid key
        weights = weights * valid[:, None, start:start + block, None]
        total = total + weights.sum(dim=2)
    return total


# ------------------------------------------------------- methods on rows of different lengths
@dataclass(frozen=True)
class RowGroups:
    """How a capture's rows are grouped for the methods and where their outputs go.

    lengths: tokens of each row (rows are zero-padded to the longest); grids: (rows, cols) of each
    row's token grid (rows of one grid form one group: the methods take fixed-size rows); targets:
    the output row of each capture row (e.g. its sample), or None for the same row; out_rows: the
    number of output rows (rows no capture row maps to are empty: no tokens).
    """

    lengths: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    targets: tuple[int, ...] | None = None
    out_rows: int | None = None


def compress_grouped(method, capture: VisionCapture, groups: RowGroups) -> CompressionOutput:
    """Run ``method`` once per distinct row grid (not per image) and combine the outputs, padded to
    the widest (tokens 0 and masked, kept indices and cluster map -1, scores and positions 0)."""
    rows = len(groups.lengths)
    out_rows = rows if groups.out_rows is None else groups.out_rows
    device = capture.hidden.device
    targets = list(range(rows)) if groups.targets is None else list(groups.targets)
    by_grid: dict[tuple[int, int], list[int]] = {}
    for row, grid in enumerate(groups.grids):
        by_grid.setdefault(tuple(grid), []).append(row)
    if len(by_grid) == 1 and targets == list(range(rows)) and out_rows == rows:
        grid = next(iter(by_grid))
        if grid[0] * grid[1] == capture.hidden.shape[1]:
            # One shape, rows in place: the capture itself (no copies; the stock path then projects
            # the very tensor the tower returned, as the stock model does).
            return method(dataclasses.replace(capture, grid=grid))
    parts = []
    for grid, members in by_grid.items():
        n = grid[0] * grid[1]
        index = torch.tensor(members, device=device)
        sub = VisionCapture(
            hidden=capture.hidden[index, :n],
            queries=None,
            keys=None if capture.keys is None else capture.keys[:, index, :, :n],
            attention=None if capture.attention is None else capture.attention[:, index, :, :n],
            has_cls=False,
            grid=grid,
            text_embeds=None if capture.text_embeds is None else capture.text_embeds[index],
            text_mask=None if capture.text_mask is None else capture.text_mask[index],
            project=capture.project,
            sample_index=None if capture.sample_index is None else capture.sample_index[index],
            layout=capture.layout,
        )
        target = torch.tensor([targets[m] for m in members], device=device)
        parts.append((target, method(sub)))
    return combine_outputs(parts, out_rows, capture.hidden)


def combine_outputs(parts: list[tuple[torch.Tensor, CompressionOutput]], out_rows: int,
                    like: torch.Tensor) -> CompressionOutput:
    """One :class:`CompressionOutput` of ``out_rows`` rows from ``(rows, output)`` parts (gradients
    flow through tokens and expected counts)."""
    device = like.device
    width = max([out.tokens.shape[1] for _, out in parts], default=0)
    kept = max([out.kept_indices.shape[1] for _, out in parts], default=0)
    patches = max([out.cluster_map.shape[1] for _, out in parts], default=0)
    channels = parts[0][1].tokens.shape[2] if parts else like.shape[-1]
    dtype = parts[0][1].tokens.dtype if parts else like.dtype

    def pad(tensor: torch.Tensor, size: int, value) -> torch.Tensor:
        extra = size - tensor.shape[1]
        if extra == 0:
            return tensor
        if tensor.dim() == 3:
            return F.pad(tensor, (0, 0, 0, extra), value=value)
        return F.pad(tensor, (0, extra), value=value)

    tokens = torch.zeros(out_rows, width, channels, device=device, dtype=dtype)
    mask = torch.zeros(out_rows, width, dtype=torch.bool, device=device)
    kept_indices = torch.full((out_rows, kept), -1, dtype=torch.long, device=device)
    num_dominant = torch.zeros(out_rows, dtype=torch.long, device=device)
    num_contextual = torch.zeros(out_rows, dtype=torch.long, device=device)
    cluster_map = torch.full((out_rows, patches), -1, dtype=torch.long, device=device)
    scores = torch.zeros(out_rows, patches, device=device)
    expected = torch.zeros(out_rows, device=device)
    positions = torch.zeros(out_rows, width, dtype=torch.long, device=device)
    for target, out in parts:
        tokens = tokens.index_copy(0, target, pad(out.tokens.to(dtype), width, 0.0))
        mask = mask.index_copy(0, target, pad(out.mask.bool(), width, False))
        kept_indices = kept_indices.index_copy(0, target, pad(out.kept_indices.long(), kept, -1))
        num_dominant = num_dominant.index_copy(0, target, out.num_dominant.long())
        num_contextual = num_contextual.index_copy(0, target, out.num_contextual.long())
        cluster_map = cluster_map.index_copy(0, target, pad(out.cluster_map.long(), patches, -1))
        scores = scores.index_copy(0, target, pad(out.scores.float(), patches, 0.0))
        expected = expected.index_copy(0, target, out.expected_tokens.float())
        positions = positions.index_copy(0, target, pad(out.positions.long(), width, 0))
    return CompressionOutput(tokens, mask, kept_indices, num_dominant, num_contextual, cluster_map,
                             scores, expected, positions)


def pad_rows(flat: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive runs of ``counts`` entries of ``flat`` [sum, ...] as zero-padded rows
    [len(counts), max, ...] and their validity [len(counts), max] (one masked scatter)."""
    longest = max(counts, default=0)
    counts_t = torch.tensor(counts, device=flat.device, dtype=torch.long)
    valid = torch.arange(longest, device=flat.device)[None, :] < counts_t[:, None]
    rows = flat.new_zeros(len(counts), longest, *flat.shape[1:])
    rows[valid] = flat
    return rows, valid


# ------------------------------------------------------------------------- prompt builder
class PerSampleImages(ImagePreprocessor):
    """Image fields of families whose processors return more than one fixed-size tensor: each
    field gets one row per sample (text-only samples: zeros), so batches can be sliced by sample."""

    def processed(self, images: list) -> dict[str, torch.Tensor]:
        return dict(self.image_processor(images=images, return_tensors="pt"))

    def batch_fields(self, images: list, has_image: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class FamilyBatchBuilder(BatchBuilder):
    """A :class:`BatchBuilder` that adds fields computed from the collated ids (``extra_fields``)."""

    def __init__(self, *args, extra_fields=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_fields = extra_fields

    def _collate(self, samples, encoded):
        batch = super()._collate(samples, encoded)
        if self.extra_fields is not None:
            batch.update(self.extra_fields(batch))
        return batch


def image_token_types(image_token_id: int):
    """``extra_fields`` giving ``mm_token_type_ids`` (1 on the image placeholder, 0 elsewhere)."""
    return _TokenTypes(image_token_id)


@dataclass(frozen=True)
class _TokenTypes:
    image_token_id: int

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (batch["input_ids"] == self.image_token_id).long()}


def single_image_runs(input_ids: torch.Tensor, real: torch.Tensor, image_token_id: int):
    """The stock processors' expanded placeholders: per sample its run of ``image_token_id``; returns
    (is_image [B, T], first [B, T] the first id of each run, run lengths [B]); more than one run in a
    sample (several images) is refused."""
    is_image = (input_ids == image_token_id) & real
    first = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
    runs = first.sum(1)
    if bool((runs > 1).any()):
        raise NotImplementedError("more than one image per sample is not supported")
    return is_image, first, is_image.sum(1)


__all__ = [
    "TINY_TEXTS",
    "FamilyBatchBuilder",
    "PerSampleImages",
    "RowGroups",
    "VideoProcessorStub",
    "allow_missing_video_processor",
    "build_qwen2_tokenizer",
    "combine_outputs",
    "compress_grouped",
    "image_token_types",
    "load_processor",
    "pad_rows",
    "read_config_json",
    "received_attention",
    "single_image_runs",
]
