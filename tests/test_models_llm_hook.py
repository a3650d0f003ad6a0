"""The LLM-side hook point on both families: a method that drops nothing equals the stock model,
and one that drops rows at prefill generates with the KV cache exactly as a recompute without the
cache that drops the same rows at the same layer."""

import pytest
import torch

from sparsezip_pl.compress import CompressorConfig, Geometry, LLMMethod
from sparsezip_pl.models import CompressedLlava, load_backend
from sparsezip_pl.models.llm_hook import llm_pruning
from sparsezip_pl.models.tiny import cached_tiny_llava, synthetic_samples


class KeepFirst(LLMMethod):
    """Keeps the first ``keep`` visual tokens (all of them with keep=None) before ``layer``."""

    def __init__(self, layer: int, keep: int | None = None) -> None:
        super().__init__(None, Geometry(num_heads=1, head_dim=1))
        self.layer, self.keep = layer, keep
        self.probed = []

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, layer, state):
        rows = state.attention(layer - 1)  # the probe runs (its shape is checked below)
        self.probed.append(rows.shape)
        count = int(state.visual_mask.sum(1)[0])
        keep = count if self.keep is None else self.keep
        return torch.arange(keep).expand(state.hidden_states.shape[0], -1)


@pytest.fixture(scope="module", params=["hf", "llava"])
def backend(request):
    return load_backend(request.param, cached_tiny_llava(request.param, image_size=112))


def test_a_method_that_drops_nothing_equals_the_stock_model(backend):
    stock = CompressedLlava(backend, CompressorConfig(method="none"))
    method = KeepFirst(layer=1)
    hooked = CompressedLlava(backend, CompressorConfig(method="none"), compressor=method)
    assert hooked.llm_side
    batch = backend.batch_builder("generate")(synthetic_samples(2, seed=3))
    with torch.no_grad():
        assert torch.equal(hooked(batch).logits, stock(batch).logits)
    generated, _ = hooked.generate(batch, max_new_tokens=6)
    expected, _ = stock.generate(batch, max_new_tokens=6)
    assert torch.equal(generated, expected)
    batch_size, heads = 2, backend.model.config.get_text_config().num_attention_heads
    assert method.probed and method.probed[0][:3] == (batch_size, heads, 1)
    assert sum(len(m._forward_pre_hooks) for m in backend.model.modules()) == 0, "hooks removed"


def test_pruned_generation_with_the_cache_equals_a_recompute_that_drops_the_same_rows(backend):
    method = KeepFirst(layer=1, keep=20)
    model = CompressedLlava(backend, CompressorConfig(method="none"), compressor=method)
    batch = backend.batch_builder("generate")(synthetic_samples(2, seed=4))
    generated, _ = model.generate(batch, max_new_tokens=5)

    spliced, _ = model.prepare_inputs(batch)
    padding = spliced.attention_mask.bool()
    with llm_pruning(backend, method, spliced.visual_mask, padding) as state:
        with torch.no_grad():
            backend.language_model(spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids)
        kept = dict(state.kept)
    assert kept[1].shape[1] == spliced.visual_mask.shape[1] - 64 + 20
    with torch.no_grad():
        pruned = model(batch).logits[:, -1]
        full = CompressedLlava(backend, CompressorConfig(method="none"))(batch).logits[:, -1]
    assert not torch.allclose(pruned, full), "the dropped rows change the answer's logits"
    # Without the cache: the whole sequence again at every step, the same prompt rows dropped at
    # layer 1 and every generated token kept.
    embeds, mask, positions = spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
    tokens = []
    for step in range(5):
        extra = torch.arange(spliced.visual_mask.shape[1], embeds.shape[1]).expand(2, -1)
        rows = {1: torch.cat([kept[1], extra], dim=1)}
        visual = torch.nn.functional.pad(spliced.visual_mask, (0, step))
        with llm_pruning(backend, method, visual, mask.bool(), fixed_keep=rows), torch.no_grad():
            logits = backend.language_model(embeds, mask, positions).logits
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        embeds = torch.cat([embeds, backend.embed_tokens(token[:, None])], dim=1)
        mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    assert torch.equal(generated[:, :5], torch.stack(tokens, dim=1))


def test_the_family_gives_the_rotary_embeddings_the_decoder_hands_its_layers(backend):
    """What the hook recomputes for renumbered positions (PyramidDrop) is what the decoder would
    have computed for them."""
    seen = {}

    def record(module, args, kwargs):
        seen["inputs"] = (args[0] if args else kwargs["hidden_states"], kwargs["position_ids"],
                          kwargs["position_embeddings"])

    handle = backend.decoder_layers()[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            CompressedLlava(backend, CompressorConfig(method="none"))(
                backend.batch_builder("generate")(synthetic_samples(2, seed=5)))
    finally:
        handle.remove()
    hidden, positions, (cos, sin) = seen["inputs"]
    assert positions.shape == hidden.shape[:2] and int(positions.max()) > 50
    got_cos, got_sin = backend.rotary_embeddings(hidden, positions)
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
    # Rows of chosen positions only: the same rows as in the whole.
    part_cos, part_sin = backend.rotary_embeddings(hidden[:, ::3], positions[:, ::3])
    assert torch.equal(part_cos, cos[:, ::3]) and torch.equal(part_sin, sin[:, ::3])
    assert not torch.equal(backend.rotary_embeddings(hidden, positions + 1)[0], cos)
