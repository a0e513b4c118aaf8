"""The torch.library ops: registration, fake tensors, autograd, FLOP counting, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnopt.kernels as kernels
from attnopt.kernels import agent_attention, exact_attention, linear_attention


def _inputs(dtype=torch.float64, requires_grad=False):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 7, 8, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, 7, 6, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def test_ops_are_registered_under_the_attnopt_namespace():
    for name in ("exact_attention", "agent_attention", "linear_attention"):
        assert hasattr(torch.ops.attnopt, name)


@pytest.mark.parametrize(
    "op, args, kwargs",
    [
        ("exact_attention", lambda q, k, v: (q, k, v, torch.randn(2, 1, 5, 7, dtype=q.dtype)), dict(scale=0.3, causal=True)),
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

    def model(q, k, v):
        return (
            exact_attention(q, k, v, mask, scale=0.3).sum()
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


def test_importing_the_package_generates_no_kernel_code():
    import subprocess
    import sys

    code = "import sys, attnopt.kernels; print(any(m.startswith('attnopt_generated') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert "exact_attention" in kernels.__all__
