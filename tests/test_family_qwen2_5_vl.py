"""The ``qwen2.5-vl`` family on a tiny random-weight Qwen2.5-VL in the layout of Qwen/Qwen2.5-VL-7B-Instruct:
stock equality, the substitute attention, budgets, M-RoPE positions of kept tokens, generation with
the KV cache, the two-line API and the Lightning CLI."""

from pathlib import Path

import pytest
import torch
from data_fixtures import write_mme_folder
from vl_family_helpers import first_eos_cut, processor_inputs, recompute_greedy, samples_of, write_cli_config

from sparsezip_pl import sparsezip, unwrap
from sparsezip_pl.models import CompressedLlava, detect_family, load_family
from sparsezip_pl.models.tiny import cached_tiny_llava

# Two images of different sizes: merged grids 3x4 (84x112 px) and 5x2 (140x56 px).
SIZES = [(80, 120), (150, 60)]
VISIONZIP = {"method": "visionzip", "budget": 5, "visionzip": {"layer": -1}}


@pytest.fixture(scope="module")
def family():
    return load_family("qwen2.5-vl", str(cached_tiny_llava("qwen2.5-vl")))


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
    assert detect_family(family.model) == "qwen2.5-vl"
    ids = batch["input_ids"]
    # One <|image_pad|> per image, between <|vision_start|> and <|vision_end|>; the grids of the processor.
    assert ((ids == family.image_token_id).sum(1) == 1).all()
    assert torch.equal(batch["mm_token_type_ids"], (ids == family.image_token_id).long())
    assert batch["image_grid_thw"].tolist() == [[1, 6, 8], [1, 10, 4]]
    from_stock = family.batch_from_stock_inputs(stock_inputs["input_ids"], stock_inputs["attention_mask"],
                                                stock_inputs["pixel_values"], image_grid_thw=stock_inputs["image_grid_thw"])
    for key in ("input_ids", "attention_mask", "image_grid_thw", "pixel_values"):
        assert torch.equal(batch[key], from_stock[key]), key


def test_method_none_equals_the_stock_model(family, batch, stock_inputs):
    model = family.model
    compressed = CompressedLlava(family, {"method": "none"})
    with torch.no_grad():
        stock = model(**stock_inputs)
        out = compressed(batch)
        stock_new = model.generate(**stock_inputs, max_new_tokens=6, do_sample=False)[:, stock_inputs["input_ids"].shape[1]:]
        new, _ = compressed.generate(batch, max_new_tokens=6)
    real = stock_inputs["attention_mask"].bool()
    assert torch.equal(out.attention_mask.bool(), real)
    torch.testing.assert_close(out.logits[out.attention_mask.bool()], stock.logits[real], atol=1e-5, rtol=0)
    positions, _ = model.model.get_rope_index(stock_inputs["input_ids"], stock_inputs["mm_token_type_ids"],
                                              stock_inputs["image_grid_thw"], attention_mask=stock_inputs["attention_mask"])
    assert torch.equal(out.position_ids, positions)
    assert torch.equal(new, stock_new)
    assert len(set(new.flatten().tolist())) > 2  # the tiny model's greedy tokens vary


def test_substitute_attention_is_the_attention_the_layer_computes(family, batch, monkeypatch):
    """Against the eager attention weights of the ViT, recorded window by window: block 2 uses
    window attention, block 3 (the last) full attention over each image."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(family.model.name_or_path, attn_implementation="eager")
    eager_family = type(family)(eager.eval(), processor=family.processor)
    recorded = []
    original = modeling.eager_attention_forward
    block_of = {id(block.attn): i for i, block in enumerate(eager.model.visual.blocks)}

    def record(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        output, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        recorded.append((block_of[id(module)], weights[0].detach()))  # [h, n, n] of one window (or image)
        return output, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", record)
    with torch.no_grad():
        capture = eager_family.encode_images(batch, [-2, -1])
    monkeypatch.undo()
    blocks = len(eager.model.visual.blocks)
    thw = batch["image_grid_thw"]
    patches = thw.prod(-1)
    window_index = modeling.get_vision_window_index(thw, 2, eager.model.visual.window_size, 14)[0]
    restore = torch.argsort(window_index)
    for s, block in enumerate((blocks - 2, blocks - 1)):
        chunks = [weights for index, weights in recorded if index == block]
        assert len(chunks) == (2 if block == blocks - 1 else 4 + 3)  # whole images, or 2x2-unit windows of 3x4 and 5x2
        received = torch.cat([w.sum(1) for w in chunks], dim=1)  # [h, seq] window order
        received = received / patches.repeat_interleave(patches)[None]
        merged = received.view(received.shape[0], -1, 4).sum(-1)[:, restore]  # [h, units] raster
        for image, rows in enumerate(merged.split((patches // 4).tolist(), dim=1)):
            n = rows.shape[1]
            torch.testing.assert_close(capture.attention[s, image, :, :n], rows, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(capture.attention[s, image].sum(-1), torch.ones(rows.shape[0]), atol=1e-5, rtol=0)


def test_budgets_reach_the_llm_and_kept_tokens_keep_their_stock_positions(family, batch, stock_inputs):
    positions, _ = family.model.model.get_rope_index(stock_inputs["input_ids"], stock_inputs["mm_token_type_ids"],
                                                     stock_inputs["image_grid_thw"],
                                                     attention_mask=stock_inputs["attention_mask"])
    stock_visual = stock_inputs["input_ids"] == family.image_token_id
    sparsezip_config = {"method": "sparsezip", "budget": 8,
                        "sparsezip": {"layers": [-1], "dynamic_k": False, "merging": {"contextual_num": 2}}}
    for config in (VISIONZIP, sparsezip_config):
        for mode in ("original", "contiguous"):
            compressed = CompressedLlava(family, config, visual_positions=mode)
            with torch.no_grad():
                out = compressed(batch)
            comp = out.compression
            planned = compressed.compressor.output_length(12)
            assert comp.num_tokens.tolist() == [planned, planned]
            assert out.visual_mask.sum(1).tolist() == [planned, planned]
            if config is VISIONZIP:
                assert planned == 5
            for b in range(2):
                real = out.attention_mask[b].bool()
                ids = out.position_ids[:, b, real]  # [3, L_b]
                visual = out.visual_mask[b, real]
                stock = positions[:, b, stock_inputs["attention_mask"][b].bool()]
                stock_vis = stock_visual[b, stock_inputs["attention_mask"][b].bool()]
                first = int(stock_vis.nonzero()[0])
                # Each kept token: the stock columns of the patch it stands at.
                kept = comp.positions[b][comp.mask[b]]
                assert torch.equal(ids[:, visual], stock[:, first + kept])
                before = int(visual.nonzero()[0])
                assert torch.equal(ids[:, :before], stock[:, :before])
                after_stock = stock[:, first + int(stock_vis.sum()):]
                after = ids[:, before + int(visual.sum()):]
                if mode == "original":
                    assert torch.equal(after, after_stock)
                else:
                    start = int(ids[:, visual].max()) + 1
                    assert torch.equal(after, torch.arange(start, start + after.shape[1]).expand(3, -1))


def test_generation_with_the_cache_after_compression(family, batch):
    for mode in ("original", "contiguous"):
        compressed = CompressedLlava(family, VISIONZIP, visual_positions=mode)
        with torch.no_grad():
            new, comp = compressed.generate(batch, max_new_tokens=5)
        assert comp.num_tokens.tolist() == [5, 5]
        reference = recompute_greedy(compressed, batch, 5)
        assert first_eos_cut(new, family.eos_token_id) == first_eos_cut(reference, family.eos_token_id)


def test_two_line_api_on_the_stock_model(family, stock_inputs, batch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(family.model.name_or_path).eval()
    with torch.no_grad():
        stock = model.generate(**stock_inputs, max_new_tokens=5, do_sample=False)
        wrapped = sparsezip(model, method="none")
        assert wrapped.family == "qwen2.5-vl"
        assert torch.equal(wrapped.generate(**stock_inputs, max_new_tokens=5), stock)
        wrapped = sparsezip(unwrap(wrapped), method="visionzip", budget=5, layer=-1)
        output = wrapped.generate(**stock_inputs, max_new_tokens=5)
        expected, _ = CompressedLlava(family, VISIONZIP).generate(batch, max_new_tokens=5)
        assert torch.equal(output[:, :stock_inputs["input_ids"].shape[1]], stock_inputs["input_ids"])
        assert torch.equal(output[:, stock_inputs["input_ids"].shape[1]:], expected)
        assert unwrap(wrapped) is model
        assert torch.equal(model.generate(**stock_inputs, max_new_tokens=5, do_sample=False), stock)


def test_lightning_cli_test_runs_compressed(tmp_path):
    from sparsezip_pl.cli import main

    root = write_mme_folder(tmp_path, subtasks=("existence",), n_images=1)
    config = write_cli_config(tmp_path, "qwen2.5-vl", str(cached_tiny_llava("qwen2.5-vl")), root,
                              {"method": "visionzip", "budget": 3, "visionzip": {"layer": -1}})
    cli = main(["test", "--config", config])
    records = (Path(cli.trainer.log_dir) / "predictions" / "predictions.jsonl").read_text().splitlines()
    assert len(records) == 2
    assert all('"visual_tokens": 3' in record for record in records)
    assert cli.model.eval_results["test/mme/num_samples"] == 2


def test_llm_side_pruning_keeps_m_rope_positions(family):
    """An LLM-side method (FastV-style) on Qwen's 3-D positions: dropping nothing equals the stock
    path; dropping rows at prefill generates with the cache as a recompute without it that drops
    the same rows. (The hook needs one visual count per batch: images of one size here.)"""
    from sparsezip_pl.compress import Geometry, LLMMethod
    from sparsezip_pl.models.llm_hook import llm_pruning

    class KeepFirst(LLMMethod):
        def __init__(self, keep=None):
            super().__init__(None, Geometry(num_heads=1, head_dim=1))
            self.keep = keep

        def prune_layers(self, num_layers):
            return [1]

        def select(self, layer, state):
            assert state.attention(0).shape[:3] == (2, 4, 1)  # the probe runs on M-RoPE embeddings
            count = int(state.visual_mask.sum(1)[0])
            return torch.arange(count if self.keep is None else self.keep).expand(2, -1)

    batch = family.batch_builder("generate")(samples_of([(80, 120), (84, 112)]))
    stock = CompressedLlava(family, {"method": "none"})
    same = CompressedLlava(family, {"method": "none"}, compressor=KeepFirst())
    with torch.no_grad():
        assert torch.equal(same(batch).logits, stock(batch).logits)
        assert torch.equal(same.generate(batch, max_new_tokens=4)[0], stock.generate(batch, max_new_tokens=4)[0])
    method = KeepFirst(keep=5)
    pruned = CompressedLlava(family, {"method": "none"}, compressor=method)
    with torch.no_grad():
        generated, _ = pruned.generate(batch, max_new_tokens=4)
        spliced, _ = pruned.prepare_inputs(batch)
        with llm_pruning(family, method, spliced.visual_mask, spliced.attention_mask.bool()) as state:
            family.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids)
            kept = dict(state.kept)
        assert kept[1].shape[1] == spliced.visual_mask.shape[1] - 12 + 5
        embeds, mask, positions = spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
        length = spliced.visual_mask.shape[1]
        tokens = []
        for step in range(4):
            rows = {1: torch.cat([kept[1], torch.arange(length, embeds.shape[1]).expand(2, -1)], dim=1)}
            visual = torch.nn.functional.pad(spliced.visual_mask, (0, step))
            with llm_pruning(family, method, visual, mask.bool(), fixed_keep=rows):
                token = family.language_model(embeds, mask, positions).logits[:, -1].argmax(-1)
            tokens.append(token)
            embeds = torch.cat([embeds, family.embed_tokens(token[:, None])], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    reference = torch.stack(tokens, dim=1)
    assert first_eos_cut(generated, family.eos_token_id) == first_eos_cut(reference, family.eos_token_id)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_method_none_equals_the_stock_model_in_half_precision(samples, dtype):
    family = load_family("qwen2.5-vl", str(cached_tiny_llava("qwen2.5-vl")), dtype=dtype)
    inputs = processor_inputs(family.processor, samples)
    inputs["pixel_values"] = inputs["pixel_values"].to(family.dtype)
    with torch.no_grad():
        stock = family.model(**inputs).logits
        out = CompressedLlava(family, {"method": "none"})(family.batch_builder("generate")(samples))
    assert out.logits.dtype == family.dtype == getattr(torch, dtype)
    assert torch.equal(out.logits[out.attention_mask.bool()], stock[inputs["attention_mask"].bool()])
