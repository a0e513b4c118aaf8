"""The torch.library ops: registration, fake tensors, autograd, FLOP counting, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import attnopt.kernels as kernels
from attnopt.kernels import (
    agent_attention,
    agent_attention_reference,
    exact_attention,
    exact_attention_reference,
    linear_attention,
    linear_attention_reference,
)


def _inputs(dtype=torch.float64, requires_grad=False):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 7, 8, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, 7, 6, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def test_ops_are_registered_under_the_attnopt_namespace():
    for name in ("exact_attention", "agent_attention", "linear_attention"):
        assert hasattr(torch.ops.attnopt, name)


@pytest.mark.slow  # opcheck: seconds per op
@pytest.mark.parametrize(
    "op, args, kwargs",
    [
        ("exact_attention", lambda q, k, v: (q, k, v, torch.randn(2, 1, 5, 7, dtype=q.dtype)), dict(scale=0.3, causal=True)),
        ("exact_attention", lambda q, k, v: (q, k, v, torch.randn(5, 7, dtype=torch.float32), torch.rand(2, 1, 1, 7) > 0.6),
         dict(scale=0.3, fill_value=-1e4, score_dtype=torch.float16, zero_empty_rows=True)),
        ("agent_attention", lambda q, k, v: (q, k, v, torch.randn(1, 4, 3, 8, dtype=q.dtype), torch.rand(2, 1, 1, 7) > 0.2), dict(scale=0.3, agent_scale=0.5)),
        ("agent_attention", lambda q, k, v: (q, k, v, torch.randn(2, 4, 3, 8, dtype=q.dtype), None, torch.randn(4, 3, dtype=q.dtype, requires_grad=True)), dict(scale=0.3, agent_scale=0.5)),
        ("linear_attention", lambda q, k, v: (q, k, v, torch.rand(2, 7) > 0.3), dict(feature_map="focused", normalization="inline")),
        ("linear_attention", lambda q, k, v: (q, k, v, torch.rand(2, 7) > 0.3), dict(feature_map="elu1", feature_scale=0.4)),
        ("linear_attention", lambda q, k, v: (q, k, v), dict(feature_map="relu", causal=False, feature_scale=1.6)),
    ],
)
def test_opcheck_passes_schema_fake_and_autograd_checks(op, args, kwargs):
    q, k, v = _inputs(requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.attnopt, op), args(q, k, v), kwargs)


def test_gradients_pass_gradcheck_including_the_additive_mask_and_agents():
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    q, k, v, bias, agents = leaf(1, 2, 3, 4), leaf(1, 1, 4, 4), leaf(1, 1, 4, 3), leaf(1, 2, 3, 4), leaf(1, 2, 2, 4)
    check = dict(fast_mode=True)
    assert torch.autograd.gradcheck(lambda *x: exact_attention(*x, scale=0.3, causal=True), (q, k, v, bias), **check)
    assert torch.autograd.gradcheck(lambda *x: agent_attention(*x, scale=0.3, agent_scale=0.6), (q, k, v, agents), **check)
    agent_bias = leaf(1, 2, 2)
    assert torch.autograd.gradcheck(
        lambda q, k, v, agents, agent_bias: agent_attention(q, k, v, agents, scale=0.3, agent_scale=0.6, agent_bias=agent_bias),
        (q, k, v, agents, agent_bias), **check,
    )
    focused_inline = dict(feature_map="focused", normalization="inline")
    assert torch.autograd.gradcheck(lambda *x: linear_attention(*x, **focused_inline), (q, k, v), **check)
    scaled_elu = dict(normalization="inline", causal=True, feature_scale=0.45)
    assert torch.autograd.gradcheck(lambda *x: linear_attention(*x, **scaled_elu), (leaf(1, 2, 4, 4), k, v), **check)


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _exact_double_backward_case(case):
    """(extra leaves after q, k, v; call) for one exact-attention case of the gradgradcheck."""
    allowed = torch.rand(1, 2, 3, 4) > 0.4
    allowed[..., 0] = True  # every row keeps a key: softmax rows stay finite
    fill = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    fill[..., 1, :] = True  # one row filled entirely: uniform weights, no q/k gradient there
    empty = torch.ones(3, 4, dtype=torch.bool)
    empty[2] = False  # one row with no visible key: 0 under zero_empty_rows
    kind, causal = case.removesuffix(" causal"), case.endswith(" causal")
    options = dict(scale=0.3, causal=causal)
    return {
        "plain": ([], lambda *x: exact_attention(*x, **options)),
        "bool": ([], lambda *x: exact_attention(*x, allowed, **options)),
        "float": ([_leaf(1, 2, 3, 4)], lambda *x: exact_attention(*x, **options)),
        "fill": ([_leaf(2, 3, 4)], lambda *x: exact_attention(*x, fill_mask=fill, fill_value=-1e4, **options)),
        "empty rows": ([], lambda *x: exact_attention(*x, empty, zero_empty_rows=True, **options)),
    }[kind]


@pytest.mark.parametrize("case", ["plain", "bool", "float", "plain causal", "bool causal", "float causal", "fill", "empty rows"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_exact_attention_is_twice_differentiable(case, kv_heads):
    extra, call = _exact_double_backward_case(case)
    inputs = (_leaf(1, 2, 3, 4), _leaf(1, kv_heads, 4, 4), _leaf(1, kv_heads, 4, 3), *extra)
    assert torch.autograd.gradgradcheck(call, inputs, fast_mode=True)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_agent_attention_is_twice_differentiable(mask_kind, kv_heads):
    # equal head dims, as CPU SDPA takes its fused kernel (no second derivative) for them
    q, k, v, agents, agent_bias = _leaf(1, 2, 3, 4), _leaf(1, kv_heads, 5, 4), _leaf(1, kv_heads, 5, 4), _leaf(1, 2, 2, 4), _leaf(2, 2)
    mask = {"none": None, "bool": torch.tensor([True, False, True, True, False]), "float": _leaf(1, 1, 1, 5)}[mask_kind]

    def call(q, k, v, agents, agent_bias, *mask_leaf):
        return agent_attention(q, k, v, agents, mask_leaf[0] if mask_leaf else mask, scale=0.3, agent_scale=0.6, agent_bias=agent_bias)

    inputs = (q, k, v, agents, agent_bias) + ((mask,) if mask_kind == "float" else ())
    assert torch.autograd.gradgradcheck(call, inputs, fast_mode=True)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(causal=True, normalization="inline"), dict(feature_map="focused", feature_scale=0.7),
     dict(feature_map="relu", normalization="inline", masked=True), dict(causal=True, masked=True)],
)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_linear_attention_is_twice_differentiable(options, kv_heads):
    options = dict(options)
    key_mask = torch.tensor([[True, False, True, True, True]]) if options.pop("masked", False) else None
    inputs = (_leaf(1, 2, 5, 3), _leaf(1, kv_heads, 5, 3), _leaf(1, kv_heads, 5, 2))
    assert torch.autograd.gradgradcheck(lambda *x: linear_attention(*x, key_mask=key_mask, **options), inputs, fast_mode=True)


def _gradient_penalty_grads(attention, inputs):
    """Gradients of out² + Σ‖∂(out·w)/∂x‖² (x: every input), a gradient penalty, with respect to every input.

    SDPA is held to its math backend: torch's fused CPU kernel has no second derivative, so the
    plain agent reference needs it (the op does the same by itself)."""
    with sdpa_kernel(SDPBackend.MATH):
        out = attention(*inputs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), inputs, create_graph=True)
    assert all(grad.grad_fn is not None for grad in grads)  # the first-order gradients carry a graph
    return torch.autograd.grad(out.pow(2).sum() + sum(grad.pow(2).sum() for grad in grads), inputs)


def test_gradient_penalties_through_the_ops_equal_those_of_the_plain_references():
    torch.manual_seed(3)
    # equal head dims, as CPU SDPA takes its fused kernel (no second derivative) for them
    q, k, v, mask = _leaf(2, 4, 17, 16), _leaf(2, 2, 19, 16), _leaf(2, 2, 19, 16), _leaf(2, 1, 17, 19)
    fill = torch.rand(1, 4, 17, 19) > 0.7
    agents, agent_bias = _leaf(1, 4, 3, 16), _leaf(4, 3)
    key_mask = torch.rand(2, 19) > 0.3
    exact_options = dict(scale=0.3, causal=True, fill_mask=fill, fill_value=-1e4)
    linear_options = dict(normalization="inline", causal=False, key_mask=key_mask, feature_map="focused")
    calls = [
        (lambda *x: exact_attention(*x, **exact_options), lambda *x: exact_attention_reference(*x, **exact_options), (q, k, v, mask)),
        (lambda q, k, v, a, b: agent_attention(q, k, v, a, scale=0.3, agent_scale=0.5, agent_bias=b),
         lambda q, k, v, a, b: agent_attention_reference(q, k, v, a, None, b, scale=0.3, agent_scale=0.5), (q, k, v, agents, agent_bias)),
        (lambda *x: linear_attention(*x, **linear_options), lambda *x: linear_attention_reference(*x, **linear_options), (q, k, v)),
    ]
    for op, reference, inputs in calls:
        for grad, want in zip(_gradient_penalty_grads(op, inputs), _gradient_penalty_grads(reference, inputs)):
            torch.testing.assert_close(grad, want)


def test_dropout_second_derivatives_come_from_the_wrapper_and_the_raw_op_refuses():
    q, k, v = _inputs(torch.float32, requires_grad=True)
    with pytest.raises(RuntimeError, match="dropout"):
        torch.autograd.grad(torch.ops.attnopt.exact_attention(q, k, v, None, scale=0.3, dropout_p=0.5).sum(), q, create_graph=True)

    def hand_written(q, k, v, scale, dropout_p):
        probs = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * scale, -1)
        return torch.nn.functional.dropout(probs, dropout_p) @ v.repeat_interleave(2, 1)

    grads = []
    for attention in (exact_attention, hand_written):
        torch.manual_seed(7)
        grads.append(_gradient_penalty_grads(lambda *x, f=attention: f(*x, scale=0.3, dropout_p=0.5), (q, k, v)))
    for grad, want in zip(*grads):
        torch.testing.assert_close(grad, want)


def test_raw_op_refuses_to_differentiate_through_dropout_but_the_wrapper_does():
    q, k, v = _inputs(torch.float32, requires_grad=True)
    out = torch.ops.attnopt.exact_attention(q, k, v, None, scale=0.3, dropout_p=0.5)
    with pytest.raises(RuntimeError, match="dropout"):
        out.sum().backward()
    torch.manual_seed(7)
    exact_attention(q, k, v, scale=0.3, dropout_p=0.5).sum().backward()
    grad = q.grad.clone()
    q.grad = None
    torch.manual_seed(7)
    probs = torch.nn.functional.dropout(torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3, -1), 0.5)
    (probs @ v.repeat_interleave(2, 1)).sum().backward()
    torch.testing.assert_close(grad, q.grad)


def test_flop_counter_counts_each_op_with_its_formula():
    q, k, v = _inputs(torch.float32)
    batch, heads, n, d = q.shape
    m, e, n_agents = k.shape[2], v.shape[3], 3
    with FlopCounterMode(display=False) as counter:
        exact_attention(q, k, v, scale=0.3)
    assert counter.get_total_flops() == 2 * batch * heads * n * m * (d + e)
    for agent_bias in (None, torch.randn(heads, n_agents)):  # the bias adds no matmul
        with FlopCounterMode(display=False) as counter:
            agent_attention(q, k, v, torch.randn(1, heads, n_agents, d), scale=0.3, agent_scale=0.5, agent_bias=agent_bias)
        assert counter.get_total_flops() == 2 * batch * heads * n_agents * m * (d + e) + 2 * batch * heads * n * n_agents * (d + e)
    for normalization, extra in (("sum", 0), ("inline", 2 * batch * heads * (m + n) * e)):
        with FlopCounterMode(display=False) as counter:
            linear_attention(q, k, v, normalization=normalization)
        base = 2 * batch * heads * ((m + n) * d * e + (m + n) * d)
        assert counter.get_total_flops() == base + extra


def test_compile_fullgraph_has_no_graph_break_forward_and_backward():
    q, k, v = _inputs(torch.float32, requires_grad=True)
    agents = torch.randn(1, 4, 3, 8)
    agent_bias = torch.randn(1, 4, 3)
    mask = torch.rand(5, 7) > 0.2
    additive, fill = torch.randn(5, 7), torch.rand(2, 1, 5, 7) > 0.7
    masking = dict(fill_mask=fill, fill_value=-1e4, score_dtype=torch.float16, zero_empty_rows=True)

    def model(q, k, v):
        return (
            exact_attention(q, k, v, mask, scale=0.3).sum()
            + exact_attention(q, k, v, additive, scale=0.3, **masking).sum()
            + agent_attention(q, k, v, agents, scale=0.3, agent_scale=0.5).sum()
            + agent_attention(q, k, v, agents, scale=0.3, agent_scale=0.5, agent_bias=agent_bias).sum()
            + linear_attention(q, k, v, key_mask=torch.ones(2, 7, dtype=torch.bool)).sum()
        )

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    result = compiled(q, k, v)
    result.backward()
    expected = model(q.detach(), k.detach(), v.detach())
    torch.testing.assert_close(result, expected)
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q, k, v: exact_attention(q, k[:, :, :, :4], v, scale=1.0), "head dims"),
        (lambda q, k, v: exact_attention(q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 6), scale=1.0), "multiple"),
        (lambda q, k, v: exact_attention(q, k, v, torch.zeros(3, 7), scale=1.0), "broadcast"),
        (lambda q, k, v: exact_attention(q, k, v, fill_mask=torch.zeros(5, 7), scale=1.0), "fill_mask must be bool"),
        (lambda q, k, v: exact_attention(q, k, v, fill_mask=torch.ones(3, 7, dtype=torch.bool), scale=1.0), "broadcast"),
        (lambda q, k, v: exact_attention(q, k, v, torch.zeros(5, 7), score_dtype=torch.int32, scale=1.0), "score_dtype"),
        (lambda q, k, v: agent_attention(q, k, v, torch.randn(3, 4, 2, 8), scale=1.0, agent_scale=1.0), "agents"),
        (lambda q, k, v: agent_attention(q, k, v, torch.randn(1, 4, 2, 8), torch.zeros(5, 7), scale=1.0, agent_scale=1.0), "broadcast"),
        (lambda q, k, v: agent_attention(q, k, v, torch.randn(1, 4, 2, 8), scale=1.0, agent_scale=1.0, agent_bias=torch.zeros(4, 3)), "broadcast"),
        (lambda q, k, v: agent_attention(q, k, v, torch.randn(1, 4, 2, 8), scale=1.0, agent_scale=1.0, agent_bias=torch.ones(2, dtype=torch.bool)), "agent_bias"),
        (lambda q, k, v: linear_attention(q, k, v, feature_map="softplus"), "feature_map"),
        (lambda q, k, v: linear_attention(q, k, v, normalization="max"), "normalization"),
        (lambda q, k, v: linear_attention(q, k, v, causal=True), "N == M"),
        (lambda q, k, v: linear_attention(q, k, v, key_mask=torch.ones(2, 7)), "key_mask"),
        (lambda q, k, v: linear_attention(q, k, v, feature_scale=float("nan")), "feature_scale"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(*_inputs(torch.float32))


@pytest.mark.slow
def test_importing_the_package_generates_no_kernel_code():
    import subprocess
    import sys

    code = "import sys, attnopt.kernels; print(any(m.startswith('attnopt_generated') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert "exact_attention" in kernels.__all__
