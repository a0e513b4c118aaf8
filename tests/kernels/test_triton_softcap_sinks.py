"""Logit softcapping and attention sinks in the generated exact-attention Triton kernel.

The kernel (interpreted on CPU, native on CUDA) is held to exact_attention_reference: softcap
alone, sinks alone and both; with causality, bool and additive masks, fills, GQA; sinks of every
broadcast layout and dtype; rows whose keys are all masked (a finite sink takes all the weight:
0; a -inf sink: NaN, or 0 with zero_empty_rows; a +inf sink: NaN). fp32 to rtol 1e-5, fp16 (and
bf16 on CUDA: the interpreter's bf16 tl.dot is wrong) to half rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from attnopt.kernels import config, exact_attention, exact_attention_reference, source
from attnopt.kernels import exact as exact_module
from attnopt.kernels.codegen import kernel_module
from attnopt.kernels.softmax_template import ExactKernelConfig

FP32 = dict(atol=2e-6, rtol=1e-5)
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
HALF = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
TRANSFORMS = {"softcap": dict(softcap=2.5), "sinks": dict(sinks=True), "both": dict(softcap=2.5, sinks=True)}

# B, H, Hkv, N, M, d, e: two query and two key tiles of 16, a padded head dim, GQA
SHAPE = (2, 4, 2, 19, 23, 24, 16)


def _inputs(device, dtype=torch.float32, seed=0, shape=SHAPE):
    batch, heads, kv_heads, n, m, d, e = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=generator)
    k = torch.randn(batch, kv_heads, m, d, generator=generator)
    v = torch.randn(batch, kv_heads, m, e, generator=generator)
    sinks = torch.randn(1, heads, 1, 1, generator=generator)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), sinks.to(device)


def _mask(kind, device, dtype=torch.float32, seed=1, shape=SHAPE):
    """None, a bool keep-mask (B, 1, N, M) or a float one (H, N, M) of `dtype` (finfo.min where
    blocked, and -inf on a row); each blocks one row entirely."""
    batch, heads, _, n, m, _, _ = shape
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, 1, n, m, generator=generator) > 0.35
    keep[0, 0, 2] = False
    if kind == "none":
        return None
    if kind == "bool":
        return keep.to(device)
    additive = torch.randn(heads, n, m, generator=generator).masked_fill(~keep[0], torch.finfo(dtype).min)
    additive[1, 5] = -math.inf
    return additive.to(device, dtype)


def _options(transform, sinks):
    options = dict(TRANSFORMS[transform])
    if "sinks" in options:
        options["sinks"] = sinks
    return options


def _assert_close(actual, expected, tolerance=FP32):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance)


# --- which calls take the kernel, and what it is generated with ----------------------------------


def test_softcap_and_sinks_take_the_kernel_where_the_rest_of_the_call_does(monkeypatch):
    q, _, _, sinks = _inputs("cpu")
    monkeypatch.setattr(config, "force_triton", True)
    computes = exact_module._kernel_computes
    assert computes(q, None, None, 0.0, sinks, None) and computes(q, None, None, 0.0, None, 30.0)
    assert computes(q, None, None, 0.0, sinks.half(), 30.0) and computes(q, None, None, 0.0, sinks.bfloat16(), None)
    assert not computes(q, None, None, 0.0, sinks.double(), None)  # the reference's softmax runs in fp64
    assert not computes(q, None, None, 0.1, sinks, 30.0)  # dropout: torch's RNG stream
    assert not computes(q, torch.zeros(19, 23, dtype=torch.float64), None, 0.0, sinks, 30.0)
    assert not computes(q.double(), None, None, 0.0, sinks, 30.0)
    # SDPA computes neither
    assert not exact_module._sdpa_computes(q, q, q, None, None, -math.inf, None, 0.0, 0.3, sinks, None)
    assert not exact_module._sdpa_computes(q, q, q, None, None, -math.inf, None, 0.0, 0.3, None, 30.0)


def test_softcap_and_sinks_write_only_their_own_code():
    base = dict(head_dim=32, value_dim=32)
    plain = source("exact_attention", **base)
    assert "softcap" not in plain and "Sinks" not in plain and "sink" not in plain
    capped = source("exact_attention", **base, softcap=True)
    assert "def softcap_tanh(x)" in capped and "score_scale = scale / softcap" in capped
    assert "cap = softcap * 1.44" in capped and "scores = softcap_tanh(scores) * cap" in capped
    assert "cap = softcap\n" in source("exact_attention", **base, softcap=True, mask="additive")  # natural units
    per_head = source("exact_attention", **base, sinks=True, sinks_broadcast=(True, False, True, True))
    assert "Sinks, stride_sb, stride_sh, stride_sn," in per_head and "head * stride_sh" in per_head
    assert "batch * stride_sb" not in per_head and "offs_m * stride_sn" not in per_head
    assert "kept_max = row_max * 0.69" in per_head and "softcap" not in per_head
    per_row = source("exact_attention", **base, sinks=True, sinks_broadcast=(False, False, False, True), fill=True)
    assert all(term in per_row for term in ("batch * stride_sb", "head * stride_sh", "offs_m * stride_sn"))
    assert "kept_max = row_max\n" in per_row
    # softcap's value is an argument: one kernel for all values, another text with or without it
    assert len({plain, capped, per_head, source("exact_attention", **base, softcap=True, sinks=True)}) == 4


@triton.jit
def _apply(X, Y, n, fn: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(Y + offsets, fn(tl.load(X + offsets, mask=inside, other=0.0)), mask=inside)


def test_softcap_tanh_is_within_two_ulp_of_tanh():
    """The generated tanh (polynomial below 0.55, exp above) on both branches, the switch, tiny,
    saturated and non-finite arguments, against fp64 tanh: 2 ulp with the interpreter's exact
    exp, 4 on CUDA (tl.exp is ex2.approx there)."""
    tanh = kernel_module("exact_attention", ExactKernelConfig(head_dim=16, value_dim=16, softcap=True)).softcap_tanh
    magnitudes = torch.cat([torch.linspace(0, 12, 20001), torch.logspace(-30, 1.5, 4001),
                            torch.tensor([0.55, 0.5499999, 0.5500001, 9.0, 44.0, 89.0, 1e4, 3e38])])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # no op launched: not the triton_device fixture
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([math.inf, -math.inf, math.nan])]).to(device)
    y = torch.empty_like(x)
    _apply[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), fn=tanh, BLOCK=1024)
    exact = torch.tanh(x.cpu().double())
    ulp = torch.from_numpy(np.spacing(exact.abs().float().numpy())).double()
    finite = x.cpu().isfinite()
    assert ((y.cpu().double() - exact).abs()[finite] / ulp[finite]).max() <= (4 if x.is_cuda else 2)
    assert y[-3] == 1 and y[-2] == -1 and y[-1].isnan()
    number = ~x.cpu().isnan()
    assert torch.equal(y.cpu().signbit()[number], x.cpu().signbit()[number])  # odd, -0 included


# --- the kernel against the reference ----------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_kernel_matches_the_reference_in_fp32(triton_device, transform, mask_kind, causal):
    q, k, v, sinks = _inputs(triton_device)
    mask = _mask(mask_kind, triton_device)
    options = dict(scale=0.45, causal=causal, **_options(transform, sinks))
    _assert_close(exact_attention(q, k, v, mask, **options), exact_attention_reference(q, k, v, mask, **options))


@pytest.mark.parametrize(
    "layout",
    ["per_head", "per_head_rank3", "per_row", "per_batch", "per_query", "strided_per_row", "bfloat16", "float16"],
)
def test_sinks_broadcast_like_the_reference_in_every_layout_and_dtype(triton_device, layout):
    q, k, v, _ = _inputs(triton_device)
    batch, heads, _, n, _, _, _ = SHAPE
    generator = torch.Generator().manual_seed(5)
    shapes = {"per_head": (1, heads, 1, 1), "per_head_rank3": (heads, 1, 1), "per_row": (batch, heads, n, 1),
              "per_batch": (batch, 1, 1, 1), "per_query": (n, 1), "bfloat16": (1, heads, 1, 1), "float16": (1, heads, 1, 1)}
    if layout == "strided_per_row":  # a (B, N, H) projection viewed as (B, H, N, 1)
        sinks = torch.randn(batch, n, heads, generator=generator).permute(0, 2, 1)[..., None]
    else:
        sinks = torch.randn(shapes[layout], generator=generator)
    sinks = (2 * sinks).to(triton_device, getattr(torch, layout, torch.float32))
    options = dict(scale=0.45, sinks=sinks, softcap=4.0)
    _assert_close(exact_attention(q, k, v, **options), exact_attention_reference(q, k, v, **options))


@pytest.mark.parametrize("zero_empty_rows", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool", "-inf", "finfo.min"])
def test_fully_masked_rows_with_sinks_give_what_the_reference_gives(triton_device, mask_kind, zero_empty_rows):
    """Rows 1-4 see no key: finite sink → 0 (finfo.min: the sink takes all the weight too),
    -inf sink → NaN or 0, +inf and NaN sinks → NaN; row 5 with a -inf sink is a plain softmax."""
    q, k, v, _ = _inputs(triton_device)
    batch, heads, _, n, m, _, _ = SHAPE
    keep = torch.rand(batch, 1, n, m, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[:, :, 1:5] = False
    mask = {"bool": keep, "-inf": torch.zeros(keep.shape).masked_fill(~keep, -math.inf),
            "finfo.min": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    sinks = torch.randn(batch, heads, n, 1, generator=torch.Generator().manual_seed(3))
    sinks[:, :, 2] = -math.inf
    sinks[:, :, 3] = math.inf
    sinks[:, :, 4] = math.nan
    sinks[:, :, 5] = -math.inf
    mask, sinks = mask.to(triton_device), sinks.to(triton_device)
    options = dict(scale=0.45, sinks=sinks, softcap=3.0, zero_empty_rows=zero_empty_rows)
    out = exact_attention(q, k, v, mask, **options)
    _assert_close(out, exact_attention_reference(q, k, v, mask, **options))
    assert (out[:, :, 1] == 0).all()
    if mask_kind != "finfo.min":  # finfo.min keys are visible: the -inf sink leaves them uniform
        assert (out[:, :, 2] == 0).all() if zero_empty_rows else out[:, :, 2].isnan().all()
    assert out[:, :, 3:5].isnan().all() and out[:, :, 5].isfinite().all() and out[:, :, 5].abs().sum() > 0


def test_a_sink_near_the_fp32_range_takes_all_the_weight(triton_device):
    """The sink is folded in natural units: a log2-unit kernel must not overflow 3e38·log2(e)."""
    q, k, v, _ = _inputs(triton_device)
    sinks = torch.full((1, 4, 1, 1), 3e38, device=triton_device)
    sinks[0, 1] = -3e38
    out = exact_attention(q, k, v, scale=0.45, sinks=sinks)
    _assert_close(out, exact_attention_reference(q, k, v, scale=0.45, sinks=sinks))
    assert (out[:, [0, 2, 3]] == 0).all() and out[:, 1].abs().sum() > 0


def test_softcap_caps_the_scores_before_fills_and_masks_across_both_tanh_branches(triton_device):
    """Scaled scores of up to about ±60 against softcap 20 (tanh arguments on both sides of 0.55):
    scores this large leave fp32 outputs only ~1e-5 accurate, the reference's included, so the
    kernel is held to the fp64 reference as closely as the fp32 reference is. A fill of -2.5 under
    softcap 2 is not capped (cap(-2.5) would be -1.7)."""
    q, k, v, sinks = _inputs(triton_device)
    fill = (torch.rand(2, 1, 19, 23, generator=torch.Generator().manual_seed(4)) > 0.7).to(triton_device)
    options = dict(scale=4.0, softcap=20.0, fill_mask=fill, fill_value=-30.0)
    out = exact_attention(q, k, v, sinks=sinks, **options)
    exact = exact_attention_reference(q.double(), k.double(), v.double(), sinks=sinks.double(), **options)
    reference_error = (exact_attention_reference(q, k, v, sinks=sinks, **options).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * reference_error
    options = dict(scale=0.3, softcap=2.0, fill_mask=fill, fill_value=-2.5, sinks=sinks)
    out = exact_attention(q, k, v, **options)
    _assert_close(out, exact_attention_reference(q, k, v, **options))
    capped_fill = exact_attention_reference(q, k, v, **{**options, "fill_value": 2.0 * math.tanh(-1.25)})
    assert not torch.allclose(out, capped_fill, atol=1e-3)


def test_gradients_through_the_kernel_path_reach_the_sinks(triton_device):
    """Forward in the kernel, backward through the reference: the gradients are the reference's."""
    q, k, v, sinks = _inputs(triton_device, shape=(1, 2, 1, 17, 17, 16, 16))
    mask = torch.rand(17, 17, device=triton_device) > 0.3
    weights = torch.randn(1, 2, 17, 16, device=triton_device)

    def gradients(attention):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, sinks[:, :2])]
        out = attention(*leaves[:3], mask, scale=0.3, causal=True, softcap=2.0, sinks=leaves[3])
        return torch.autograd.grad((out * weights).sum(), leaves)

    for grad, want in zip(gradients(exact_attention), gradients(exact_attention_reference)):
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "wider"])
@pytest.mark.parametrize("zero_empty_rows", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_matches_the_reference_in_half_precision(triton_device, dtype, mask_kind, zero_empty_rows, causal):
    """Half inputs: fp32 scores, softcapped, then a half mask added in half (scores and sum rounded,
    as the original's half scores + mask) or a wider fp32 one; half sinks; a finite fill."""
    q, k, v, sinks = _inputs(triton_device, dtype)
    mask = _mask("bool" if mask_kind == "bool" else "additive", triton_device, torch.float32 if mask_kind == "wider" else dtype)
    fill = torch.rand(2, 4, 19, 1, generator=torch.Generator().manual_seed(6)) > 0.7
    options = dict(scale=0.45, causal=causal, zero_empty_rows=zero_empty_rows, softcap=2.5, sinks=sinks.to(dtype),
                   fill_mask=fill.to(triton_device), fill_value=-1e4)
    _assert_close(exact_attention(q, k, v, mask, **options), exact_attention_reference(q, k, v, mask, **options),
                  HALF[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_kernel_matches_the_reference_with_fills_and_empty_rows_as_zero(triton_device, transform, mask_kind):
    q, k, v, sinks = _inputs(triton_device)
    mask = _mask(mask_kind, triton_device)
    fill = torch.rand(1, 4, 19, 23, generator=torch.Generator().manual_seed(7)) > 0.8
    fill[..., 7, :] = True  # a row filled entirely with a finite value: uniform over its keys (and the sink)
    for fill_value in (-1e4, -math.inf, -3.4e38):
        options = dict(scale=0.45, zero_empty_rows=True, fill_mask=fill.to(triton_device), fill_value=fill_value,
                       **_options(transform, sinks))
        _assert_close(exact_attention(q, k, v, mask, **options), exact_attention_reference(q, k, v, mask, **options))
