"""The tower with capture: stock feature-layer states, exact CLS attention, stops early, no hooks left."""

import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from sparsezip_pl.models.capture import encode_with_capture, find_vision_encoder


@pytest.fixture(scope="module")
def tower():
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        initializer_factor=5.0,
    )
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 3, 56, 56)


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("feature_layer", [-2, -1, 3])
def test_capture_hidden_matches_stock_hidden_states(tower, pixels, feature_layer):
    stock = tower(pixels, output_hidden_states=True).hidden_states[feature_layer]
    capture = encode_with_capture(tower, pixels, feature_layer, [feature_layer])
    assert torch.equal(capture.hidden, stock)


def test_captured_queries_and_keys_give_the_stock_cls_attention(tower, pixels):
    layers = [-2, -3, -5]
    capture = encode_with_capture(tower, pixels, -2, layers)
    assert capture.queries.shape == (3, 3, 4, 8)
    assert capture.keys.shape == (3, 3, 4, 17, 8)
    eager = CLIPVisionModel(tower.config).eval()
    eager.load_state_dict(tower.state_dict())
    eager.set_attn_implementation("eager")
    attentions = eager(pixels, output_attentions=True).attentions
    for slot, layer in enumerate(layers):
        q, k = capture.queries[slot], capture.keys[slot]
        cls_attention = torch.softmax(torch.einsum("bhd,bhld->bhl", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        # hidden_states[l] is the output of encoder layer l - 1 (negative: counted from the end).
        index = layer - 1 if layer > 0 else len(attentions) + layer
        torch.testing.assert_close(cls_attention, attentions[index][:, :, 0], rtol=1e-5, atol=1e-6)


def test_tower_stops_after_the_feature_layer(tower, pixels):
    layers = find_vision_encoder(tower).layers
    calls = []
    handle = layers[-1].register_forward_hook(lambda *args: calls.append(1))
    try:
        encode_with_capture(tower, pixels, -2, [-2])
    finally:
        handle.remove()
    assert calls == []


def test_hooks_are_removed_even_on_errors(tower, pixels):
    before = _hook_count(tower)
    encode_with_capture(tower, pixels, -2, [-2, -3])
    assert _hook_count(tower) == before

    layers = find_vision_encoder(tower).layers

    def boom(*args):
        raise RuntimeError("boom")

    handle = layers[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            encode_with_capture(tower, pixels, -2, [-2, -3])
    finally:
        handle.remove()
    assert _hook_count(tower) == before


def test_scoring_layer_after_feature_layer_is_refused(tower, pixels):
    with pytest.raises(ValueError, match="must not come after the feature layer"):
        encode_with_capture(tower, pixels, -3, [-2])
