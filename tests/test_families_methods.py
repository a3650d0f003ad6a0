"""Every registered method on every model family: a forward and a cached greedy generation run,
and the LLM sees fewer visual tokens than the stock model sends (tiny random-weight checkpoints of
each family; the families' own tests check stock equality and exact budgets in depth)."""

import pytest
import torch
from vl_family_helpers import samples_of

from sparsezip_pl.compress import get_method, method_names
from sparsezip_pl.models import CompressedLlava, load_family
from sparsezip_pl.models.tiny import cached_tiny_llava, cached_tiny_llava_next

# Two images of different sizes per family (NeXT: 56 px views of 4 x 4 patches, up to 5 views).
FAMILIES = {
    "hf": [(336, 336), (336, 336)],
    "llava": [(336, 336), (336, 336)],
    "llava-next": [(60, 100), (130, 50)],
    "llava-next-original": [(60, 100), (130, 50)],
    "llava-onevision": [(80, 120), (150, 60)],
    "qwen2.5-vl": [(80, 120), (150, 60)],
}
NO_CLS = {"llava-onevision", "qwen2.5-vl"}  # their towers' last layer is the feature layer
METHODS = [name for name in method_names() if name != "none"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    if "next" in name:
        return load_family(name, cached_tiny_llava_next(name, image_size=56))
    return load_family(name, str(cached_tiny_llava(name)))


def method_config(family_name: str, method: str) -> dict:
    """A budget every family can meet (NeXT splits a vision-side budget over its 5 views) and the
    options a tiny 2-layer LLM and a no-CLS tower need."""
    config: dict = {"method": method, "budget": 10 if "next" in family_name else 6}
    layer = -1 if family_name in NO_CLS else -2
    sections = {
        "sparsezip": {"layers": [layer], "merging": {"contextual_num": 1}, "k_min": 1},
        "visionzip": {"layer": layer},
        "vispruner": {"layer": layer},
        # 2 decoder layers: prune after layer 1, half of the image tokens (FastV's budget as a count).
        "fastv": {"layer": 1, "budget_mode": "kept"},
        # Qwen's decoder gets M-RoPE positions the hook cannot renumber: keep them (FastV's way).
        "pdrop": {"layers": [1], "ratios": [0.5], "keep_positions": family_name == "qwen2.5-vl"},
    }
    if method in sections:
        config[method] = sections[method]
    if method == "fastv":
        config["budget"] = 0.5
    if method == "pdrop":
        config.pop("budget")
    return config


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_every_family(family, method):
    llm_side = get_method(method).side == "llm"
    samples = samples_of(FAMILIES[family.family])
    if llm_side:  # LLM-side pruning needs equal visual counts in a batch: one sample
        samples = samples[:1]
    batch = family.batch_builder("generate")(samples)
    stock = CompressedLlava(family, {"method": "none"})
    model = CompressedLlava(family, method_config(family.family, method))
    with torch.no_grad():
        stock_tokens = stock(batch).visual_mask.sum(1)
        out = model(batch)
        generated, compression = model.generate(batch, max_new_tokens=2, min_new_tokens=2)
    assert generated.shape == (len(samples), 2)
    if llm_side:
        assert torch.equal(out.visual_mask.sum(1), stock_tokens)  # pruned inside the decoder
        assert compression.llm_visual_tokens is not None
        assert (compression.llm_visual_tokens < stock_tokens.float()).all()
    else:
        tokens = out.visual_mask.sum(1)
        assert (tokens > 0).all() and (tokens < stock_tokens).all(), (tokens, stock_tokens)
