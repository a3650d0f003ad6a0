"""Bad configurations and bad inputs raise ValueError naming the problem."""

import pytest
import torch

from sparsezip_pl.compress import DynKConfig, MergingConfig, SparseZipCompressor, SparseZipConfig, VisionCapture
from sparsezip_pl.compress.testing import random_capture, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():  # tiny tensors: see single_thread's docstring
        yield


@pytest.mark.parametrize(
    "kwargs,text_dim,match",
    [
        ({"method": "tokenmerge"}, None, "method"),
        ({"layers": []}, None, "layers"),
        ({"layers": [-2.5]}, None, "layers"),
        ({"k_min": 10, "k_max": 5}, None, r"k_min \(10\) must not exceed k_max \(5\)"),
        ({"k_min": -1}, None, "k_min"),
        ({"dominant": -3}, None, "dominant"),
        ({"dominant": 0}, None, r"dominant must be an int >= 1 \(dominant tokens, CLS included"),
        ({"merging": MergingConfig(contextual_num=-1)}, None, "contextual_num"),
        ({"merging": MergingConfig(kmeans_iters=-2)}, None, "kmeans_iters"),
        ({"merging": MergingConfig(kmeans_init_factor=0.5)}, None, "kmeans_init_factor"),
        ({"dynk": DynKConfig(rule="variance")}, None, "dynk.rule"),
        ({"dynk": DynKConfig(scale=-1.0)}, None, "dynk.scale"),
        ({"tau_sim": 0.0}, None, "tau_sim"),
        ({"select_tau": -1.0}, None, "select_tau"),
        ({"cross_beta": -0.1}, None, "cross_beta"),
        ({"cross_beta": 0.5}, None, "text_dim"),
    ],
)
def test_bad_config(kwargs, text_dim, match):
    with pytest.raises(ValueError, match=match):
        SparseZipCompressor(SparseZipConfig(**kwargs), num_heads=4, head_dim=16, text_dim=text_dim)


@pytest.mark.parametrize("num_heads,head_dim", [(0, 16), (4, -1)])
def test_bad_geometry(num_heads, head_dim):
    with pytest.raises(ValueError, match="num_heads|head_dim"):
        SparseZipCompressor(SparseZipConfig(), num_heads=num_heads, head_dim=head_dim)


def _cap(**replace):
    cap = random_capture(batch=2, num_patches=20, num_heads=4, head_dim=16, num_layers=1)
    fields = {"hidden": cap.hidden, "queries": cap.queries, "keys": cap.keys}
    fields.update(replace)
    return VisionCapture(**fields)


@pytest.mark.parametrize(
    "capture,match",
    [
        (_cap(hidden=torch.randn(21, 32)), r"capture.hidden must be \[B, L, C\]"),
        (_cap(hidden=torch.randn(0, 21, 32)), "empty batch"),
        (_cap(hidden=torch.randn(2, 1, 32)), "L >= 2"),
        (_cap(hidden=torch.ones(2, 21, 32, dtype=torch.long)), "floating point"),
        (_cap(queries=torch.randn(2, 4, 16)), r"capture.queries must be \[S, B, h, d\]"),
        (_cap(queries=torch.randn(1, 2, 3, 16)), r"capture.queries .* got \(1, 2, 3, 16\)"),
        (_cap(keys=torch.randn(1, 2, 4, 20, 16)), r"capture.keys must be \[S, B, h, L, d\]"),
        (_cap(keys=torch.randn(2, 2, 4, 21, 16)), "S = len"),
        (_cap(keys=None), "capture.keys must be a tensor"),
        (_cap(hidden=torch.full((2, 21, 32), float("nan"))), "capture.hidden contains NaN or Inf"),
        (_cap(keys=torch.full((1, 2, 4, 21, 16), float("inf"))), "capture.keys contains NaN or Inf"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_capture(capture, match):
    comp = SparseZipCompressor(SparseZipConfig(), num_heads=4, head_dim=16)
    with pytest.raises(ValueError, match=match):
        comp(capture)


def test_finite_check_can_be_disabled_and_run_explicitly():
    comp = SparseZipCompressor(SparseZipConfig(), num_heads=4, head_dim=16, check_inputs=False)
    bad = _cap(queries=torch.full((1, 2, 4, 16), float("nan")))
    comp(bad)  # no host-syncing check in the forward
    with pytest.raises(ValueError, match="capture.queries contains NaN or Inf"):
        comp.validate_capture(bad)


def test_bad_text_inputs():
    comp = SparseZipCompressor(SparseZipConfig(cross_beta=0.5), num_heads=4, head_dim=16, text_dim=8)
    cap = _cap()
    with pytest.raises(ValueError, match="cross_beta > 0 needs text_embeds"):
        comp(cap)
    with pytest.raises(ValueError, match=r"text_embeds must be \[B, T, text_dim\]"):
        comp(cap, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"text_mask must be \[B, T\]"):
        comp(cap, torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_mask must be bool"):
        comp(cap, torch.randn(2, 5, 8), torch.ones(2, 5))
    with pytest.raises(ValueError, match="text_embeds contains NaN"):
        comp(cap, torch.full((2, 5, 8), float("nan")))


def test_huge_but_finite_inputs_are_accepted():
    # Their sum overflows float32, which must not be mistaken for a NaN/Inf input.
    comp = SparseZipCompressor(SparseZipConfig(), num_heads=4, head_dim=16)
    cap = _cap()
    huge = VisionCapture(cap.hidden.sign() * 3e38, cap.queries, cap.keys)
    out = comp(huge)
    assert out.mask[:, 0].all()
