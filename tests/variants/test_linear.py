"""Linear attention: equal to its quadratic form (causal or not, every feature map), masks, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from attnopt.variants import LinearConfig, build_site_module, refusal

from .dense import apply, elu1, focused, linear_weights
from .support import make_site, padding_mask, tensors

SCALE = 0.25
FEATURES = {"elu1": elu1, "relu": torch.relu, "focused": focused(3.0), "learned": elu1}


@pytest.mark.parametrize("feature_map", sorted(FEATURES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
def test_output_equals_quadratic_form(feature_map, causal, normalization):
    """φ sees √scale·q and √scale·k; a learned map starts out as elu+1."""
    site = make_site(causal=causal)
    q, k, v = tensors(site)
    module = build_site_module(LinearConfig(feature_map=feature_map, normalization=normalization), site)
    root = math.sqrt(SCALE)
    weights = linear_weights(q * root, k * root, feature=FEATURES[feature_map], causal=causal, key_valid=None,
                             normalization=normalization)
    out = module(q, k, v, scale=SCALE, causal=causal)
    torch.testing.assert_close(out.double(), apply(weights, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_masked_keys_get_no_weight_and_padding_changes_nothing(causal):
    site = make_site(causal=causal, mask_kind="key_padding")
    q, k, v = tensors(site)
    mask = padding_mask(2, site.M, [48, 30])
    module = build_site_module(LinearConfig(), site)
    out = module(q, k, v, mask=mask, scale=SCALE, causal=causal)
    root = math.sqrt(SCALE)
    weights = linear_weights(q * root, k * root, feature=elu1, causal=causal, key_valid=mask[:, 0, 0],
                             normalization="sum")
    torch.testing.assert_close(out.double(), apply(weights, v), rtol=1e-4, atol=1e-4)
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[1, :, 30:], noisy_v[1, :, 30:] = 1e3, 1e3
    torch.testing.assert_close(module(q, noisy_k, noisy_v, mask=mask, scale=SCALE, causal=causal)[1, :, :30],
                               out[1, :, :30])


@pytest.mark.parametrize("mask", [torch.zeros(()), torch.zeros(2, 1, 1, 1), torch.ones(1, 1, 1, 1, dtype=torch.bool)],
                         ids=["scalar bias", "per-batch bias", "bool"])
def test_a_mask_broadcast_over_the_keys_applies_to_every_key(mask):
    """`scores + 0.0` reaches the variant as a mask of one key column; it masks nothing."""
    site = make_site(N=48, M=40)
    q, k, v = tensors(site)
    module = build_site_module(LinearConfig(), site)
    torch.testing.assert_close(module(q, k, v, mask=mask, scale=SCALE), module(q, k, v, scale=SCALE))


def test_causal_mask_spelled_as_a_tril_with_padding_equals_the_causal_flag():
    site = make_site(causal=True, mask_kind="causal")
    q, k, v = tensors(site)
    padding = padding_mask(2, site.M, [48, 30])
    module = build_site_module(LinearConfig(), site)
    expected = module(q, k, v, mask=padding, scale=SCALE, causal=True)
    tril = torch.ones(site.N, site.M, dtype=torch.bool).tril() & padding
    torch.testing.assert_close(module(q, k, v, mask=tril, scale=SCALE, causal=True), expected)
    sliding = tril & ~torch.ones(site.N, site.M, dtype=torch.bool).tril(-8)
    with pytest.raises(ValueError, match="more than causality"):
        module(q, k, v, mask=sliding, scale=SCALE, causal=True)


def test_additive_mask_that_biases_keys_is_rejected():
    site = make_site(mask_kind="key_padding")
    q, k, v = tensors(site)
    module = build_site_module(LinearConfig(), site)
    bias = torch.zeros(2, 1, 1, site.M)
    bias[..., -4:] = float("-inf")
    module(q, k, v, mask=bias, scale=SCALE)
    bias[..., 0] = -2.0
    with pytest.raises(ValueError, match="only drop keys"):
        module(q, k, v, mask=bias, scale=SCALE)


@pytest.mark.parametrize("feature_map", ["elu1", "learned"])
def test_grouped_query_heads_read_their_kv_head(feature_map):
    site = make_site(H=4, Hkv=2)
    q, k, v = tensors(site)
    module = build_site_module(LinearConfig(feature_map=feature_map), site)
    full = build_site_module(LinearConfig(feature_map=feature_map), make_site(H=4, Hkv=4))
    if feature_map == "learned":
        with torch.no_grad():
            module.feature_module.weight.add_(0.1 * torch.randn_like(module.feature_module.weight))
            full.feature_module.weight.copy_(module.feature_module.weight.repeat_interleave(2, dim=0))
    repeated = full(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), scale=SCALE)
    torch.testing.assert_close(module(q, k, v, scale=SCALE), repeated)


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_stays_close_to_float32(dtype, bound, causal):
    site = make_site(causal=causal, dtype=dtype)
    q, k, v = tensors(site, dtype=dtype)
    module = build_site_module(LinearConfig(feature_map="focused"), site)
    out = module(q, k, v, scale=SCALE, causal=causal)
    assert out.dtype == dtype
    expected = module(q.float(), k.float(), v.float(), scale=SCALE, causal=causal)
    assert ((out.float() - expected).norm() / expected.norm()).item() < bound


def test_learned_feature_map_trains():
    site = make_site()
    q, k, v = tensors(site)
    module = build_site_module(LinearConfig(feature_map="learned"), site)
    module(q, k, v, scale=SCALE).pow(2).sum().backward()
    assert module.feature_module.weight.grad.abs().sum() > 0


def test_refusals_name_the_reason():
    assert "differs between queries" in refusal(LinearConfig(), make_site(mask_kind="boolean"))
    assert "dropout" in refusal(LinearConfig(), make_site(dropout=0.1))
    assert "N ≠ M" in refusal(LinearConfig(), make_site(causal=True, M=40))
    assert refusal(LinearConfig(), make_site(causal=True, mask_kind="causal")) is None
    with pytest.raises(ValueError, match="feature_map"):
        LinearConfig(feature_map="cosine")


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused"])
def test_fixed_maps_hand_the_op_unscaled_inputs_and_root_scale_as_feature_scale(monkeypatch, feature_map):
    """The √scale goes to the op as feature_scale (applied where φ is computed), not onto copies of q and k."""
    import attnopt.variants.linear as linear_module

    seen, op = {}, linear_module.linear_attention

    def spy(q, k, v, **options):
        seen.update(q=q, k=k, **options)
        return op(q, k, v, **options)

    site = make_site()
    q, k, v = tensors(site)
    module = build_site_module(LinearConfig(feature_map=feature_map), site)
    monkeypatch.setattr(linear_module, "linear_attention", spy)
    module(q, k, v, scale=SCALE)
    assert seen["q"] is q and seen["k"] is k
    assert seen["feature_scale"] == pytest.approx(math.sqrt(SCALE))
