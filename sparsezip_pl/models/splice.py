"""Put each sample's visual tokens where its image placeholder stands, for both LLaVA families.

One gather builds the whole batch: every output slot holds an index into a flat table
``[text embeddings of all samples | visual tokens of all samples | one zero row]``; text tokens
keep their order, the placeholder expands into exactly the sample's real visual tokens (mask
True), and rows are left-padded with the zero row (attention 0). Compressor padding slots are
never indexed, so they never reach the LLM. The index tensors are built with scatters over the
whole batch; the only host sync reads the output length and the placeholder check together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class SplicedInputs:
    """What the LLM receives. S = the longest spliced sample; rows are left-padded."""

    inputs_embeds: torch.Tensor  # [B, S, D]
    attention_mask: torch.Tensor  # [B, S] long
    position_ids: torch.Tensor  # [B, S] long, 0.. over real positions, 0 on padding
    labels: torch.Tensor | None  # [B, S], IGNORE_INDEX on visual tokens and padding
    visual_mask: torch.Tensor  # [B, S] bool, True where a visual token sits


def _placeholder_layout(input_ids, attention_mask, image_token_id, num_visual, has_image):
    """Slots each input token takes in the output, the output length, and a check of one
    placeholder per image; both come from a single host sync."""
    real = attention_mask.bool()
    is_placeholder = real & (input_ids == image_token_id)
    per_row = is_placeholder.sum(1)
    wrong = (per_row > 1) | (has_image & (per_row == 0))
    keep_text = real & ~is_placeholder
    num_visual = num_visual * has_image
    slots = keep_text.long() + is_placeholder.long() * num_visual[:, None]
    lengths = slots.sum(1)
    out_len, any_wrong = torch.stack([lengths.max(), wrong.any().long()]).tolist()
    if any_wrong:
        rows = wrong.nonzero().flatten().tolist()
        raise ValueError(
            f"samples {rows} need exactly one image placeholder (id {image_token_id}) per image; "
            f"found {per_row[rows].tolist()}"
        )
    return keep_text, is_placeholder, slots, lengths, out_len


def splice_visual_tokens(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    visual_tokens: torch.Tensor,
    visual_mask: torch.Tensor,
    has_image: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    visual_positions: torch.Tensor | None = None,
    image_span: int | None = None,
) -> SplicedInputs:
    """Replace each sample's single placeholder by its real visual tokens.

    text_embeds [B, T, D] (the embeddings of ``input_ids``), input_ids / attention_mask [B, T]
    (any padding side), visual_tokens [B, V, D] with visual_mask [B, V] marking real tokens
    (their order is kept), has_image [B] (default: all True). Samples without an image keep
    their text only (a stray placeholder is dropped). Gradients flow into ``visual_tokens``.

    Position ids count the real tokens, unless ``visual_positions`` [B, V] long (offsets in
    ``0..image_span-1``, e.g. each token's patch index) is given: then each visual token sits at
    the image's first position plus its offset, and the text after the image continues as if the
    image had taken all ``image_span`` positions, the positions the uncompressed model saw.
    """
    batch, length, width = text_embeds.shape
    num_slots_visual = visual_tokens.shape[1]
    device = text_embeds.device
    if has_image is None:
        has_image = torch.ones(batch, dtype=torch.bool, device=device)
    visual_mask = visual_mask.bool()
    keep_text, is_placeholder, slots, lengths, out_len = _placeholder_layout(
        input_ids, attention_mask, image_token_id, visual_mask.sum(1), has_image.bool()
    )
    # First output slot of every input token, after left padding.
    start = (out_len - lengths)[:, None] + slots.cumsum(1) - slots

    zero_row = batch * length + batch * num_slots_visual
    # Column ``out_len`` is a dump for entries that are not written anywhere; it is cut off below.
    source = torch.full((batch, out_len + 1), zero_row, dtype=torch.long, device=device)
    text_rows = torch.arange(batch * length, device=device).view(batch, length)
    source.scatter_(1, torch.where(keep_text, start, out_len), text_rows)

    placeholder_start = (start * is_placeholder).sum(1, keepdim=True)
    rank = visual_mask.long().cumsum(1) - 1
    write_visual = visual_mask & (has_image.bool() & is_placeholder.any(1))[:, None]
    visual_rows = batch * length + torch.arange(batch * num_slots_visual, device=device).view(batch, num_slots_visual)
    source.scatter_(1, torch.where(write_visual, placeholder_start + rank, out_len), visual_rows)
    source = source[:, :out_len]

    table = torch.cat(
        [
            text_embeds.reshape(batch * length, width),
            visual_tokens.reshape(batch * num_slots_visual, width).to(text_embeds.dtype),
            text_embeds.new_zeros(1, width),
        ]
    )
    inputs_embeds = table[source]
    attention = (source != zero_row).long()
    position_ids = (attention.cumsum(1) - 1).clamp(min=0) * attention
    visual = (source >= batch * length) & (source != zero_row)
    if visual_positions is not None:
        position_ids = _original_positions(
            position_ids, source, visual, batch * length, visual_positions, visual_mask, image_span
        )

    spliced_labels = None
    if labels is not None:
        label_table = torch.cat(
            [labels.reshape(-1), labels.new_full((batch * num_slots_visual + 1,), IGNORE_INDEX)]
        )
        spliced_labels = label_table[source]
    return SplicedInputs(inputs_embeds, attention, position_ids, spliced_labels, visual)


def _original_positions(
    position_ids, source, visual, first_visual_row, visual_positions, visual_mask, image_span
):
    """Move visual tokens to ``image start + offset`` and shift the text after them by the
    positions the dropped tokens would have taken."""
    if image_span is None:
        raise ValueError("visual_positions needs image_span (the number of positions the whole image takes)")
    if visual_positions.shape != visual_mask.shape:
        raise ValueError(
            f"visual_positions must be [B, V] = {tuple(visual_mask.shape)}, got {tuple(visual_positions.shape)}"
        )
    # The image starts where its first visual slot is; every slot up to and including it is text
    # before the image, so its contiguous position id is also the image's first position.
    first = torch.where(visual, position_ids, torch.iinfo(position_ids.dtype).max).min(1).values
    after = visual.long().cumsum(1).bool() & ~visual  # rows are left-padded: all of it is real text
    num_visual = visual.sum(1)
    offsets = visual_positions.reshape(-1).long()
    visual_offset = offsets[(source - first_visual_row).clamp(0, offsets.numel() - 1)]
    shifted = torch.where(after, position_ids + (image_span - num_visual)[:, None], position_ids)
    return torch.where(visual, first[:, None] + visual_offset, shifted)


def left_pack(
    input_ids: torch.Tensor, keep: torch.Tensor, pad_id: int, extra: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Keep the ``keep`` positions of each row, in order, left-padded; returns ids, attention mask, extras.

    ``extra`` tensors [B, T] are packed the same way (padding 0 / False).
    """
    batch, length = input_ids.shape
    keep = keep.bool()
    lengths = keep.sum(1)
    out_len = int(lengths.max())
    target = (out_len - lengths)[:, None] + keep.long().cumsum(1) - 1
    target = torch.where(keep, target, out_len)

    def pack(values: torch.Tensor, fill) -> torch.Tensor:
        out = values.new_full((batch, out_len + 1), fill)
        return out.scatter_(1, target, values)[:, :out_len]

    ids = pack(input_ids, pad_id)
    attention = pack(keep.long(), 0)
    return ids, attention, {name: pack(value, 0) for name, value in (extra or {}).items()}
