"""The plain-PyTorch references against independent formulas (SDPA, matrix and state forms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels import (
    agent_attention_reference,
    exact_attention,
    exact_attention_reference,
    linear_attention_reference,
)
from attnopt.kernels.linear_reference import apply_feature_map


def _qkv(batch, heads, kv_heads, n_queries, n_keys, head_dim, value_dim, dtype=torch.float64):
    return (
        torch.randn(batch, heads, n_queries, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, n_keys, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, n_keys, value_dim, dtype=dtype),
    )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    n_queries=st.integers(1, 9),
    n_keys=st.integers(1, 9),
    head_dim=st.sampled_from([4, 8]),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    mask_shape=st.sampled_from(["full", "per_key", "per_query_key"]),
)
def test_exact_reference_matches_sdpa(batch, kv_heads, group, n_queries, n_keys, head_dim, causal, mask_kind, mask_shape):
    heads = kv_heads * group
    q, k, v = _qkv(batch, heads, kv_heads, n_queries, n_keys, head_dim, 5)
    shape = {"full": (batch, heads, n_queries, n_keys), "per_key": (batch, 1, 1, n_keys), "per_query_key": (n_queries, n_keys)}[mask_shape]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True  # every row keeps a key: SDPA and softmax agree on non-empty rows
    elif mask_kind == "additive":
        mask = torch.randn(shape, dtype=torch.float64)
    sdpa_mask = mask
    if causal and mask is not None:  # SDPA takes either a mask or is_causal: fold causality in
        tril = torch.ones(n_queries, n_keys, dtype=torch.bool).tril()
        sdpa_mask = mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, float("-inf"))
        if mask.dtype == torch.bool:
            sdpa_mask = sdpa_mask | (torch.arange(n_keys) == 0)
            mask = mask | (torch.arange(n_keys) == 0)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, is_causal=causal and mask is None, scale=0.37, enable_gqa=True
    )
    actual = exact_attention_reference(q, k, v, mask, scale=0.37, causal=causal)
    torch.testing.assert_close(actual, expected)


def test_exact_reference_rows_with_every_key_masked_are_nan_like_softmax():
    q, k, v = _qkv(1, 2, 2, 4, 6, 8, 8)
    mask = torch.rand(1, 2, 4, 6) > 0.5
    mask[0, 1, 2] = False
    additive = torch.zeros(4, 6).masked_fill(torch.arange(6) >= 0, float("-inf"))
    additive[0] = 0.0
    for m in (mask, additive):
        scores = (q @ k.transpose(-1, -2)) * 0.5
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        expected = torch.softmax(scores, -1) @ v
        actual = exact_attention_reference(q, k, v, m, scale=0.5)
        torch.testing.assert_close(actual, expected, equal_nan=True)
        assert actual.isnan().any()


def test_exact_dropout_consumes_the_rng_like_hand_written_dropout():
    q, k, v = _qkv(2, 2, 2, 5, 7, 8, 8, dtype=torch.float32)
    torch.manual_seed(123)
    actual = exact_attention(q, k, v, scale=0.4, dropout_p=0.3)
    torch.manual_seed(123)
    expected = F.dropout(torch.softmax((q @ k.transpose(-1, -2)) * 0.4, -1), 0.3, training=True) @ v
    torch.testing.assert_close(actual, expected)


def test_half_inputs_are_computed_in_fp32_and_returned_in_their_dtype():
    q, k, v = _qkv(1, 2, 1, 6, 7, 16, 8, dtype=torch.float16)
    out = exact_attention_reference(q, k, v, scale=0.25)
    assert out.dtype == torch.float16
    expected = exact_attention_reference(q.float(), k.float(), v.float(), scale=0.25).half()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("agents_batch", [1, 2])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_agent_reference_matches_its_n_by_m_matrix_form(agents_batch, mask_kind):
    q, k, v = _qkv(2, 4, 2, 9, 11, 8, 6)
    agents = torch.randn(agents_batch, 4, 3, 8, dtype=torch.float64)
    mask = {"none": None, "bool": torch.rand(2, 1, 1, 11) > 0.3, "additive": torch.randn(4, 1, 11, dtype=torch.float64)}[mask_kind]
    k_full, v_full = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    agent_scores = agents @ k_full.transpose(-1, -2) * 0.3
    if mask is not None:
        agent_scores = agent_scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else agent_scores + mask
    query_to_agent = torch.softmax(q @ agents.transpose(-1, -2) * 0.7, -1)
    attention = query_to_agent @ torch.softmax(agent_scores, -1)  # (B, H, N, M), rows sum to 1
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))
    actual = agent_attention_reference(q, k, v, agents, mask, scale=0.3, agent_scale=0.7)
    torch.testing.assert_close(actual, attention @ v_full)


def _linear_state_form(q, k, v, feature_map, normalization, causal, key_mask, eps, power=3.0):
    """Linear attention through running sums S, z (the way the kernels compute it)."""
    group = q.shape[1] // k.shape[1]
    fq = apply_feature_map(q, feature_map, power).double()
    fk = apply_feature_map(k, feature_map, power).double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool) if key_mask is None else key_mask
    valid = valid[:, None, :, None].double()
    fk, v_valid = fk * valid, v * valid
    outer = fk.unsqueeze(-1) * v_valid.unsqueeze(-2)  # (B, H, M, d, e)
    if causal:
        state, key_sum, value_sum, count = outer.cumsum(2), fk.cumsum(2), v_valid.cumsum(2), valid.cumsum(2)
    else:
        state, key_sum = outer.sum(2, keepdim=True), fk.sum(2, keepdim=True)
        value_sum, count = v_valid.sum(2, keepdim=True), valid.sum(2, keepdim=True)
    numer = torch.einsum("bhnd,bhnde->bhne", fq, state.expand(-1, -1, q.shape[2], -1, -1))
    denom = (fq * key_sum).sum(-1, keepdim=True)
    if normalization == "sum":
        return numer / (denom + eps)
    return numer + (1 - denom) * value_sum / count.clamp_min(1)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_reference_matches_the_state_form(feature_map, normalization, causal):
    n_keys = 10 if causal else 13
    q, k, v = _qkv(2, 4, 2, 10, n_keys, 8, 6)
    key_mask = torch.rand(2, n_keys) > 0.3
    key_mask[1, : n_keys // 2] = False  # early causal rows of batch 1 see no key at all
    options = dict(feature_map=feature_map, normalization=normalization, causal=causal, key_mask=key_mask, eps=1e-6)
    actual = linear_attention_reference(q, k, v, **options)
    torch.testing.assert_close(actual, _linear_state_form(q, k, v, **options))


def test_inline_weights_rows_sum_to_one():
    q, k, v = _qkv(1, 2, 2, 5, 8, 4, 3)
    identity_values = torch.eye(8, dtype=torch.float64).expand(1, 2, 8, 8)
    weights = linear_attention_reference(q, k, identity_values, normalization="inline")
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5, dtype=torch.float64))


def test_focused_feature_map_is_zero_and_differentiable_where_relu_is_zero():
    x = torch.tensor([[-1.0, -2.0, -0.5], [1.0, -1.0, 2.0]], requires_grad=True)
    features = apply_feature_map(x, "focused", 3.0)
    assert torch.equal(features[0], torch.zeros(3))
    y = torch.tensor([1.0, 0.0, 2.0])
    torch.testing.assert_close(features[1], y**3 * y.norm() / (y**3).norm())
    features.sum().backward()
    assert torch.isfinite(x.grad).all()
