"""The plain-PyTorch references against independent formulas (SDPA, matrix and state forms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt.kernels.linear_reference as linear_reference
from attnopt.kernels import (
    agent_attention,
    agent_attention_reference,
    exact_attention,
    exact_attention_reference,
    linear_attention,
    linear_attention_quadratic,
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


def _agent_matrix_form(q, k, v, agents, mask, agent_bias, scale, agent_scale):
    """The (B, H, N, M) weights of agent attention, written out densely, and their product with v."""
    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    agent_scores = agents @ k_full.transpose(-1, -2) * scale
    if mask is not None:
        agent_scores = agent_scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else agent_scores + mask
    query_scores = q @ agents.transpose(-1, -2) * agent_scale
    if agent_bias is not None:
        query_scores = query_scores + agent_bias.unsqueeze(-2)
    attention = torch.softmax(query_scores, -1) @ torch.softmax(agent_scores, -1)
    return attention, attention @ v_full


@pytest.mark.parametrize("agents_batch", [1, 2])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_agent_reference_matches_its_n_by_m_matrix_form(agents_batch, mask_kind):
    q, k, v = _qkv(2, 4, 2, 9, 11, 8, 6)
    agents = torch.randn(agents_batch, 4, 3, 8, dtype=torch.float64)
    mask = {"none": None, "bool": torch.rand(2, 1, 1, 11) > 0.3, "additive": torch.randn(4, 1, 11, dtype=torch.float64)}[mask_kind]
    attention, expected = _agent_matrix_form(q, k, v, agents, mask, None, 0.3, 0.7)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))  # rows sum to 1
    actual = agent_attention_reference(q, k, v, agents, mask, scale=0.3, agent_scale=0.7)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("bias_shape", [(2, 4, 3), (1, 4, 3), (4, 3), (3,), (1, 4, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_agent_bias_enters_stage_two_logits(bias_shape, mask_kind, kv_heads):
    """agent_bias (broadcastable to (B, H, n)) is added to the query-to-agent logits, reference and op alike."""
    q, k, v = _qkv(2, 4, kv_heads, 9, 11, 8, 6)
    agents = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    agent_bias = 3 * torch.randn(bias_shape, dtype=torch.float64)
    mask = {"none": None, "bool": torch.rand(2, 1, 1, 11) > 0.3, "additive": torch.randn(1, 4, 1, 11, dtype=torch.float64)}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True
    _, expected = _agent_matrix_form(q, k, v, agents, mask, agent_bias, 0.3, 0.7)
    options = dict(scale=0.3, agent_scale=0.7)
    torch.testing.assert_close(agent_attention_reference(q, k, v, agents, mask, agent_bias, **options), expected)
    torch.testing.assert_close(agent_attention(q, k, v, agents, mask, agent_bias=agent_bias, **options), expected)
    without = agent_attention(q, k, v, agents, mask, **options)
    # a bias that is the same for every agent of a head shifts a softmax row by a constant: no change
    assert torch.allclose(without, expected) == (bias_shape[-1] == 1)


def test_agent_bias_equals_the_extra_channel_it_replaces():
    """A bias b per agent is what a 1 appended to q, a 0 to k and b/agent_scale to the agents gave."""
    q, k, v = _qkv(2, 2, 2, 7, 9, 4, 5)
    agents, agent_bias = torch.randn(2, 2, 3, 4, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    with_channel = agent_attention(
        torch.cat([q, torch.ones_like(q[..., :1])], -1),
        torch.cat([k, torch.zeros_like(k[..., :1])], -1),
        v,
        torch.cat([agents, (agent_bias / 0.7).unsqueeze(-1)], -1),
        scale=0.3,
        agent_scale=0.7,
    )
    torch.testing.assert_close(agent_attention(q, k, v, agents, agent_bias=agent_bias, scale=0.3, agent_scale=0.7), with_channel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_agent_reference_computes_half_inputs_in_fp32(dtype):
    q, k, v = _qkv(1, 2, 1, 6, 7, 16, 8, dtype=dtype)
    agents, agent_bias = torch.randn(1, 2, 3, 16).to(dtype), torch.randn(2, 3)
    out = agent_attention_reference(q, k, v, agents, None, agent_bias, scale=0.25, agent_scale=0.5)
    assert out.dtype == dtype
    expected = agent_attention_reference(q.float(), k.float(), v.float(), agents.float(), None, agent_bias,
                                         scale=0.25, agent_scale=0.5)
    torch.testing.assert_close(out, expected.to(dtype), atol=0, rtol=0)


def test_agent_reference_gives_nan_where_an_agent_sees_no_key_like_softmax():
    q, k, v = _qkv(2, 2, 2, 5, 7, 8, 8)
    agents = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    hidden = torch.rand(2, 1, 1, 7) > 0.5
    hidden[1] = False
    additive = torch.zeros(2, 2, 1, 7, dtype=torch.float64)
    additive[0, 1] = float("-inf")
    for mask, dead in ((hidden, (1, slice(None))), (additive, (0, 1))):
        out = agent_attention_reference(q, k, v, agents, mask, scale=0.3, agent_scale=0.3)
        _, expected = _agent_matrix_form(q, k, v, agents, mask, None, 0.3, 0.3)
        torch.testing.assert_close(out, expected, equal_nan=True)
        assert out[dead].isnan().all() and out.isnan().sum() == out[dead].numel()


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
def test_linear_quadratic_form_matches_the_running_sums(feature_map, normalization, causal):
    n_keys = 10 if causal else 13
    q, k, v = _qkv(2, 4, 2, 10, n_keys, 8, 6)
    key_mask = torch.rand(2, n_keys) > 0.3
    key_mask[1, : n_keys // 2] = False  # early causal rows of batch 1 see no key at all
    options = dict(feature_map=feature_map, normalization=normalization, causal=causal, key_mask=key_mask, eps=1e-6)
    actual = linear_attention_quadratic(q, k, v, **options)
    torch.testing.assert_close(actual, _linear_state_form(q, k, v, **options))


def _linear_inputs(n_tokens, causal, feature_map, kv_heads=2, dtype=torch.float64, masked=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_keys = n_tokens if causal else n_tokens + 3
    q = torch.randn(2, 4, n_tokens, 8, generator=generator, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n_keys, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n_keys, 6, generator=generator, dtype=torch.float64)
    if feature_map == "identity":  # features a learned map would give: non-negative
        q, k = q.abs(), k.abs()
    key_mask = None
    if masked:
        key_mask = torch.rand(2, n_keys, generator=generator) > 0.3
        key_mask[1, : n_keys // 2] = False  # early causal rows of batch 1 see no valid key
    return q.to(dtype), k.to(dtype), v.to(dtype), key_mask


# chunk boundaries of the causal form (CHUNK = 64): one short chunk, exactly one, one plus a tail, several
@pytest.mark.parametrize("n_tokens", [1, 7, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_state_form_equals_its_quadratic_form(n_tokens, feature_map, normalization, causal):
    """The CPU path (state form, chunked when causal) against the N×M oracle, masked and GQA."""
    assert linear_reference.CHUNK == 64
    q, k, v, key_mask = _linear_inputs(n_tokens, causal, feature_map)
    options = dict(feature_map=feature_map, normalization=normalization, causal=causal, key_mask=key_mask, power=2.5)
    expected = linear_attention_quadratic(q, k, v, **options)
    torch.testing.assert_close(linear_attention_reference(q, k, v, **options), expected)
    torch.testing.assert_close(linear_attention(q, k, v, **options), expected)  # the op's CPU path


@pytest.mark.parametrize("n_tokens", [7, 130])
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_scale", [0.35, 1.7, -0.6])
def test_linear_feature_scale_maps_scaled_queries_and_keys(n_tokens, feature_map, normalization, causal, feature_scale):
    """feature_scale s: φ(s·q), φ(s·k), the same as the oracle on inputs scaled beforehand (state
    form with and without gradients, the op, and the oracle's own feature_scale)."""
    q, k, v, key_mask = _linear_inputs(n_tokens, causal, feature_map)
    options = dict(feature_map=feature_map, normalization=normalization, causal=causal, key_mask=key_mask, power=2.5)
    expected = linear_attention_quadratic(q * feature_scale, k * feature_scale, v, **options)
    scaled = dict(options, feature_scale=feature_scale)
    torch.testing.assert_close(linear_attention_quadratic(q, k, v, **scaled), expected)
    torch.testing.assert_close(linear_attention_reference(q, k, v, **scaled), expected)
    torch.testing.assert_close(linear_attention(q, k, v, **scaled), expected)  # the op's CPU path
    with_grad = linear_attention_reference(q.clone().requires_grad_(), k, v, **scaled)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, expected)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
def test_feature_map_scale_equals_scaling_its_input(feature_map):
    """The folded scale (aten.elu's scales, the focused ratio) is φ(s·x), values and gradients."""
    x = torch.randn(5, 7, 8, dtype=torch.float64)
    x[0, 0] = -x[0, 0].abs()  # a row that relu zeroes entirely
    for scale in (0.3, 2.0, 1.0, -0.5, 0.0):
        leaf, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        folded, spelled = apply_feature_map(leaf, feature_map, 2.5, scale), apply_feature_map(plain * scale, feature_map, 2.5)
        torch.testing.assert_close(folded, spelled)
        weights = torch.randn_like(folded)
        (folded * weights).sum().backward()
        (spelled * weights).sum().backward()
        torch.testing.assert_close(leaf.grad, plain.grad)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_feature_scale_gradients_pass_gradcheck(feature_map, causal):
    q, k, v, key_mask = _linear_inputs(67, causal, feature_map, kv_heads=1)
    q, k, v = (x[:1, :2, :, :3].clone().requires_grad_() for x in (q, k, v))
    options = dict(feature_map=feature_map, causal=causal, key_mask=key_mask[:1], feature_scale=0.6,
                   normalization="inline" if causal else "sum")
    assert torch.autograd.gradcheck(lambda *x: linear_attention(*x, **options), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("slab_elements", [1, 8 * 6, 10**9])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("masked", [False, True])
def test_linear_inference_slabs_and_the_autograd_path_agree(monkeypatch, slab_elements, normalization, masked):
    """Without gradients the non-causal form runs in slabs of heads (one head, a few, or all rows
    at once); with gradients on whole tensors. Both equal the quadratic form."""
    monkeypatch.setattr(linear_reference, "SLAB_ELEMENTS", slab_elements)
    q, k, v, key_mask = _linear_inputs(37, False, "elu1", kv_heads=2, masked=masked)
    options = dict(normalization=normalization, key_mask=key_mask)
    expected = linear_attention_quadratic(q, k, v, **options)
    torch.testing.assert_close(linear_attention_reference(q, k, v, **options), expected)
    with_grad = linear_attention_reference(q.requires_grad_(), k, v, **options)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_state_form_accumulates_half_inputs_in_fp32(dtype, normalization, causal):
    q, k, v, key_mask = _linear_inputs(70, causal, "focused", dtype=dtype)
    options = dict(feature_map="focused", normalization=normalization, causal=causal, key_mask=key_mask)
    out = linear_attention_reference(q, k, v, **options)
    assert out.dtype == dtype
    expected = linear_attention_quadratic(q.float(), k.float(), v.float(), **options)
    scale = expected.abs().amax().clamp_min(1)
    torch.testing.assert_close(out.float(), expected, atol=1e-2 * scale, rtol=1e-2)  # one half rounding of the output
    torch.testing.assert_close(out, linear_attention_quadratic(q, k, v, **options), atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature_map", ["elu1", "focused"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_feature_scale_on_half_inputs_scales_in_fp32(dtype, feature_map, causal):
    q, k, v, key_mask = _linear_inputs(70, causal, feature_map, dtype=dtype)
    options = dict(feature_map=feature_map, causal=causal, key_mask=key_mask)
    out = linear_attention(q, k, v, feature_scale=0.35, **options)
    assert out.dtype == dtype
    expected = linear_attention_quadratic(q.float() * 0.35, k.float() * 0.35, v.float(), **options)
    scale = expected.abs().amax().clamp_min(1)
    torch.testing.assert_close(out.float(), expected, atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_state_form_never_reads_masked_keys(causal):
    """A masked key's features are zeroed, not multiplied by 0: even inf or NaN keys stay out."""
    q, k, v, key_mask = _linear_inputs(70, causal, "elu1")
    expected = linear_attention_reference(q, k, v, key_mask=key_mask, causal=causal, normalization="inline")
    poisoned = k.clone()
    poisoned[:, 0][~key_mask] = float("nan")
    poisoned[:, 1][~key_mask] = float("inf")
    actual = linear_attention_reference(q, poisoned, v, key_mask=key_mask, causal=causal, normalization="inline")
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
def test_linear_state_form_gradients_pass_gradcheck_across_a_chunk_boundary(causal, normalization):
    q, k, v, key_mask = _linear_inputs(67, causal, "elu1", kv_heads=1)
    q, k, v = (x[:1, :2, :, :3].clone().requires_grad_() for x in (q, k, v))
    options = dict(causal=causal, normalization=normalization, key_mask=key_mask[:1])
    assert torch.autograd.gradcheck(lambda *x: linear_attention(*x, **options), (q, k, v), fast_mode=True)


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
