"""The CPU inference paths against their plain forms: linear attention's slabbed state form (one
reused feature buffer, the maps' factors folded into the state) and the V shortcut's skipped passes."""

from __future__ import annotations

import pytest
import torch
from attnopt.kernels import (
    linear_attention,
    linear_attention_quadratic,
    linear_attention_reference,
    linear_reference,
)

from attnopt.variants.shortcut import ValueShortcut


def _inputs(n_queries, n_keys, heads=4, kv_heads=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n_queries, 8, generator=generator, dtype=torch.float64).to(dtype)
    k = torch.randn(2, kv_heads, n_keys, 8, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(2, kv_heads, n_keys, 6, generator=generator, dtype=torch.float64).to(dtype)
    key_mask = torch.rand(2, n_keys, generator=generator) > 0.3
    key_mask[1, : n_keys // 2] = False
    return q, k, v, key_mask


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("feature_scale", [1.0, 0.35, 1.7, -0.6, 0.0])
@pytest.mark.parametrize("slab_elements", [1, 8 * 13, 10**9])
@pytest.mark.parametrize("masked", [False, True])
def test_inference_path_equals_the_quadratic_form(monkeypatch, feature_map, normalization, feature_scale,
                                                  slab_elements, masked):
    """No gradient: slabs of one head, a few, or all, with GQA, masks and every scale (the factors
    relu and identity leave out go onto the state, focused's per-row ratio into the normaliser)."""
    monkeypatch.setattr(linear_reference, "SLAB_ELEMENTS", slab_elements)
    q, k, v, key_mask = _inputs(11, 13)
    if feature_map == "identity":
        q, k = q.abs(), k.abs()
    options = {"feature_map": feature_map, "normalization": normalization, "power": 2.5,
               "key_mask": key_mask if masked else None}
    expected = linear_attention_quadratic(q * feature_scale, k * feature_scale, v, **options)
    with torch.no_grad():
        actual = linear_attention_reference(q, k, v, feature_scale=feature_scale, **options)
    torch.testing.assert_close(actual, expected)
    with_grad = linear_attention_reference(q.clone().requires_grad_(), k, v, feature_scale=feature_scale, **options)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, expected)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
def test_inference_path_reads_non_contiguous_inputs_and_leaves_them_alone(feature_map):
    """Inputs in a (B, N, H, d) layout viewed as (B, H, N, d): read where they are, never written."""
    q, k, v, key_mask = _inputs(9, 9, heads=2, kv_heads=2)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    if feature_map == "identity":
        q, k = q.abs(), k.abs()
    originals = [x.clone() for x in (q, k, v)]
    options = {"feature_map": feature_map, "key_mask": key_mask, "feature_scale": 0.5}
    expected = linear_attention_quadratic(q, k, v, **options)
    with torch.no_grad():
        out = linear_attention(q, k, v, **options)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous()
    for x, original in zip((q, k, v), originals):
        assert torch.equal(x, original)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused"])
def test_inference_path_fp32_matches_the_fp64_oracle(feature_map):
    """fp32 at a realistic size: only fp32 rounding away from the float64 quadratic form."""
    q, k, v, _ = _inputs(300, 300, heads=3, kv_heads=3, dtype=torch.float32)
    with torch.no_grad():
        out = linear_attention(q, k, v, feature_map=feature_map, feature_scale=0.125**0.5)
        expected = linear_attention_quadratic(q.double(), k.double(), v.double(), feature_map=feature_map,
                                              feature_scale=0.125**0.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


def test_inference_path_drops_masked_keys_even_when_they_are_not_finite():
    q, k, v, key_mask = _inputs(7, 10)
    expected = linear_attention_quadratic(q, k, v, key_mask=key_mask, feature_map="focused")
    poisoned = k.clone()
    poisoned[:, 0][~key_mask] = float("nan")
    poisoned[:, 1][~key_mask] = float("inf")
    for feature_map in ("elu1", "relu", "focused", "identity"):
        clean_q, clean_k = (q.abs(), k.abs()) if feature_map == "identity" else (q, k)
        bad_k = poisoned.abs() if feature_map == "identity" else poisoned
        expected = linear_attention_quadratic(clean_q, clean_k, v, key_mask=key_mask, feature_map=feature_map)
        with torch.no_grad():
            actual = linear_attention_reference(clean_q, bad_k, v, key_mask=key_mask, feature_map=feature_map)
        torch.testing.assert_close(actual, expected)


def _shortcut(weights: list[float], heads: int = 4) -> ValueShortcut:
    shortcut = ValueShortcut(heads, (-1, 0, 2))
    with torch.no_grad():
        shortcut.weights.copy_(torch.tensor(weights).expand(heads, 4))
    return shortcut


def _spelled_out(shortcut: ValueShortcut, out: torch.Tensor, v: torch.Tensor, key_valid) -> torch.Tensor:
    features = shortcut.features(out, v, key_valid)
    return (features * shortcut.weights[None, :, None, None, :]).sum(-1)


@pytest.mark.parametrize("weights", [[1.0, 0.0, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0], [1.0, 0.0, 0.3, 0.0],
                                     [0.9, 0.05, 0.1, -0.2]])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_shortcut_skips_only_passes_that_change_nothing(weights, kv_heads, masked):
    """w₀ = 1 and offsets weighted 0 in every head are skipped in CPU inference; the result is the
    weighted sum of the features all the same, with the output reused or not."""
    shortcut = _shortcut(weights)
    generator = torch.Generator().manual_seed(1)
    out = torch.randn(2, 4, 9, 5, generator=generator, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 9, 5, generator=generator, dtype=torch.float64)
    key_valid = (torch.rand(2, 1, 9, generator=generator) > 0.3) if masked else None
    expected = _spelled_out(shortcut, out, v, key_valid).detach()
    with torch.no_grad():
        kept = out.clone()
        torch.testing.assert_close(shortcut(out, v, key_valid), expected)
        assert torch.equal(out, kept)  # not reused: the input is left alone
        result = shortcut(kept, v, key_valid, reuse_output=True)
        torch.testing.assert_close(result, expected)


def test_shortcut_with_gradients_runs_every_pass():
    """A weight of 0 still gets its gradient (calibration may move it)."""
    shortcut = _shortcut([1.0, 0.0, 0.0, 0.0])
    out, v = torch.randn(1, 4, 6, 3, dtype=torch.float64), torch.randn(1, 4, 6, 3, dtype=torch.float64)
    shortcut(out, v, None).sum().backward()
    assert shortcut.weights.grad is not None and (shortcut.weights.grad[:, 1:] != 0).all()
