"""PyramidDrop inside the LLM of both families: stages and the budget's lambda, the kept rows per
stage, the ranking against an eager-attention reference, the contiguous renumbering of positions
(and the original positions as an option), batching, determinism, the KV cache, and a CLI run."""

import json

import pytest
import torch
import yaml
from llm_method_helpers import eager_attentions, kept_visual, prefill, recompute_greedy, top_visual

from sparsezip_pl.cli import main
from sparsezip_pl.compress import CompressorConfig, Geometry
from sparsezip_pl.compress.methods.pdrop import (
    PDropConfig,
    PyramidDrop,
    average_tokens,
    fit_lambda,
    lambda_counts,
    stage_layers,
)
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.models import CompressedLlava, load_backend
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples

LAYERS, VISUAL = 4, 64  # the tiny LLaVA here: 4 decoder layers, 8 x 8 patches
STAGES, COUNTS = [1, 2, 3], [32, 16, 8]  # the default stages on 4 layers; budget 30 = (64 + 32 + 16 + 8) / 4


@pytest.fixture(scope="module", params=["hf", "llava"])
def tiny(request):
    path = cached_tiny_llava(request.param, image_size=112, text_layers=LAYERS)
    return request.param, path, load_backend(request.param, path)


def pdrop(backend, budget=None, **options) -> CompressedLlava:
    return CompressedLlava(backend, CompressorConfig.coerce({"method": "pdrop", "budget": budget, "pdrop": options}))


def test_stages_and_the_budget_mapping():
    config = PDropConfig()
    assert stage_layers(config, 32) == [8, 16, 24]  # the official layer_list
    assert stage_layers(config, 40) == [10, 20, 30]
    assert stage_layers(config, LAYERS) == STAGES and stage_layers(config, 2) == [1]
    assert stage_layers(PDropConfig(layers=[8, 16, 24]), 40) == [8, 16, 24]
    with pytest.raises(ValueError, match="pdrop.layers must be increasing"):
        stage_layers(PDropConfig(layers=[16, 8]), 32)
    counts = lambda_counts(0.5, 576, 3)
    assert counts == [288, 144, 72] and average_tokens(counts, [8, 16, 24], 576, 32) == 270
    _, counts = fit_lambda(192, [8, 16, 24], 576, 32)
    assert average_tokens(counts, [8, 16, 24], 576, 32) == 192
    with pytest.raises(ValueError, match=r"least average \(one token left\) is 163.5"):
        fit_lambda(64, [8, 16, 24], 576, 32)
    # As close as the whole counts allow: no lambda on a fine grid comes closer.
    grid = [lambda_counts(lam, VISUAL, 3) for lam in torch.linspace(0.2, 1, 20001).tolist()]
    reachable = {average_tokens(counts, STAGES, VISUAL, LAYERS) for counts in grid if counts[-1] >= 1}
    for target in (21.7, 22, 30, 41.3, 57, 64):
        _, counts = fit_lambda(target, STAGES, VISUAL, LAYERS)
        gap = abs(average_tokens(counts, STAGES, VISUAL, LAYERS) - target)
        assert gap <= min(abs(a - target) for a in reachable) + 1e-9
    with pytest.raises(ValueError, match=r"least average \(one token left\) is 21.25"):
        fit_lambda(20, STAGES, VISUAL, LAYERS)


def test_options_are_checked():
    geometry = Geometry(num_heads=1, head_dim=1, num_patches=VISUAL)
    with pytest.raises(ValueError, match="pdrop.ratios must be non-increasing"):
        PyramidDrop(PDropConfig(ratios=[0.25, 0.5]), geometry)
    with pytest.raises(ValueError, match="pdrop.lam must lie in"):
        PyramidDrop(PDropConfig(lam=0.0), geometry)
    with pytest.warns(UserWarning, match="budget = 30 is not used"):
        method = PyramidDrop(PDropConfig(ratios=[0.5, 0.25, 0.125]), geometry, budget=30)
    assert method.stage_counts(576, 32) == [288, 144, 72]
    with pytest.raises(ValueError, match="pdrop.ratios has 3 entries for the 1 stages"):
        method.stage_counts(VISUAL, 2)
    assert PyramidDrop(PDropConfig(), geometry, budget=30).stage_counts(VISUAL, LAYERS) == COUNTS
    assert PyramidDrop(PDropConfig(), geometry).renumber_positions
    assert not PyramidDrop(PDropConfig(keep_positions=True), geometry).renumber_positions


def test_the_budget_is_met_at_every_stage_and_the_run_records_what_the_llm_saw(tiny):
    _, _, backend = tiny
    model = pdrop(backend, budget=30)
    batch = backend.batch_builder("generate")(synthetic_samples(3, seed=5))
    spliced, _ = model.prepare_inputs(batch)
    state, _ = prefill(backend, model.compressor, spliced)
    length = spliced.visual_mask.shape[1]
    assert list(state.kept) == STAGES
    for stage, count in zip(STAGES, COUNTS):
        assert state.kept[stage].shape[1] == length - VISUAL + count
        assert [len(v) for v in kept_visual(state.kept[stage], spliced.visual_mask)] == [count] * 3
    later = [set(v) for v in kept_visual(state.kept[3], spliced.visual_mask)]
    assert all(a <= set(b) for a, b in zip(later, kept_visual(state.kept[2], spliced.visual_mask)))
    _, compression = model.generate(batch, max_new_tokens=2)
    assert compression.num_tokens.tolist() == [VISUAL] * 3
    assert compression.llm_visual_tokens.tolist() == [30.0] * 3
    assert compression.llm_visual_tokens_final.tolist() == [8] * 3


def test_the_ranking_is_the_attention_of_an_eager_reference(tiny):
    family, path, backend = tiny
    model = pdrop(backend, budget=30)
    batch = backend.batch_builder("generate")(synthetic_samples(3, seed=7))  # prompts of 3 lengths: padding
    spliced, _ = model.prepare_inputs(batch)
    state, _ = prefill(backend, model.compressor, spliced)
    kept = state.kept
    visual = spliced.visual_mask
    # Stage 1 ranks with layer 1's own attention on its (full) input: the eager model's map of layer 1.
    last = eager_attentions(family, path, spliced)[1].float().mean(dim=1)[:, -1]
    assert kept_visual(kept[1], visual) == top_visual(last, visual, COUNTS[0])
    # Later stages: layer s's map on the rows (and renumbered positions) left by the stages before.
    for stage, count, replay in ((2, COUNTS[1], {1: kept[1], 2: kept[1], 3: kept[1]}),
                                 (3, COUNTS[2], {1: kept[1], 2: kept[2], 3: kept[2]})):
        last = eager_attentions(family, path, spliced, model.compressor, replay)[stage].float().mean(dim=1)[:, -1]
        rows_visual = visual.gather(1, replay[stage])
        chosen = top_visual(last, rows_visual, count)
        present = kept_visual(replay[stage], visual)
        assert kept_visual(kept[stage], visual) == [[p[i] for i in c] for p, c in zip(present, chosen)]


@pytest.mark.parametrize("keep_positions", [False, True])
def test_positions_are_renumbered_contiguously_or_kept(tiny, keep_positions):
    _, _, backend = tiny
    model = pdrop(backend, budget=30, keep_positions=keep_positions)
    batch = backend.batch_builder("generate")(synthetic_samples(2, seed=4))
    spliced, _ = model.prepare_inputs(batch)
    seen = {}

    def recorder(index):
        def hook(module, args, kwargs):
            seen[index] = (kwargs["position_ids"], kwargs["position_embeddings"])
        return hook

    state, _ = prefill(backend, model.compressor, spliced, recorder)
    real = spliced.attention_mask.bool()
    stock_cos, stock_sin = seen[0][1]
    full = int(real.sum(1).argmax())  # the sample without padding: row j holds position j
    for stage in STAGES:
        rows = state.kept[stage]
        positions, (cos, sin) = seen[stage]
        if keep_positions:
            assert torch.equal(positions, spliced.position_ids.gather(1, rows))
        else:
            for b in range(2):
                kept_real = real[b, rows[b]]
                assert torch.equal(positions[b, kept_real], torch.arange(int(kept_real.sum())))
        # The rotary embeddings are those of the positions the rows carry.
        n = rows.shape[1]
        expected = (stock_cos[full, positions[full]], stock_sin[full, positions[full]])
        assert torch.equal(cos[full], expected[0]) and torch.equal(sin[full], expected[1]) and cos.shape[1] == n


@pytest.mark.parametrize("keep_positions", [False, True])
def test_generation_with_the_cache_equals_a_recompute_that_drops_the_same_rows(tiny, keep_positions):
    _, _, backend = tiny
    model = pdrop(backend, budget=30, keep_positions=keep_positions)
    batch = backend.batch_builder("generate")(synthetic_samples(2, seed=4))
    generated, _ = model.generate(batch, max_new_tokens=5)
    spliced, _ = model.prepare_inputs(batch)
    state, logits = prefill(backend, model.compressor, spliced)
    with torch.no_grad():
        stock = CompressedLlava(backend, CompressorConfig(method="none"))(batch).logits[:, -1]
    assert not torch.allclose(logits[:, -1], stock), "the dropped rows change the answer's logits"
    assert torch.equal(generated[:, :5], recompute_greedy(backend, model.compressor, spliced, dict(state.kept), 5))


def test_batched_equals_per_sample_and_runs_are_deterministic(tiny):
    _, _, backend = tiny
    model = pdrop(backend, budget=30)
    samples = synthetic_samples(3, seed=6)
    build = backend.batch_builder("generate")

    def selection(chosen):
        spliced, _ = model.prepare_inputs(build(chosen))
        state, _ = prefill(backend, model.compressor, spliced)
        return [kept_visual(state.kept[stage], spliced.visual_mask) for stage in STAGES]

    together = selection(samples)
    assert len({tuple(kept) for kept in together[0]}) == 3, "each image keeps its own tokens"
    alone = [selection([sample]) for sample in samples]
    assert together == [[single[s][0] for single in alone] for s in range(len(STAGES))]
    assert selection(samples) == together
    first, _ = model.generate(build(samples), max_new_tokens=4)
    again, _ = model.generate(build(samples), max_new_tokens=4)
    assert torch.equal(first, again)


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
    # The tiny model has 2 decoder layers, so one stage, at layer 1: an average of 40 = (64 + 16) / 2.
    main(["test", "--config", str(tmp_path / "config.yaml"), "--model.compressor.method", "pdrop",
          "--model.compressor.budget", "40"])
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    records = [json.loads(line) for line in (run / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert records and {r["visual_tokens"] for r in records} == {40.0}
    assert results["budget/tokens_mean"] == pytest.approx(40.0)
