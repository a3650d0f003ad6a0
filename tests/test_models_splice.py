"""The batched splice: placeholders become exactly the real visual tokens, left-padded."""

import pytest
import torch

from sparsezip_pl.models.splice import IGNORE_INDEX, left_pack, splice_visual_tokens

IMG = 99
PAD = 0


def _inputs():
    # Row 0: left-padded, image after two tokens. Row 1: image first. Row 2: text only.
    input_ids = torch.tensor([[PAD, 5, 6, IMG, 7], [IMG, 8, 9, 10, 11], [PAD, PAD, 12, 13, 14]])
    attention = (input_ids != PAD).long()
    width = 4
    text = torch.randn(3, 5, width)
    visual = torch.randn(3, 6, width, requires_grad=True)
    visual_mask = torch.tensor(
        [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool
    )
    labels = torch.where(attention.bool() & (input_ids != IMG), input_ids + 100, IGNORE_INDEX)
    has_image = torch.tensor([True, True, False])
    return input_ids, attention, text, visual, visual_mask, labels, has_image


def test_splice_places_exactly_the_real_tokens_in_order():
    input_ids, attention, text, visual, visual_mask, labels, has_image = _inputs()
    out = splice_visual_tokens(text, input_ids, attention, IMG, visual, visual_mask, has_image, labels)
    lengths = out.attention_mask.sum(1)
    assert lengths.tolist() == [3 + 3, 4 + 6, 3]
    assert out.inputs_embeds.shape[1] == 10
    # Row 0: [pad x4, t5, t6, v0, v1, v3, t7]: real tokens only, compressor padding skipped.
    expected = torch.stack([text[0, 1], text[0, 2], visual[0, 0], visual[0, 1], visual[0, 3], text[0, 4]])
    torch.testing.assert_close(out.inputs_embeds[0, -6:], expected)
    assert out.visual_mask.sum(1).tolist() == [3, 6, 0]
    # Left padding: zeros and attention 0 at the front, positions count real tokens only.
    assert out.attention_mask[0].tolist() == [0] * 4 + [1] * 6
    assert torch.all(out.inputs_embeds[0, :4] == 0)
    assert out.position_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    # Text-only row: its stray visual tokens never appear.
    torch.testing.assert_close(out.inputs_embeds[2, -3:], text[2, 2:])
    # Labels: -100 on visual tokens and padding, text labels kept in order.
    assert out.labels[0].tolist() == [IGNORE_INDEX] * 4 + [105, 106] + [IGNORE_INDEX] * 3 + [107]
    assert torch.all(out.labels[out.visual_mask] == IGNORE_INDEX)


def test_splice_gradients_reach_visual_tokens_only_where_real():
    input_ids, attention, text, visual, visual_mask, labels, has_image = _inputs()
    out = splice_visual_tokens(text, input_ids, attention, IMG, visual, visual_mask, has_image)
    out.inputs_embeds.sum().backward()
    used = visual_mask & has_image[:, None]
    assert torch.all(visual.grad[used] == 1)
    assert torch.all(visual.grad[~used] == 0)


def test_splice_rejects_missing_or_repeated_placeholders():
    input_ids, attention, text, visual, visual_mask, _, has_image = _inputs()
    bad = input_ids.clone()
    bad[1, 2] = IMG
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        splice_visual_tokens(text, bad, attention, IMG, visual, visual_mask, has_image)
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        splice_visual_tokens(text, input_ids, attention, IMG, visual, visual_mask, torch.tensor([True, True, True]))


def test_left_pack_keeps_order_and_pads_left():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    keep = ids != 0
    extra = {"flag": torch.tensor([[True, False, True, False], [False, True, False, False]])}
    packed, attention, extras = left_pack(ids, keep, pad_id=0, extra=extra)
    assert packed.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert attention.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert extras["flag"].tolist() == [[True, False, True], [False, False, True]]


def test_original_positions_in_the_splice():
    input_ids, attention, text, visual, visual_mask, labels, has_image = _inputs()
    # Offsets of the 6 visual slots inside an image of 10 positions (padding slots: anything).
    offsets = torch.tensor([[1, 4, 7, 9, 0, 0], [0, 2, 3, 5, 8, 9], [0, 1, 2, 0, 0, 0]])
    out = splice_visual_tokens(
        text, input_ids, attention, IMG, visual, visual_mask, has_image, labels,
        visual_positions=offsets, image_span=10,
    )
    # Row 0: [pad x4, t5, t6, v0, v1, v3, t7]; the image starts at position 2 and spans 10.
    assert out.position_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 2 + 1, 2 + 4, 2 + 9, 12]
    # Row 1: the image first, all six tokens real; the text continues at 10.
    assert out.position_ids[1].tolist() == [0, 2, 3, 5, 8, 9, 10, 11, 12, 13]
    # Row 2: no image, so nothing moves.
    assert out.position_ids[2].tolist()[-3:] == [0, 1, 2]
    contiguous = splice_visual_tokens(text, input_ids, attention, IMG, visual, visual_mask, has_image, labels)
    assert torch.equal(out.inputs_embeds, contiguous.inputs_embeds)
    assert torch.equal(out.attention_mask, contiguous.attention_mask)


def test_original_positions_need_the_image_span():
    input_ids, attention, text, visual, visual_mask, _, has_image = _inputs()
    with pytest.raises(ValueError, match="image_span"):
        splice_visual_tokens(
            text, input_ids, attention, IMG, visual, visual_mask, has_image,
            visual_positions=torch.zeros_like(visual_mask, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="visual_positions must be"):
        splice_visual_tokens(
            text, input_ids, attention, IMG, visual, visual_mask, has_image,
            visual_positions=torch.zeros(3, 2, dtype=torch.long), image_span=10,
        )
