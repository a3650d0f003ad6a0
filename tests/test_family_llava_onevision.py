"""The ``llava-onevision`` family on a tiny random-weight LLaVA-OneVision in the layout of
llava-hf/llava-onevision-qwen2-7b-ov-hf: stock equality in both row layouts, the substitute
attention, the reassembly of views and newlines, budgets, generation with the KV cache, the
two-line API and the Lightning CLI."""

import dataclasses
from pathlib import Path

import pytest
import torch
from data_fixtures import write_mme_folder
from vl_family_helpers import first_eos_cut, processor_inputs, recompute_greedy, samples_of, write_cli_config

from sparsezip_pl import sparsezip, unwrap
from sparsezip_pl.models import CompressedLlava, detect_family, load_family
from sparsezip_pl.models.compressed import _all_patches
from sparsezip_pl.models.tiny import cached_tiny_llava

# 60x100: 2x2 crops, letterboxed (4 of 8 map rows kept); 230x330: 5x6 crops shrunk by anyres_max_9.
SIZES = [(60, 100), (230, 330)]
# No letterbox and no shrink: 1x2 and 2x2 crops (3 and 5 views, 4 and 8 map rows).
EXACT_SIZES = [(56, 112), (112, 112)]
VISIONZIP = {"method": "visionzip", "budget": 4, "visionzip": {"layer": -1}}


@pytest.fixture(scope="module")
def family():
    return load_family("llava-onevision", str(cached_tiny_llava("llava-onevision")))


def with_options(family, **options):
    options = {"view_mode": family.view_mode, "newlines": family.newlines, **options}
    return type(family)(family.model, processor=family.processor, **options)


@pytest.fixture(scope="module")
def samples():
    return samples_of(SIZES)


@pytest.fixture(scope="module")
def stock_inputs(family, samples):
    return processor_inputs(family.processor, samples)


@pytest.fixture(scope="module")
def batch(family, samples):
    return family.batch_builder("generate")(samples)


def test_family_is_detected_and_the_builder_makes_the_processors_batch(family, batch, stock_inputs):
    assert detect_family(family.model) == "llava-onevision"
    assert ((batch["input_ids"] == family.image_token_id).sum(1) == 1).all()
    assert batch["image_sizes"].tolist() == [list(s) for s in SIZES]
    assert batch["batch_num_images"].tolist() == [1, 1]
    from_stock = family.batch_from_stock_inputs(stock_inputs["input_ids"], stock_inputs["attention_mask"],
                                                stock_inputs["pixel_values"], image_sizes=stock_inputs["image_sizes"],
                                                batch_num_images=stock_inputs["batch_num_images"])
    for key in ("input_ids", "attention_mask", "image_sizes", "pixel_values", "batch_num_images"):
        assert torch.equal(batch[key], from_stock[key]), key


@pytest.mark.parametrize("view_mode", ["image", "view"])
def test_method_none_equals_the_stock_model(family, batch, stock_inputs, view_mode):
    family = with_options(family, view_mode=view_mode)
    model = family.model
    compressed = CompressedLlava(family, {"method": "none"})
    # The stock forward numbers positions 0.. over padding too, its generate from the first real
    # token (as the compressed model does): RoPE is shift-invariant, but in float32 not to 1e-5.
    mask = stock_inputs["attention_mask"]
    with torch.no_grad():
        stock = model(**stock_inputs, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        out = compressed(batch)
        stock_new = model.generate(**stock_inputs, max_new_tokens=6, do_sample=False)[:, stock_inputs["input_ids"].shape[1]:]
        new, _ = compressed.generate(batch, max_new_tokens=6)
    real = stock_inputs["attention_mask"].bool()
    assert torch.equal(out.attention_mask.bool(), real)
    torch.testing.assert_close(out.logits[out.attention_mask.bool()], stock.logits[real], atol=1e-5, rtol=0)
    assert torch.equal(new, stock_new)
    assert len(set(new.flatten().tolist())) > 2  # the tiny model's greedy tokens vary


def test_substitute_attention_is_each_views_mean_received_attention(family, batch):
    from transformers import LlavaOnevisionForConditionalGeneration

    eager = LlavaOnevisionForConditionalGeneration.from_pretrained(family.model.name_or_path,
                                                                   attn_implementation="eager").eval()
    by_view = type(family)(eager, processor=family.processor, view_mode="view")
    by_image = type(family)(eager, processor=family.processor, view_mode="image")
    with torch.no_grad():
        views = by_view.encode_images(batch, [-2, -1])
        images = by_image.encode_images(batch, [-1])
        pixels = torch.cat([batch["pixel_values"][b, :v] for b, v in enumerate((5, 31))])
        attentions = eager.model.vision_tower(pixels, output_attentions=True).attentions
    for s, layer in enumerate((-2, -1)):
        expected = attentions[layer].mean(2)  # [views, h, N]: each patch's mean over the view's queries
        torch.testing.assert_close(views.attention[s], expected, atol=1e-6, rtol=1e-5)
    # One row per image: its views one after another.
    for image, (first, count) in enumerate(((0, 5), (5, 31))):
        row = attentions[-1].mean(2)[first:first + count].permute(1, 0, 2).reshape(attentions[-1].shape[1], -1)
        torch.testing.assert_close(images.attention[0, image, :, : row.shape[1]], row, atol=1e-6, rtol=1e-5)
        assert images.hidden[image, row.shape[1]:].abs().sum() == 0  # padding


def test_reassembly_of_reordered_crop_tokens_is_the_stock_sequence(family):
    """Crop tokens handed back in another order are put back in the crop map's raster order, the
    letterbox rows dropped and a newline after every row: the stock sequence (images the stock
    does not shrink)."""
    family = with_options(family, view_mode="view", newlines="rows")
    batch = family.batch_builder("generate")(samples_of([(60, 100), (112, 112)]))
    with torch.no_grad():
        capture = family.encode_images(batch, [])
        stock = family.compress_rows(_all_patches, capture)
        tokens, mask, offsets, span = family.visual_inputs(stock, capture.layout)
        generator = torch.Generator().manual_seed(0)
        order = torch.stack([torch.randperm(16, generator=generator) for _ in range(stock.tokens.shape[0])])
        order[[0, 5]] = torch.arange(16)  # base views keep their order
        shuffled = dataclasses.replace(stock, tokens=stock.tokens.gather(1, order[..., None].expand_as(stock.tokens)),
                                       positions=stock.positions.gather(1, order))
        tokens2, mask2, offsets2, span2 = family.visual_inputs(shuffled, capture.layout)
    assert span.tolist() == [52, 16 + 8 * 9]  # 4 letterboxed rows x (8 + newline); 8 x (8 + newline)
    assert torch.equal(mask2, mask) and torch.equal(span2, span)
    assert torch.equal(tokens2, tokens)
    assert torch.equal(offsets2, offsets)
    assert torch.equal(offsets[0, :52], torch.arange(52))


@pytest.mark.parametrize("newlines", ["rows", "all", "none"])
def test_budgets_reach_the_llm_with_the_newlines_of_the_policy(family, newlines):
    batch = family.batch_builder("generate")(samples_of(EXACT_SIZES))
    views, rows = (3, 5), (4, 8)
    for view_mode, budget in (("view", 4), ("image", 8)):
        compressed = CompressedLlava(with_options(family, view_mode=view_mode, newlines=newlines),
                                     {**VISIONZIP, "budget": budget}, visual_positions="original")
        with torch.no_grad():
            out = compressed(batch)
        comp = out.compression
        kept = [budget * v for v in views] if view_mode == "view" else [budget, budget]
        assert comp.num_tokens.tolist() == kept  # per sample (view rows gathered: patch v * 16 + i)
        # Newlines: every map row, or the rows a kept crop token stands in.
        if newlines == "all":
            extra = list(rows)
        elif newlines == "none":
            extra = [0, 0]
        else:
            extra = []
            for image, crop_cols in enumerate((2, 2)):
                cells = comp.positions[image][comp.mask[image]]
                view, cells = cells // 16, cells % 16
                crop = view[view > 0] - 1
                map_rows = (crop // crop_cols) * 4 + cells[view > 0] // 4
                extra.append(len(set(map_rows.tolist())))
        assert out.visual_mask.sum(1).tolist() == [k + e for k, e in zip(kept, extra)]
        # Original positions: base tokens in the first 16, crop tokens and newlines in stock order.
        for b in range(2):
            visual = out.position_ids[b][out.visual_mask[b]]
            first = visual.min()
            crop_part = visual[(visual - first) >= 16]
            assert (crop_part[1:] >= crop_part[:-1]).all()  # a merged token may share its centroid patch



@pytest.mark.parametrize("view_mode", ["image", "view"])
def test_compression_is_reported_per_sample(family, view_mode):
    """What records, budgets and the budget penalty read: one row per sample in both row layouts
    (``view``: the method's counts summed over the image's views), a text-only sample empty."""
    samples = samples_of(EXACT_SIZES + [(60, 60)])
    samples[1] = dict(samples[1], image=None)
    batch = family.batch_builder("generate")(samples)
    model = CompressedLlava(with_options(family, view_mode=view_mode, newlines="all"), VISIONZIP)
    with torch.no_grad():
        compression = model(batch).compression
    views, map_rows = [3, 0, 5], [4, 0, 8]  # 1x2 crops; no image; 2x2 crops
    rows_of = [v if view_mode == "view" else int(v > 0) for v in views]  # compression rows per sample
    # VisionZip at 4 per row: 3 dominant + 1 contextual; newlines: one per map row (all).
    assert compression.num_dominant.tolist() == [3 * r for r in rows_of]
    assert compression.num_contextual.tolist() == rows_of
    assert compression.expected_tokens.tolist() == [4.0 * r for r in rows_of]
    assert compression.visual_tokens.tolist() == [4 * r + m for r, m in zip(rows_of, map_rows)]
    assert compression.kept_indices.shape[0] == compression.cluster_map.shape[0] == 3
    if view_mode == "view":  # patch v * N + i of view v
        kept = compression.kept_indices[0]
        assert set((kept[kept >= 0] // family.num_patches).tolist()) == {0, 1, 2}


def test_generation_with_the_cache_after_compression(family, batch):
    for view_mode, positions in (("view", "contiguous"), ("image", "original")):
        compressed = CompressedLlava(with_options(family, view_mode=view_mode), VISIONZIP, visual_positions=positions)
        with torch.no_grad():
            new, _ = compressed.generate(batch, max_new_tokens=5)
        reference = recompute_greedy(compressed, batch, 5)
        assert first_eos_cut(new, family.eos_token_id) == first_eos_cut(reference, family.eos_token_id)


def test_two_line_api_on_the_stock_model(family, stock_inputs, batch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(family.model.name_or_path).eval()
    with torch.no_grad():
        stock = model.generate(**stock_inputs, max_new_tokens=5, do_sample=False)
        wrapped = sparsezip(model, method="none")
        assert wrapped.family == "llava-onevision"
        assert torch.equal(wrapped.generate(**stock_inputs, max_new_tokens=5), stock)
        wrapped = sparsezip(unwrap(wrapped), method="visionzip", budget=4, layer=-1)
        output = wrapped.generate(**stock_inputs, max_new_tokens=5)
        expected, _ = CompressedLlava(family, VISIONZIP).generate(batch, max_new_tokens=5)
        assert torch.equal(output[:, stock_inputs["input_ids"].shape[1]:], expected)
        assert unwrap(wrapped) is model
        assert torch.equal(model.generate(**stock_inputs, max_new_tokens=5, do_sample=False), stock)


def test_lightning_cli_test_runs_compressed(tmp_path):
    from sparsezip_pl.cli import main

    root = write_mme_folder(tmp_path, subtasks=("existence",), n_images=1)
    config = write_cli_config(tmp_path, "llava-onevision", str(cached_tiny_llava("llava-onevision")), root,
                              {"method": "visionzip", "budget": 3, "visionzip": {"layer": -1}})
    cli = main(["test", "--config", config])
    records = (Path(cli.trainer.log_dir) / "predictions" / "predictions.jsonl").read_text().splitlines()
    assert len(records) == 2
    # The LLM's input holds the 3 kept tokens and a newline after each map row that holds one.
    import json
    for record in map(json.loads, records):
        assert 3 < record["visual_tokens"] <= 6, record["visual_tokens"]
        assert record["stock_visual_tokens"] > record["visual_tokens"]
    assert cli.model.eval_results["test/mme/num_samples"] == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_method_none_equals_the_stock_model_in_half_precision(samples, dtype):
    family = load_family("llava-onevision", str(cached_tiny_llava("llava-onevision")), dtype=dtype)
    inputs = processor_inputs(family.processor, samples)
    inputs["pixel_values"] = inputs["pixel_values"].to(family.dtype)
    mask = inputs["attention_mask"]
    batch = family.batch_builder("generate")(samples)
    with torch.no_grad():
        stock = family.model(**inputs, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        for view_mode in ("image", "view"):
            out = CompressedLlava(with_options(family, view_mode=view_mode), {"method": "none"})(batch)
            assert out.logits.dtype == getattr(torch, dtype)
            assert torch.equal(out.logits[out.attention_mask.bool()], stock[mask.bool()])
