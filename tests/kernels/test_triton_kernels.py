"""Every generated Triton kernel against its reference (interpreted on CPU, native on CUDA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnopt.kernels import (
    agent_attention,
    agent_attention_reference,
    exact_attention,
    exact_attention_reference,
    linear_attention,
    linear_attention_reference,
)

# bf16 is left out: Triton's interpreter computes tl.dot on bfloat16 operands wrongly
DTYPES = [torch.float32, torch.float16]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _randn(device, dtype, *shape):
    return torch.randn(*shape, device=device).to(dtype)


def _assert_matches(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCE[expected.dtype])


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_exact_kernel_across_head_dims(triton_device, head_dim):
    q = _randn(triton_device, torch.float32, 1, 2, 19, head_dim)
    k, v = _randn(triton_device, torch.float32, 1, 1, 23, head_dim), _randn(triton_device, torch.float32, 1, 1, 23, head_dim)
    scale = head_dim**-0.5
    _assert_matches(exact_attention(q, k, v, scale=scale), exact_attention_reference(q, k, v, scale=scale))


MASK_SHAPES = {
    "per_key": lambda b, h, n, m: (b, 1, 1, m),
    "full": lambda b, h, n, m: (b, h, n, m),
    "query_key": lambda b, h, n, m: (n, m),
    "head_key": lambda b, h, n, m: (h, 1, m),
}


# triton_device only switches the Triton path on; sharing it across examples is intended
@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_queries=st.integers(1, 40),
    n_keys=st.integers(1, 40),
    group=st.sampled_from([1, 2]),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    mask_shape=st.sampled_from(sorted(MASK_SHAPES)),
    dtype=st.sampled_from(DTYPES),
    value_dim=st.sampled_from([16, 24]),
)
def test_exact_kernel_matches_reference_on_random_configurations(
    triton_device, n_queries, n_keys, group, causal, mask_kind, mask_shape, dtype, value_dim
):
    batch, heads = 2, 2 * group
    q = _randn(triton_device, dtype, batch, heads, n_queries, 16)
    k = _randn(triton_device, dtype, batch, 2, n_keys, 16)
    v = _randn(triton_device, dtype, batch, 2, n_keys, value_dim)
    shape = MASK_SHAPES[mask_shape](batch, heads, n_queries, n_keys)
    mask = {
        "none": None,
        "bool": torch.rand(shape, device=triton_device) > 0.3,
        "additive": torch.randn(shape, device=triton_device).to(dtype),
    }[mask_kind]
    options = dict(scale=0.25, causal=causal)
    _assert_matches(exact_attention(q, k, v, mask, **options), exact_attention_reference(q, k, v, mask, **options))


@pytest.mark.parametrize("n_queries, n_keys", [(37, 21), (21, 37), (33, 33)])
def test_exact_kernel_causal_is_top_left_aligned(triton_device, n_queries, n_keys):
    q = _randn(triton_device, torch.float16, 1, 2, n_queries, 24)  # padded head dim
    k, v = _randn(triton_device, torch.float16, 1, 2, n_keys, 24), _randn(triton_device, torch.float16, 1, 2, n_keys, 40)
    options = dict(scale=0.2, causal=True)
    _assert_matches(exact_attention(q, k, v, **options), exact_attention_reference(q, k, v, **options))


def test_exact_kernel_rows_with_every_key_masked_are_nan_like_softmax(triton_device):
    q, k, v = (_randn(triton_device, torch.float32, 1, 2, 18, 16) for _ in range(3))
    allowed = torch.rand(1, 2, 18, 18, device=triton_device) > 0.5
    allowed[0, 1, 3] = False
    bias = torch.zeros(18, 18, device=triton_device)
    bias[5] = float("-inf")
    for mask in (allowed, bias):
        out = exact_attention(q, k, v, mask, scale=0.3)
        assert out.isnan().any()
        _assert_matches(out, exact_attention_reference(q, k, v, mask, scale=0.3))


def _blocking_masks(device, dtype, mask_kind, fill_shape):
    """A fill mask filling query row 1, and a mask blocking row 2 (bool: False; float: finfo.min
    of the mask's dtype, -inf on row 3) — in q's dtype, or fp32 for half q ("wider")."""
    n_queries, n_keys = 18, 21
    fill = torch.rand(fill_shape, device=device) > 0.7
    fill[..., 1, :] = True
    blocked = torch.rand(2, 4, n_queries, n_keys, device=device) > 0.7
    blocked[..., 2, :] = True
    if mask_kind == "bool":
        return fill, ~blocked
    mask_dtype = torch.float32 if mask_kind == "wider" else dtype
    mask = torch.randn(2, 4, n_queries, n_keys, device=device).to(mask_dtype).masked_fill(blocked, torch.finfo(mask_dtype).min)
    mask[..., 3, :] = float("-inf")
    return fill, mask


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill_value", [None, -1e4, -3.4e38, float("-inf")])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "wider"])
@pytest.mark.parametrize("zero_empty_rows", [False, True])
def test_exact_kernel_fills_rounds_and_empties_rows_like_the_reference(triton_device, dtype, fill_value, mask_kind, zero_empty_rows):
    """Fills (finite up to the fp32 range, and -inf), float masks added in their promoted dtype
    (rounded in fp16 when mask and scores are fp16), and fully blocked rows (NaN, uniform or 0)."""
    q, k, v = _randn(triton_device, dtype, 2, 4, 18, 16), _randn(triton_device, dtype, 2, 2, 21, 16), _randn(triton_device, dtype, 2, 2, 21, 16)
    fill_shape = (2, 1, 18, 21) if fill_value is None or fill_value > -1e5 else (1, 4, 18, 1)
    fill, mask = _blocking_masks(triton_device, dtype, mask_kind, fill_shape)
    options = dict(scale=0.3, zero_empty_rows=zero_empty_rows)
    if fill_value is not None:
        options.update(fill_mask=fill, fill_value=fill_value)
    _assert_matches(exact_attention(q, k, v, mask, **options), exact_attention_reference(q, k, v, mask, **options))


def test_exact_kernel_rounds_in_bfloat16_when_the_original_added_the_mask_there(triton_device):
    """score_dtype bf16 with a bf16 mask: scores and sum rounded to bf16 in the kernel (fp32 dots)."""
    q, k, v = (_randn(triton_device, torch.float32, 1, 2, 17, 16) for _ in range(3))
    mask = (-1e4 * (torch.rand(1, 1, 17, 17, device=triton_device) > 0.5)).to(torch.bfloat16)
    options = dict(scale=0.3, score_dtype=torch.bfloat16)
    out = exact_attention(q, k, v, mask, **options)
    _assert_matches(out, exact_attention_reference(q, k, v, mask, **options))
    assert not torch.allclose(out, exact_attention_reference(q, k, v, mask, scale=0.3), atol=1e-3)


def test_exact_float_masks_summed_in_fp64_run_the_reference(triton_device, monkeypatch):
    """The kernel's softmax is fp32: a mask the original added in fp64 (-1e300) takes the reference."""
    import attnopt.kernels.exact_triton as exact_triton

    launched = []
    kernel = exact_triton.exact_attention_triton
    monkeypatch.setattr(exact_triton, "exact_attention_triton", lambda *a, **kw: launched.append(1) or kernel(*a, **kw))
    q, k, v = (_randn(triton_device, torch.float32, 1, 2, 17, 16) for _ in range(3))
    mask = torch.zeros(17, 17, dtype=torch.float64, device=triton_device)
    mask[4] = -1e300
    out = exact_attention(q, k, v, mask, scale=0.3)
    assert not launched and out[0, :, 4].isfinite().all()
    _assert_matches(out, exact_attention_reference(q, k, v, mask, scale=0.3))
    exact_attention(q, k, v, mask.float(), scale=0.3)
    assert launched


def test_exact_kernel_reads_strided_inputs(triton_device):
    # (B, N, H, d) projections viewed as (B, H, N, d), as models produce them
    q = _randn(triton_device, torch.float32, 2, 17, 2, 32).transpose(1, 2)
    k = _randn(triton_device, torch.float32, 2, 20, 2, 32).transpose(1, 2)
    v = _randn(triton_device, torch.float32, 2, 32, 2, 20).permute(0, 2, 3, 1)
    mask = (torch.rand(2, 1, 20, 17, device=triton_device) > 0.2).transpose(-1, -2)
    _assert_matches(exact_attention(q, k, v, mask, scale=0.2), exact_attention_reference(q, k, v, mask, scale=0.2))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agents_batch", [1, 2])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("n_agents", [3, 20])
def test_agent_kernels_match_reference(triton_device, dtype, agents_batch, mask_kind, n_agents):
    q = _randn(triton_device, dtype, 2, 4, 19, 32)
    k, v = _randn(triton_device, dtype, 2, 2, 40, 32), _randn(triton_device, dtype, 2, 2, 40, 16)
    agents = _randn(triton_device, dtype, agents_batch, 4, n_agents, 32)
    mask = {
        "none": None,
        "bool": torch.rand(2, 1, 1, 40, device=triton_device) > 0.4,
        "additive": torch.randn(4, 1, 40, device=triton_device).to(dtype),
    }[mask_kind]
    options = dict(scale=0.18, agent_scale=0.3)
    _assert_matches(agent_attention(q, k, v, agents, mask, **options), agent_attention_reference(q, k, v, agents, mask, **options))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [(2, 4, 20), (4, 20), (20,), (1, 4, 1)])
def test_agent_kernels_add_the_agent_bias_in_stage_two(triton_device, dtype, bias_shape):
    q = _randn(triton_device, dtype, 2, 4, 19, 32)
    k, v = _randn(triton_device, dtype, 2, 2, 40, 32), _randn(triton_device, dtype, 2, 2, 40, 16)
    agents = _randn(triton_device, dtype, 1, 4, 20, 32)
    mask = torch.rand(2, 1, 1, 40, device=triton_device) > 0.4
    agent_bias = 2 * torch.randn(bias_shape, device=triton_device)  # fp32 whatever the inputs
    options = dict(scale=0.18, agent_scale=0.3)
    _assert_matches(
        agent_attention(q, k, v, agents, mask, agent_bias=agent_bias, **options),
        agent_attention_reference(q, k, v, agents, mask, agent_bias, **options),
    )


def test_agent_kernels_give_nan_where_every_key_is_masked(triton_device):
    q, k, v = (_randn(triton_device, torch.float32, 2, 2, 20, 16) for _ in range(3))
    agents = _randn(triton_device, torch.float32, 1, 2, 4, 16)
    mask = torch.rand(2, 1, 1, 20, device=triton_device) > 0.5
    mask[1] = False
    out = agent_attention(q, k, v, agents, mask, scale=0.3, agent_scale=0.3)
    assert out[1].isnan().all() and not out[0].isnan().any()
    _assert_matches(out, agent_attention_reference(q, k, v, agents, mask, scale=0.3, agent_scale=0.3))


def _linear_inputs(device, dtype, n_queries, n_keys, head_dim=24, value_dim=16, feature_map="elu1"):
    q = _randn(device, dtype, 2, 4, n_queries, head_dim)
    k = _randn(device, dtype, 2, 2, n_keys, head_dim)
    v = _randn(device, dtype, 2, 2, n_keys, value_dim)
    if feature_map == "identity":  # features a learned map would give: positive
        q, k = q.abs(), k.abs()
    return q, k, v


def _assert_linear_matches(actual, expected):
    # InLine outputs are unnormalised sums; compare relative to the output's scale
    scale = expected.float().abs().amax().clamp_min(1).item()
    tolerance = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tolerance["atol"] * scale, rtol=tolerance["rtol"])


@pytest.mark.slow
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "focused", "identity"])
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_kernels_match_reference_with_key_mask(triton_device, feature_map, normalization, causal):
    n_keys = 37 if causal else 29
    q, k, v = _linear_inputs(triton_device, torch.float32, 37, n_keys, feature_map=feature_map)
    key_mask = torch.rand(2, n_keys, device=triton_device) > 0.3
    key_mask[1, :20] = False  # causal rows of batch 1 before key 20 see no valid key
    options = dict(feature_map=feature_map, normalization=normalization, causal=causal, key_mask=key_mask, power=2.5)
    _assert_linear_matches(linear_attention(q, k, v, **options), linear_attention_reference(q, k, v, **options))


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_kernels_across_head_dims(triton_device, head_dim, causal):
    q, k, v = _linear_inputs(triton_device, torch.float32, 21, 21, head_dim=head_dim, value_dim=head_dim)
    options = dict(feature_map="focused", causal=causal)
    _assert_linear_matches(linear_attention(q, k, v, **options), linear_attention_reference(q, k, v, **options))


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["sum", "inline"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_kernels_in_half_precision(triton_device, normalization, causal):
    q, k, v = _linear_inputs(triton_device, torch.float16, 40, 40 if causal else 51)
    options = dict(normalization=normalization, causal=causal)
    _assert_linear_matches(linear_attention(q, k, v, **options), linear_attention_reference(q, k, v, **options))


@pytest.mark.slow
@pytest.mark.parametrize(
    "feature_map, normalization, causal, dtype",
    [("elu1", "sum", False, torch.float32), ("focused", "inline", True, torch.float32),
     ("relu", "inline", False, torch.float32), ("identity", "sum", True, torch.float32),
     ("elu1", "inline", True, torch.float16)],
)
def test_linear_kernels_scale_the_loaded_tiles_by_feature_scale(triton_device, feature_map, normalization, causal, dtype):
    """feature_scale s in the kernels: φ(s·q), φ(s·k), like the reference on inputs scaled in fp32."""
    n_keys = 21 if causal else 19
    q, k, v = _linear_inputs(triton_device, dtype, 21, n_keys, feature_map=feature_map)
    key_mask = torch.rand(2, n_keys, device=triton_device) > 0.3
    options = dict(feature_map=feature_map, normalization=normalization, causal=causal, key_mask=key_mask, power=2.5)
    expected = linear_attention_reference(q.float() * 0.4, k.float() * 0.4, v.float(), **options).to(dtype)
    _assert_linear_matches(linear_attention(q, k, v, feature_scale=0.4, **options), expected)


@pytest.mark.parametrize("penalty", [False, True])
def test_gradients_through_the_triton_path_match_the_reference(triton_device, penalty):
    """First-order gradients, and with penalty those of a gradient penalty (create_graph=True)."""

    def leaves(*shapes):
        return [torch.randn(*shape, device=triton_device, requires_grad=True) for shape in shapes]

    q, k, v, agents = leaves((1, 2, 17, 16), (1, 1, 17, 16), (1, 1, 17, 16), (1, 2, 5, 16))
    calls = [
        (exact_attention, exact_attention_reference, (q, k, v), dict(scale=0.3, causal=True)),
        (agent_attention, agent_attention_reference, (q, k, v, agents), dict(scale=0.3, agent_scale=0.4)),
        (linear_attention, linear_attention_reference, (q, k, v), dict(causal=True, normalization="inline")),
    ]
    for op, reference, inputs, options in calls:
        weights = torch.randn(1, 2, 17, 16, device=triton_device)

        def gradients(attention):
            with sdpa_kernel(SDPBackend.MATH):  # the plain agent reference: fused CPU SDPA has no second derivative
                out = attention(*inputs, **options)
            grads = torch.autograd.grad((out * weights).sum(), inputs, create_graph=penalty)
            return torch.autograd.grad(sum(grad.pow(2).sum() for grad in grads), inputs) if penalty else grads

        for grad, want in zip(gradients(op), gradients(reference)):
            torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)


_ROUTING_CHECK = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from attnopt.kernels import agent_attention, config, exact_attention, linear_attention
import attnopt.kernels.agent_triton as agent_triton
import attnopt.kernels.exact_triton as exact_triton
import attnopt.kernels.linear_triton as linear_triton
config.force_triton = not torch.cuda.is_available()
device = "cuda" if torch.cuda.is_available() else "cpu"
launched = []
for module, name in ((exact_triton, "exact_attention_triton"), (agent_triton, "agent_attention_triton"), (linear_triton, "linear_attention_triton")):
    original = getattr(module, name)
    setattr(module, name, lambda *a, _f=original, _n=name, **kw: launched.append(_n) or _f(*a, **kw))
q = torch.randn(1, 1, 16, 16, device=device)
exact_attention(q, q, q, scale=1.0)
agent_attention(q, q, q, q[:, :, :2], scale=1.0, agent_scale=1.0)
linear_attention(q, q, q)
assert launched == ["exact_attention_triton", "agent_attention_triton", "linear_attention_triton"], launched
"""


@pytest.mark.slow
def test_the_triton_fixture_really_routes_ops_to_the_generated_kernels():
    """Forced Triton really launches the generated kernels, in a fresh interpreter that no other
    test has touched (in this process, the triton_device fixture checks each test's launches)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _ROUTING_CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
