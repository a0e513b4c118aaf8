"""Logit softcapping (Gemma 2) and attention sinks (gpt-oss) in attnopt's exact op.

The reference is checked against the formula as the models write it, in fp64: scores·scale,
capped to c·tanh(s / c), then masks, then `softmax(cat([scores, sink], -1))[..., :-1] @ v`.
On CPU the op equals the reference (it runs it: SDPA computes neither), its gradients reach the
sinks, it differentiates twice, traces under fake tensors and counts the same FLOPs as without
them. The Triton kernel computes both (test_triton_softcap_sinks.py holds it to the reference).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnopt.kernels import config, exact_attention, exact_attention_reference
from attnopt.kernels import exact as exact_module
from attnopt.passes.masking import Masking, run_attention


def formula(q, k, v, mask=None, *, scale, causal=False, softcap=None, sinks=None):
    """The models' own spelling, in fp64 (GQA by repeat_interleave, a bool mask as -inf)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    if causal:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, -math.inf)
    if sinks is not None:
        sink = sinks.double().expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs @ v.double()


def inputs(batch=2, heads=4, kv_heads=2, n=5, m=7, d=8, e=6, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, m, d, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, m, e, generator=generator, dtype=dtype)
    sinks = torch.randn(1, heads, 1, 1, generator=generator, dtype=dtype)
    return q, k, v, sinks


def masks(batch, heads, n, m, seed=1):
    """A bool keep-mask and a float mask (finfo.min, -inf), each with fully masked rows."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, 1, n, m, generator=generator) < 0.6
    keep[0, 0, min(1, n - 1)] = False  # a fully masked row
    keep[-1, 0, -1] = False
    additive = torch.zeros(batch, heads, n, m, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    additive[0, 1, -1] = -math.inf
    return {"bool": keep, "finfo.min": additive, "none": None}


@pytest.mark.parametrize("shape", [dict(), dict(kv_heads=4), dict(kv_heads=1, n=1, m=3), dict(n=6, m=6, e=8)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "finfo.min"])
@pytest.mark.parametrize("transform", ["softcap", "sinks", "both"])
def test_reference_is_the_models_formula_in_fp64(shape, mask_kind, transform):
    q, k, v, sinks = inputs(**shape)
    mask = masks(q.shape[0], q.shape[1], q.shape[2], k.shape[2])[mask_kind]
    options = dict(softcap=2.0 if transform != "sinks" else None, sinks=sinks if transform != "softcap" else None)
    for causal in (False, True):
        expected = formula(q, k, v, mask, scale=0.4, causal=causal, **options)
        actual = exact_attention_reference(q, k, v, mask, scale=0.4, causal=causal, **options)
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12, equal_nan=True)
        op = exact_attention(q, k, v, mask, scale=0.4, causal=causal, **options)
        torch.testing.assert_close(op, actual, atol=0, rtol=0, equal_nan=True)


def test_a_fully_masked_row_gives_zero_with_sinks_as_the_original_does():
    q, k, v, sinks = inputs(dtype=torch.float32)
    mask = masks(2, 4, 5, 7)
    for kind in ("bool", "finfo.min"):
        out = exact_attention(q, k, v, mask[kind].to(torch.float32) if kind != "bool" else mask[kind],
                              scale=0.4, sinks=sinks.float())
        assert torch.isfinite(out).all()
        assert (out[0, :, 1] == 0).all() and (out[-1, :, -1] == 0).all()
    # a -inf sink on an empty row: torch.softmax's NaN (or SDPA's 0 with zero_empty_rows)
    all_blocked = torch.zeros(1, 1, 5, 7, dtype=torch.bool)
    silent = torch.full((1, 4, 1, 1), -math.inf)
    assert exact_attention(q, k, v, all_blocked, scale=0.4, sinks=silent).isnan().all()
    assert (exact_attention(q, k, v, all_blocked, scale=0.4, sinks=silent, zero_empty_rows=True) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_on_cpu_runs_the_reference_in_every_dtype(dtype):
    q, k, v, sinks = inputs(dtype=dtype)
    keep = masks(2, 4, 5, 7)["bool"]
    for options in (dict(softcap=5.0), dict(sinks=sinks), dict(softcap=5.0, sinks=sinks.float())):
        expected = exact_attention_reference(q, k, v, keep, scale=0.3, causal=True, **options)
        torch.testing.assert_close(exact_attention(q, k, v, keep, scale=0.3, causal=True, **options), expected,
                                   atol=0, rtol=0, equal_nan=True)
        assert not exact_module._sdpa_computes(q, k, v, keep, None, -math.inf, None, 0.0, 0.3,
                                               options.get("sinks"), options.get("softcap"))


def test_forced_triton_path_computes_them_except_fp64_sinks(monkeypatch):
    """The kernel computes softcap and sinks; fp64 sinks (an fp64 softmax in the reference) and
    dropout still run the reference, exactly."""
    q, k, v, sinks = inputs(dtype=torch.float32)
    monkeypatch.setattr(config, "force_triton", True)
    assert exact_module._kernel_computes(q, None, None, 0.0, sinks, None)
    assert exact_module._kernel_computes(q, None, None, 0.0, None, 30.0)
    assert not exact_module._kernel_computes(q, None, None, 0.0, sinks.double(), 30.0)
    assert not exact_module._kernel_computes(q, None, None, 0.5, sinks, 30.0)
    expected = exact_attention_reference(q, k, v, scale=0.3, softcap=3.0, sinks=sinks.double())
    torch.testing.assert_close(exact_attention(q, k, v, scale=0.3, softcap=3.0, sinks=sinks.double()), expected,
                               atol=0, rtol=0)


def test_dropout_with_sinks_draws_the_mask_of_the_weights_without_the_sink_column():
    q, k, v, sinks = inputs(dtype=torch.float32)
    torch.manual_seed(3)
    out = exact_attention(q, k, v, scale=0.3, sinks=sinks, dropout_p=0.5)
    torch.manual_seed(3)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    probs = torch.softmax(torch.cat([scores, sinks.expand(2, 4, 5, 1)], -1), -1)[..., :-1]
    expected = torch.nn.functional.dropout(probs, 0.5, training=True) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected)


def test_gradients_reach_the_sinks_and_differentiate_twice():
    q, k, v, sinks = inputs(batch=1, heads=2, kv_heads=1, n=3, m=4, d=3, e=2)
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    keep[0, 0, 1] = False  # an empty row: its output (0) depends on nothing but is still smooth
    bias = torch.randn(1, 2, 3, 4, dtype=torch.float64)

    def attend(q, k, v, sinks, bias):
        return exact_attention(q, k, v, bias.masked_fill(~keep, -math.inf), scale=0.5, softcap=1.5, sinks=sinks,
                               causal=True)

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, sinks[:, :2], bias)]
    assert torch.autograd.gradcheck(attend, leaves)
    assert torch.autograd.gradgradcheck(attend, leaves)
    (grad_sinks,) = torch.autograd.grad(attend(*leaves).sum(), leaves[3])
    assert grad_sinks.shape == (1, 2, 1, 1) and grad_sinks.abs().sum() > 0


def test_gradients_of_the_op_equal_the_formulas():
    q, k, v, sinks = inputs(dtype=torch.float32)
    keep = masks(2, 4, 5, 7)["bool"]
    ours = [x.clone().requires_grad_(True) for x in (q, k, v, sinks)]
    theirs = [x.clone().requires_grad_(True) for x in (q, k, v, sinks)]
    exact_attention(*ours[:3], keep, scale=0.3, softcap=4.0, sinks=ours[3]).square().sum().backward()
    formula(*theirs[:3], keep, scale=0.3, softcap=4.0, sinks=theirs[3]).square().sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad.float(), atol=1e-5, rtol=1e-5)


def test_fake_tensors_opcheck_and_flop_count():
    q, k, v, sinks = inputs(batch=1, heads=2, kv_heads=1, n=3, m=4, d=3, e=2)
    sinks = sinks[:, :2].clone()
    keep = torch.rand(1, 1, 3, 4) < 0.7
    torch.library.opcheck(torch.ops.attnopt.exact_attention.default, (q, k, v, keep, None, sinks),
                          dict(scale=0.5, softcap=2.0))
    with FlopCounterMode(display=False) as counter:
        exact_attention(q, k, v, keep, scale=0.5, softcap=2.0, sinks=sinks)
    assert counter.get_total_flops() == 2 * 1 * 2 * 3 * 4 * (3 + 2)
    with pytest.raises(ValueError, match="broadcast"):
        exact_attention(q, k, v, scale=0.5, sinks=torch.zeros(1, 2, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="softcap"):
        exact_attention(q, k, v, scale=0.5, softcap=0.0)


def test_compiled_op_with_sinks_and_softcap():
    q, k, v, sinks = inputs(dtype=torch.float32)

    def attend(q, k, v, sinks):
        return exact_attention(q, k, v, scale=0.3, softcap=3.0, sinks=sinks)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, sinks), attend(q, k, v, sinks))


def test_masking_hands_them_to_the_exact_op_and_refuses_to_drop_them():
    q, k, v, sinks = inputs(dtype=torch.float32)
    masking = Masking(softcap=3.0, sinks=sinks)
    assert masking.exact_arguments(q.dtype) == {"mask": None, "softcap": 3.0, "sinks": sinks}

    class Exact(torch.nn.Module):
        exact_masking = True

        def forward(self, q, k, v, *, mask=None, scale, causal=False, dropout_p=0.0, **options):
            return exact_attention(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, **options)

    class Reduced(torch.nn.Module):
        def forward(self, q, k, v, *, mask=None, scale, causal=False, dropout_p=0.0):
            return q

    out = run_attention(Exact(), q, k, v, masking, scale=0.3, causal=False, dropout_p=0.0)
    torch.testing.assert_close(out, exact_attention_reference(q, k, v, scale=0.3, softcap=3.0, sinks=sinks))
    for partial in (Masking(softcap=3.0), Masking(sinks=sinks)):
        with pytest.raises(ValueError, match="only attnopt's exact attention"):
            run_attention(Reduced(), q, k, v, partial, scale=0.3, causal=False, dropout_p=0.0)
