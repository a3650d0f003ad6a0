"""FastV inside the LLM of both families: the budget mapping, the kept rows, the official ranking
against an eager-attention reference (and the paper's), batching, determinism, the KV cache, and a
CLI run whose records carry the visual tokens the LLM saw."""

import json

import pytest
import torch
import yaml
from llm_method_helpers import eager_attentions, kept_visual, prefill, recompute_greedy, top_visual

from sparsezip_pl.cli import main
from sparsezip_pl.compress import CompressorConfig, Geometry
from sparsezip_pl.compress.methods.fastv import FastV, FastVConfig, kept_after
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.models import CompressedLlava, load_backend
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples

LAYERS, K, VISUAL = 4, 2, 64  # the tiny LLaVA here: 4 decoder layers, 8 x 8 patches


@pytest.fixture(scope="module", params=["hf", "llava"])
def tiny(request):
    path = cached_tiny_llava(request.param, image_size=112, text_layers=LAYERS)
    return request.param, path, load_backend(request.param, path)


def fastv(backend, budget=None, **options) -> CompressedLlava:
    return CompressedLlava(backend, CompressorConfig.coerce({"method": "fastv", "budget": budget, "fastv": options}))


def test_the_budget_maps_to_the_tokens_kept_after_layer_k():
    average = FastVConfig()
    # LLaVA-1.5-7B (32 layers, 576 patches, K = 2): the papers' 64 / 128 / 192 average tokens.
    assert [kept_after(average, t, 576, 32) for t in (64, 128, 192)] == [30, 98, 166]
    assert kept_after(average, None, 576, 32) == 288  # the title's K = 2, R = 50%
    assert kept_after(FastVConfig(prune_ratio=0.75), None, 576, 32) == 144
    assert kept_after(FastVConfig(budget_mode="kept"), 64, 576, 32) == 64
    assert kept_after(FastVConfig(budget_mode="kept"), 0.25, 576, 32) == 144
    with pytest.raises(ValueError, match=r"least average \(one token kept\) is 36.94"):
        kept_after(average, 36, 576, 32)
    geometry = Geometry(num_heads=1, head_dim=1, num_patches=VISUAL)
    with pytest.raises(ValueError, match="fastv.layer must be an int >= 1"):
        FastV(FastVConfig(layer=0), geometry)
    with pytest.raises(ValueError, match="fastv.criterion must be one of"):
        FastV(FastVConfig(criterion="received"), geometry)
    with pytest.raises(ValueError, match="more than the 64"):
        FastV(FastVConfig(), geometry, budget=65)
    with pytest.raises(ValueError, match="fastv.layer = 4 must be below the decoder's 4 layers"):
        FastV(FastVConfig(layer=4), geometry).prune_layers(LAYERS)


def test_the_budget_is_met_and_the_run_records_what_the_llm_saw(tiny):
    _, _, backend = tiny
    model = fastv(backend, budget=40)  # an average of 40 over 4 layers: T' = (4 * 40 - 2 * 64) / 2 = 16
    batch = backend.batch_builder("generate")(synthetic_samples(3, seed=5))
    spliced, _ = model.prepare_inputs(batch)
    state, _ = prefill(backend, model.compressor, spliced)
    assert list(state.kept) == [K]
    assert state.kept[K].shape[1] == spliced.visual_mask.shape[1] - VISUAL + 16
    assert [len(v) for v in kept_visual(state.kept[K], spliced.visual_mask)] == [16] * 3
    _, compression = model.generate(batch, max_new_tokens=2)
    assert compression.num_tokens.tolist() == [VISUAL] * 3  # the vision side sends every patch
    assert compression.llm_visual_tokens.tolist() == [40.0] * 3
    assert compression.visual_tokens.tolist() == [40.0] * 3
    assert compression.llm_visual_tokens_final.tolist() == [16] * 3
    with torch.no_grad():
        assert model(batch).compression.llm_visual_tokens.tolist() == [40.0] * 3
    _, compression = fastv(backend, budget=10, budget_mode="kept", layer=1).generate(batch, max_new_tokens=1)
    assert compression.llm_visual_tokens.tolist() == [(1 * VISUAL + 3 * 10) / LAYERS] * 3


@pytest.mark.parametrize("criterion", ["last_token", "mean_received"])
def test_the_ranking_is_the_attention_of_an_eager_reference(tiny, criterion):
    family, path, backend = tiny
    model = fastv(backend, budget=16, budget_mode="kept", criterion=criterion)
    batch = backend.batch_builder("generate")(synthetic_samples(3, seed=7))  # prompts of 3 lengths: padding
    spliced, _ = model.prepare_inputs(batch)
    recorded = []
    scores = model.compressor.scores
    model.compressor.scores = lambda state: recorded.append(scores(state)) or recorded[-1]
    state, _ = prefill(backend, model.compressor, spliced)

    attention = eager_attentions(family, path, spliced)[K - 1].float().mean(dim=1)  # layer K-1, mean over heads
    real = spliced.attention_mask.bool()
    if criterion == "last_token":  # the official code: the last token's row
        reference = attention[:, -1]
    else:  # the paper: the attention received, averaged over the real query tokens
        reference = (attention * real[:, :, None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
    visual = spliced.visual_mask
    torch.testing.assert_close(recorded[0], reference[visual].view(3, VISUAL), rtol=1e-4, atol=1e-6)
    assert kept_visual(state.kept[K], visual) == top_visual(reference, visual, 16)


def test_batched_equals_per_sample_and_runs_are_deterministic(tiny):
    _, _, backend = tiny
    model = fastv(backend, budget=40)
    samples = synthetic_samples(3, seed=6)
    build = backend.batch_builder("generate")

    def selection(chosen):
        spliced, _ = model.prepare_inputs(build(chosen))
        state, _ = prefill(backend, model.compressor, spliced)
        return kept_visual(state.kept[K], spliced.visual_mask)

    together = selection(samples)
    assert len({tuple(kept) for kept in together}) == 3, "each image keeps its own tokens"
    assert together == [selection([sample])[0] for sample in samples]
    assert selection(samples) == together
    first, _ = model.generate(build(samples), max_new_tokens=4)
    again, _ = model.generate(build(samples), max_new_tokens=4)
    assert torch.equal(first, again)


def test_generation_with_the_cache_equals_a_recompute_that_drops_the_same_rows(tiny):
    _, _, backend = tiny
    model = fastv(backend, budget=40)
    batch = backend.batch_builder("generate")(synthetic_samples(2, seed=4))
    generated, _ = model.generate(batch, max_new_tokens=5)
    spliced, _ = model.prepare_inputs(batch)
    positions = {}

    def recorder(index):
        def hook(module, args, kwargs):
            positions[index] = kwargs["position_ids"]
        return hook

    state, logits = prefill(backend, model.compressor, spliced, recorder)
    kept = state.kept[K]
    # Kept tokens keep their original positions (the official code).
    assert torch.equal(positions[K], spliced.position_ids.gather(1, kept))
    with torch.no_grad():
        stock = CompressedLlava(backend, CompressorConfig(method="none"))(batch).logits[:, -1]
    assert not torch.allclose(logits[:, -1], stock), "the dropped rows change the answer's logits"
    assert torch.equal(generated[:, :5], recompute_greedy(backend, model.compressor, spliced, {K: kept}, 5))


def test_a_cli_test_run_reports_the_visual_tokens_the_llm_saw(tmp_path):
    world = generate_world(tmp_path / "world", seed=1, n_mme_images=1, n_pope_images=1, n_instruct=0)
    config = {
        "model": {"backend": "hf", "model_path": str(cached_tiny_llava("hf", image_size=112)), "max_new_tokens": 2},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(tmp_path / "run")},
        "data": {"class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
                 "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                               "pope_image_dir": world["pope_image_folder"], "batch_size": 4}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # The tiny model has 2 decoder layers: K = 1, and 16 tokens kept after it.
    main(["test", "--config", str(tmp_path / "config.yaml"), "--model.compressor.method", "fastv",
          "--model.compressor.budget", "16", "--model.compressor.fastv.layer", "1",
          "--model.compressor.fastv.budget_mode", "kept"])
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    records = [json.loads(line) for line in (run / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert records and {r["visual_tokens"] for r in records} == {(VISUAL + 16) / 2}
    assert results["budget/tokens_mean"] == pytest.approx((VISUAL + 16) / 2)
    assert results["budget/compression_ratio"] == pytest.approx((VISUAL + 16) / 2 / VISUAL)
