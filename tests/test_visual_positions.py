"""``visual_positions="original"``: kept tokens keep the positions they had before compression."""

import pytest
import torch

from sparsezip_pl.compress import SparseZipConfig, SparseZipCompressor
from sparsezip_pl.compress.merge import ContextualPlan
from sparsezip_pl.compress.output import contextual_positions
from sparsezip_pl.compress.testing import random_capture
from sparsezip_pl.models import CompressedLlava, load_backend
from sparsezip_pl.models.splice import splice_visual_tokens
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples


def test_contextual_token_sits_at_its_members_weighted_centroid():
    # 4x4 grid. Slot 0: patches 0 (row 0, col 0, weight 3) and 3 (row 0, col 3, weight 1):
    # centroid col 0.75 -> patch 1. Slot 1: patches 5 and 15 (rows 1 and 3, cols 1 and 3) with
    # equal weights -> row 2, col 2 -> patch 10. Slot 2 is empty -> 0.
    slot = torch.full((1, 16), -1)
    weight = torch.zeros(1, 16)
    slot[0, [0, 3, 5, 15]] = torch.tensor([0, 0, 1, 1])
    weight[0, [0, 3, 5, 15]] = torch.tensor([3.0, 1.0, 0.5, 0.5])
    plan = ContextualPlan(slot, weight, torch.tensor([[True, True, False]]), torch.tensor([2]))
    assert contextual_positions(plan, 16).tolist() == [[1, 10, 0]]


@pytest.mark.parametrize("method", ["visionzip", "sparsezip"])
def test_compressor_positions_match_the_kept_patches(method):
    capture = random_capture(batch=3, num_patches=64, seed=1)
    config = SparseZipConfig(method=method, dominant=12, k_min=4, k_max=20)
    compressor = SparseZipCompressor(config, capture.queries.shape[2], capture.queries.shape[3]).eval()
    with torch.no_grad():
        out = compressor(capture)
    k_slots = out.kept_indices.shape[1]
    dominant = out.positions[:, 1 : 1 + k_slots]
    used = out.kept_indices >= 0
    assert torch.equal(dominant[used], out.kept_indices[used])
    assert torch.all(out.positions[:, 0] == 0)  # CLS
    assert torch.all(out.positions[~out.mask] == 0)
    contextual = out.positions[:, 1 + k_slots :][out.mask[:, 1 + k_slots :]]
    assert contextual.numel() > 0 and torch.all((contextual >= 0) & (contextual < 64))


@pytest.fixture(scope="module", params=["hf", "llava"])
def backend(request):
    return load_backend(request.param, cached_tiny_llava(request.param, image_size=112))


def test_original_positions_equal_the_full_sequence_with_dropped_tokens_masked(backend):
    """The LLM sees the kept tokens exactly where the uncompressed model saw them: its logits
    equal those of the full sequence in which the dropped patches are masked out."""
    stock = CompressedLlava(backend, SparseZipConfig(method="none"))
    batch = backend.batch_builder("generate")(synthetic_samples(2, seed=5))
    with torch.no_grad():
        full, compression = stock.prepare_inputs(batch)
    num_patches = backend.num_patches
    keep = torch.zeros(2, num_patches, dtype=torch.bool)
    keep[0, ::3] = True
    keep[1, 5:40] = True
    # The "compressed" image: the kept patches in order, their patch indices as positions.
    kept = [compression.tokens[b, keep[b]] for b in range(2)]
    tokens = torch.zeros(2, num_patches, compression.tokens.shape[-1])
    positions = torch.zeros(2, num_patches, dtype=torch.long)
    for b in range(2):
        tokens[b, : len(kept[b])] = kept[b]
        positions[b, : len(kept[b])] = keep[b].nonzero().flatten()
    mask = torch.arange(num_patches)[None] < keep.sum(1, keepdim=True)
    input_ids = batch["input_ids"]
    with torch.no_grad():
        text_embeds = backend.embed_tokens(input_ids)
        spliced = splice_visual_tokens(
            text_embeds, input_ids, batch["attention_mask"], backend.image_token_id,
            backend.project(tokens), mask, visual_positions=positions, image_span=num_patches,
        )
        ours = backend.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids).logits
        # Reference: all patches, the dropped ones masked out, positions as in the stock model.
        holes = full.attention_mask.clone()
        # The stock splice puts each row's N patches on consecutive slots, in patch order.
        visual_slots = full.visual_mask.nonzero()
        dropped = visual_slots[~keep.flatten()]
        holes[dropped[:, 0], dropped[:, 1]] = 0
        reference = backend.language_model(full.inputs_embeds, holes, full.position_ids).logits
    # Compare the text after the image (the last 6 tokens of every prompt, all real).
    torch.testing.assert_close(ours[:, -6:], reference[:, -6:], atol=1e-4, rtol=1e-4)


def test_generate_continues_from_the_original_positions(backend):
    config = SparseZipConfig(method="visionzip", dominant=12, visual_positions="original")
    model = CompressedLlava(backend, config).eval()
    batch = backend.batch_builder("generate")(synthetic_samples(2, seed=6))
    generated, _ = model.generate(batch, max_new_tokens=4, eos_token_id=None)
    # Reference: greedy decoding by hand, each new token one position after the last.
    with torch.no_grad():
        spliced, _ = model.prepare_inputs(batch)
        embeds, attention, positions = spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
        expected = []
        for _ in range(4):
            logits = backend.language_model(embeds, attention, positions).logits[:, -1]
            token = logits.argmax(-1)
            expected.append(token)
            embeds = torch.cat([embeds, backend.embed_tokens(token[:, None])], dim=1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    assert torch.equal(generated, torch.stack(expected, dim=1))
    # The option matters: the prompt's positions differ from the contiguous ones.
    contiguous = CompressedLlava(backend, SparseZipConfig(method="visionzip", dominant=12)).eval()
    with torch.no_grad():
        assert not torch.equal(contiguous.prepare_inputs(batch)[0].position_ids, spliced.position_ids)


def test_contextual_position_uses_the_capture_grid_when_it_is_not_square():
    # A 2x8 grid: patches 0 (row 0, col 0) and 15 (row 1, col 7), equal weights -> row 0.5, col 3.5,
    # rounded to row 0 or 1 and col 3 or 4; with a wrong 1x16 layout the centroid would be index 7.5.
    slot = torch.full((1, 16), -1)
    weight = torch.zeros(1, 16)
    slot[0, [0, 15]] = 0
    weight[0, [0, 15]] = 1.0
    plan = ContextualPlan(slot, weight, torch.tensor([[True]]), torch.tensor([1]))
    position = contextual_positions(plan, 16, grid=(2, 8)).item()
    assert divmod(position, 8)[1] in (3, 4) and position not in (7, 8)
