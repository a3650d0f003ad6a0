"""Bad input beyond the data readers' own checks (tests/test_data_*.py): a prompt longer than the
LLM's context is never cut. Under ``on_error: raise`` it stops the run with an error naming the
sample and the lengths; under ``skip`` the sample is left out and counted as ``prompt_too_long``."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from data_fixtures import write_pope_files
from sparsezip_pl.cli import main
from sparsezip_pl.compress import MergingConfig, SparseZipConfig
from sparsezip_pl.data.common import SkipLedger
from sparsezip_pl.data.loader import SkipAwareCollate, SkipCountingDataLoader
from sparsezip_pl.lit.module import SkippingCollate, SparseZipModule
from sparsezip_pl.models.batching import ContextLimit, PromptTooLongError, llm_context_length
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples

COMPRESSOR = {"method": "sparsezip", "k_min": 2, "k_max": 12, "merging": {"contextual_num": 4}}
LONG_QUESTION = "Is there a " + "red " * 5000 + "dog in the image?"  # > 4096 positions

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


@pytest.fixture(scope="module")
def tiny_model():
    return str(cached_tiny_llava("hf", image_size=112))


@pytest.fixture(scope="module")
def module(tiny_model):
    config = SparseZipConfig(method="sparsezip", k_min=2, k_max=12, merging=MergingConfig(contextual_num=4))
    module = SparseZipModule(model_path=tiny_model, compressor=config, max_new_tokens=3)
    module.configure_model()
    return module


def test_context_length_of_the_llm():
    config = SimpleNamespace(max_position_embeddings=4096)
    assert llm_context_length(SimpleNamespace(config=config)) == 4096
    assert llm_context_length(SimpleNamespace(config=config), SimpleNamespace(model_max_length=2048)) == 2048
    assert llm_context_length(SimpleNamespace(config=config), SimpleNamespace(model_max_length=int(1e30))) == 4096
    nested = SimpleNamespace(get_text_config=lambda: SimpleNamespace(max_position_embeddings=512))
    assert llm_context_length(SimpleNamespace(config=nested)) == 512


def test_visual_budget_of_the_check_depends_on_what_runs(module):
    patches = module.backend.num_patches  # 64 at 112 px
    assert module.context_limit("generate") == ContextLimit(4096, 1 + 12 + 4, 3)
    module.objective = "lm"
    assert module.context_limit("train") == ContextLimit(4096, 1 + 12 + 4, 0)
    module.objective = "distill"  # the teacher sees every patch
    assert module.context_limit("train") == ContextLimit(4096, patches, 0)


def test_original_positions_count_the_whole_image_against_the_context(tiny_model):
    config = SparseZipConfig(k_min=2, k_max=12, merging=MergingConfig(contextual_num=4), visual_positions="original")
    module = SparseZipModule(model_path=tiny_model, compressor=config, max_new_tokens=3, objective="lm")
    module.configure_model()
    assert module.context_limit("generate") == ContextLimit(4096, module.backend.num_patches, 3)


def test_too_long_prompt_is_refused_not_cut(module):
    samples = synthetic_samples(3, with_answer=False)
    builder = module.collate_fn("generate")
    ids = builder(samples[:1])["input_ids"]
    text = ids.shape[1] - 1  # one placeholder
    # Exactly at the limit is accepted, one position more is not.
    builder.context = ContextLimit(text + 17 + 3, 17, 3)
    assert builder(samples[:1])["input_ids"].shape == ids.shape
    builder.context = ContextLimit(text + 17 + 2, 17, 3)
    with pytest.raises(PromptTooLongError, match=rf"sample 'mme-0-0': prompt too long for the LLM: {text} text "
                                                 rf"tokens \+ up to 17 visual tokens \+ 3 generated tokens = "
                                                 rf"{text + 20} > context of {text + 19} positions"):
        builder(samples[:1])

    long = dict(samples[1], question=LONG_QUESTION)
    with pytest.raises(PromptTooLongError, match=r"sample 'mme-0-1'.* > context of 4096 positions"):
        module.collate_fn("generate")([samples[0], long, samples[2]])
    # skip: the loader drops the sample and counts it once, whatever the epoch.
    ledger = SkipLedger()
    loader = SkipCountingDataLoader([samples[0], long, samples[2]], batch_size=3, skip_ledger=ledger,
                                    collate_fn=SkipAwareCollate(module.collate_fn("generate", on_error="skip")))
    for _ in range(2):
        (batch,) = list(loader)
        assert [m["sample_id"] for m in batch["meta"]] == ["mme-0-0", "mme-0-2"]
    assert ledger.counts == {"prompt_too_long": 1}
    assert "mme-0-1" in ledger.messages[0] and "4096" in ledger.messages[0]
    # A batch of only too-long prompts is not yielded at all.
    skipping = module.collate_fn("generate", on_error="skip")
    assert isinstance(skipping, SkippingCollate)
    alone = SkipCountingDataLoader([long], batch_size=1, skip_ledger=ledger, collate_fn=SkipAwareCollate(skipping))
    assert list(alone) == []



# The bound of the check on tiled and variable-size families: the most visual tokens an image can
# send, over every tiling. Images at each pinpoint resolution (no letterbox) reach it exactly when
# every map row keeps its newline (``newlines: all``); the stock count bounds method ``none``.
TILED = [
    ("llava-next", {"newlines": "all"}, {"method": "visionzip", "budget": 10}),
    ("llava-next", {"newlines": "all", "compress_views": "together"}, {"method": "visionzip", "budget": 10}),
    ("llava-next", {"newlines": "all"}, {"method": "pool", "budget": 0.5}),
    ("llava-onevision", {"newlines": "all"}, {"method": "pool", "budget": 0.5}),  # more than the stock's shrunk map
    ("llava-onevision", {"newlines": "all", "view_mode": "view"}, {"method": "visionzip", "budget": 10,
                                                                  "visionzip": {"layer": -1}}),
    ("qwen2.5-vl", {}, {"method": "visionzip", "budget": 10, "visionzip": {"layer": -1}}),
    ("llava-next", {"newlines": "all"}, {"method": "none"}),
    ("llava-onevision", {}, {"method": "none"}),
]


@pytest.mark.parametrize(("family", "options", "compressor"), TILED,
                         ids=[f"{f}-{'-'.join(o.values()) or 'default'}-{c['method']}" for f, o, c in TILED])
def test_check_bounds_every_tiling_of_tiled_families(family, options, compressor):
    from vl_family_helpers import samples_of

    from sparsezip_pl.models.tiny import cached_tiny_llava_next

    path = cached_tiny_llava_next(family, image_size=56) if "next" in family else cached_tiny_llava(family)
    module = SparseZipModule(backend=family, model_path=str(path), compressor=compressor, family_options=options,
                             max_new_tokens=3)
    module.configure_model()
    backend = module.backend
    sizes = getattr(backend, "pinpoints_hw", None) or getattr(backend, "pinpoints", None) or [(150, 60), (80, 120)]
    batch = module.collate_fn("generate")(samples_of([tuple(size) for size in sizes]))
    with torch.no_grad():
        sent = int(module.model(batch).visual_mask.sum(1).max())
    limit = module.context_limit("generate")
    if compressor["method"] == "none":
        assert sent <= limit.visual_tokens == backend.max_stock_tokens
    else:
        assert sent == limit.visual_tokens, (sent, limit)


def _pope_with_a_long_question(tmp_path: Path) -> tuple[Path, Path]:
    folder, images = write_pope_files(tmp_path, splits=("random",))
    line = {"question_id": 99, "image": "COCO_val2014_000000000000.jpg", "text": LONG_QUESTION, "label": "yes"}
    with open(folder / "coco_pope_random.json", "a") as handle:
        handle.write(json.dumps(line) + "\n")
    return folder, images


def _test_config(tmp_path, tiny_model, folder, images, on_error) -> str:
    config = {
        "model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR, "max_new_tokens": 3},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(tmp_path / on_error)},
        "data": {"class_path": "sparsezip_pl.lit.datamodules.POPEDataModule",
                 "init_args": {"source": str(folder), "image_dir": str(images), "batch_size": 2, "on_error": on_error}},
    }
    path = tmp_path / f"{on_error}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_evaluation_with_a_too_long_prompt(tmp_path, tiny_model):
    folder, images = _pope_with_a_long_question(tmp_path)
    with pytest.raises(PromptTooLongError, match=r"sample 'random/99': prompt too long .* > context of 4096"):
        main(["test", "--config", _test_config(tmp_path, tiny_model, folder, images, "raise")])

    cli = main(["test", "--config", _test_config(tmp_path, tiny_model, folder, images, "skip")])
    results = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert results["skipped/prompt_too_long"] == 1 and results["skipped/total"] == 1
    assert results["test/pope/num_samples"] == 4
    assert cli.datamodule.skipped == {"prompt_too_long": 1}
    answered = (tmp_path / "skip" / "predictions" / "predictions.jsonl").read_text()
    assert len(answered.splitlines()) == 4 and "random/99" not in answered


# ------------------------------------------------------------ checked before any weight loads
@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if model weights load (every check here must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights loaded before the inputs were checked")

    monkeypatch.setattr("sparsezip_pl.models.load_backend", refuse)


@pytest.mark.parametrize(("compressor", "field"), [
    ({"method": "visionzip", "visionzip": {"dominant": 600}}, r"visionzip: dominant = 600 \+ contextual = 10 is more than the 64"),
    ({"method": "visionzip", "budget": 100}, r"budget = 100 asks for 100 visual tokens, more than the 64"),
    ({"method": "sparsezip", "sparsezip": {"k_max": 65}}, r"compressor.k_max = 65 keeps 65 patches"),
    ({"method": "sparsezip", "budget": 0.5, "sparsezip": {"dynamic_k": False, "merging": {"contextual_num": 40}}},
     r"budget of 32 tokens leaves no room for CLS and merging.contextual_num = 40"),
])
def test_a_budget_larger_than_the_tower_is_a_configuration_error(tiny_model, no_weights, compressor, field):
    from sparsezip_pl.compress import CompressorConfig

    with pytest.raises(ValueError, match=field):
        SparseZipModule(model_path=tiny_model, compressor=CompressorConfig.coerce(compressor))


def test_a_budget_larger_than_the_tower_is_refused_by_the_api_too(tiny_model):
    from transformers import LlavaForConditionalGeneration

    from sparsezip_pl.api import sparsezip

    stock = LlavaForConditionalGeneration.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="more than the 64"):
        sparsezip(stock, method="visionzip", dominant=100, contextual=4)


def _checked_config(tmp_path, tiny_model, data: dict) -> str:
    config = {"model": {"backend": "hf", "model_path": tiny_model, "compressor": COMPRESSOR},
              "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path / "run")},
              "data": data}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_data_path_typo_fails_before_the_weights_load(tmp_path, tiny_model, no_weights):
    folder, images = write_pope_files(tmp_path)
    data = {"class_path": "sparsezip_pl.lit.datamodules.POPEDataModule",
            "init_args": {"source": str(folder) + "-typo", "image_dir": str(images)}}
    with pytest.raises(ValueError, match="pope-typo: not a POPE source"):
        main(["test", "--config", _checked_config(tmp_path, tiny_model, data)])


def test_an_unreadable_first_image_fails_before_the_weights_load(tmp_path, tiny_model, no_weights):
    folder, images = write_pope_files(tmp_path)
    first = json.loads((folder / "coco_pope_random.json").read_text().splitlines()[0])["image"]
    (images / first).write_bytes(b"not an image")
    data = {"class_path": "sparsezip_pl.lit.datamodules.POPEDataModule",
            "init_args": {"source": str(folder), "image_dir": str(images), "splits": ["random"]}}
    with pytest.raises(ValueError, match=f"sample random/1: image .*{first}: cannot decode"):
        main(["test", "--config", _checked_config(tmp_path, tiny_model, data)])


def test_a_sample_of_an_unknown_benchmark_is_an_error(module):
    samples = synthetic_samples(2, task="vqa")
    with pytest.raises(ValueError, match="sample task 'vqa' is not a known benchmark; known: \\['mme', 'pope'\\]"):
        module._answer(module.collate_fn("generate")(samples))
