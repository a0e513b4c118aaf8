"""attnopt::exact_attention on CPU runs torch's fused SDPA exactly where that is the reference's function.

Every dispatch condition of kernels.exact._sdpa_computes is exercised on random inputs: the op
must equal exact_attention_reference (1e-5 in fp32/fp64, the house half tolerances otherwise)
with the same NaN / zero pattern on fully masked rows, and SDPA's fused CPU kernel must be the
one that ran (counted below) — or must not have run at all where SDPA is not the same function.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from attnopt.kernels import exact_attention, exact_attention_reference

TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
FLASH = "aten._scaled_dot_product_flash_attention_for_cpu"


class _FlashSeen(TorchDispatchMode):
    """Records the aten ops SDPA dispatched to."""

    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "scaled_dot_product" in name or "softmax" in name:
            self.seen.append(name)
        if func is torch.ops.aten.scaled_dot_product_attention.default:
            # below autograd (inside the op) the mode sees SDPA itself: open it up to see its kernel
            with self:
                return func.decompose(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every F.scaled_dot_product_attention call ("sdpa"), then the kernels it reached inside."""
    calls: list[str] = []
    real = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append("sdpa")
        with _FlashSeen(calls):
            return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    return calls


def _qkv(batch, heads, kv_heads, n, m, d, e, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=generator)
    k = torch.randn(batch, kv_heads, m, d, generator=generator)
    v = torch.randn(batch, kv_heads, m, e, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


SHAPES = {
    "square": (2, 4, 4, 6, 6, 8, 8),
    "n<m": (2, 3, 3, 4, 9, 8, 8),
    "n>m gqa d>e": (2, 6, 2, 9, 4, 8, 5),
    "d<e mqa": (1, 4, 1, 7, 7, 5, 12),
    "b=h=1": (1, 1, 1, 5, 11, 16, 16),
    "n=1": (3, 2, 2, 1, 6, 4, 4),
    "n=m=1": (2, 2, 1, 1, 1, 8, 8),
    "head dim 72": (1, 2, 2, 33, 40, 72, 72),
}


def _masks(shape_key: str, batch, heads, n, m, seed=1):
    """Masks of every kind the op takes, each with rows fully masked (when N > 1) and broadcast shapes."""
    generator = torch.Generator().manual_seed(seed)
    keep4 = torch.rand(batch, 1, n, m, generator=generator) > 0.4
    keep4[0, 0, 0] = False  # a fully masked row
    keep4[-1, 0, -1] = True  # and an all-keep one
    padding = torch.ones(batch, 1, 1, m, dtype=torch.bool)
    padding[0, ..., m // 2:] = False
    additive = torch.randn(heads, n, m, generator=generator)  # 3-D: broadcast over the batch
    additive[..., 0, :] = -math.inf
    hf_style = torch.zeros(batch, 1, 1, m).masked_fill(~padding, torch.finfo(torch.float32).min)
    per_key = torch.randn(m, generator=generator)
    per_key[-1] = -math.inf
    return {
        "bool 4-D": keep4,
        "bool padding": padding,
        "bool 2-D": keep4[0, 0],
        "bool 1-D": padding[-1, 0, 0],
        "float 3-D -inf rows": additive,
        "float finfo.min padding": hf_style,
        "float 1-D": per_key,
        "float expanded": torch.randn(batch, 1, 1, 1, generator=generator).expand(batch, heads, n, m),
        "fp16 float in fp32": torch.randn(1, 1, n, m, generator=generator).half(),
        "bool non-contiguous": keep4.transpose(-1, -2).contiguous().transpose(-1, -2),
    }


def _assert_same(out, want, dtype):
    assert out.dtype == want.dtype and out.shape == want.shape
    torch.testing.assert_close(out, want, equal_nan=True, **TOLERANCE[dtype])
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.isfinite(), want.isfinite())


def _run_both(q, k, v, mask=None, **options):
    return exact_attention(q, k, v, mask, **options), exact_attention_reference(q, k, v, mask, **options)


@pytest.mark.parametrize("shape_key", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_equals_reference_without_mask(shape_key, causal, sdpa_calls):
    batch, heads, kv_heads, n, m, d, e = SHAPES[shape_key]
    q, k, v = _qkv(batch, heads, kv_heads, n, m, d, e)
    for scale in (d**-0.5, 2.0, -0.7, 0.0):
        out, want = _run_both(q, k, v, scale=scale, causal=causal)
        _assert_same(out, want, torch.float32)
    assert sdpa_calls.count("sdpa") == 4 and sdpa_calls.count(FLASH) == 4


@pytest.mark.parametrize("shape_key", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("zero_empty_rows", [False, True])
def test_sdpa_equals_reference_with_masks(shape_key, causal, zero_empty_rows, sdpa_calls):
    batch, heads, kv_heads, n, m, d, e = SHAPES[shape_key]
    q, k, v = _qkv(batch, heads, kv_heads, n, m, d, e, seed=2)
    masks = _masks(shape_key, batch, heads, n, m)
    for name, mask in masks.items():
        for scale in (0.37, -0.5):
            out, want = _run_both(q, k, v, mask, scale=scale, causal=causal, zero_empty_rows=zero_empty_rows)
            try:
                _assert_same(out, want, torch.float32)
            except AssertionError as error:
                raise AssertionError(f"mask {name!r}, scale {scale}: {error}") from None
    # the fused CPU kernel, never SDPA's math fallback, for every mask
    assert sdpa_calls.count("sdpa") == 2 * len(masks) and sdpa_calls.count(FLASH) == 2 * len(masks)
    assert "aten._safe_softmax" not in sdpa_calls


@pytest.mark.parametrize("zero_empty_rows", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_pattern(zero_empty_rows, causal, sdpa_calls):
    """Rows with no visible key: 0 with zero_empty_rows (SDPA's rule), NaN otherwise (softmax's),
    for bool masks, -inf additive masks, -inf fills and fills combined with masks."""
    q, k, v = _qkv(2, 3, 3, 6, 5, 8, 8, seed=3)
    keep = torch.rand(2, 1, 6, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[:, :, 1] = False
    keep[1, :, 4, :1] = False  # with causal: row 4 sees keys 0..4, all blocked only with causal + fill below
    fill = torch.zeros(1, 3, 6, 5, dtype=torch.bool)
    fill[0, 1, 2] = True  # a whole row filled
    fill[0, :, 4, 1:] = True
    additive = torch.zeros(2, 1, 6, 5).masked_fill(~keep, -math.inf)
    cases = {
        "bool": dict(mask=keep),
        "additive -inf": dict(mask=additive),
        "fill only": dict(fill_mask=fill),
        "fill and bool": dict(mask=keep, fill_mask=fill),
        "fill and float": dict(mask=additive, fill_mask=fill),
    }
    for name, masking in cases.items():
        mask = masking.pop("mask", None)
        out, want = _run_both(q, k, v, mask, scale=0.3, causal=causal, zero_empty_rows=zero_empty_rows, **masking)
        empty_rows = want.isnan().all(-1) if not zero_empty_rows else (want == 0).all(-1)
        assert empty_rows.any(), name
        _assert_same(out, want, torch.float32)
    assert sdpa_calls.count(FLASH) == len(cases)


def test_fill_folded_with_nonfinite_float_mask(sdpa_calls):
    """where(fill, -inf, s) + mask is NaN where the mask is +inf or NaN at a filled place: kept."""
    q, k, v = _qkv(1, 2, 2, 4, 5, 8, 8, seed=5)
    mask = torch.randn(1, 1, 4, 5)
    mask[0, 0, 0, 1] = math.inf
    mask[0, 0, 2, 3] = math.nan
    fill = torch.zeros(4, 5, dtype=torch.bool)
    fill[0, 1] = fill[2, 3] = fill[3, 0] = True
    for zero_empty_rows in (False, True):
        out, want = _run_both(q, k, v, mask, scale=0.5, fill_mask=fill, zero_empty_rows=zero_empty_rows)
        assert want.isnan().any()
        _assert_same(out, want, torch.float32)
    assert sdpa_calls.count(FLASH) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, sdpa_calls):
    """Half q/k/v: the reference computes in fp32, SDPA rounds probabilities to the half dtype;
    the same to half rounding. Float masks only when added to fp32 scores (score_dtype fp32,
    what an SDPA site passes) and held in q's dtype or fp32."""
    q, k, v = _qkv(2, 4, 2, 24, 40, 16, 16, dtype=dtype, seed=6)
    keep = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(7)) > 0.5
    keep[0, 0, 3] = False
    additive = torch.zeros(2, 1, 24, 40).masked_fill(~keep, -math.inf) + torch.randn(2, 1, 24, 40)
    cases = [
        dict(),
        dict(causal=True),
        dict(mask=keep),
        dict(mask=keep, zero_empty_rows=True, causal=True),
        dict(mask=additive.to(dtype), score_dtype=torch.float32),
        dict(mask=additive, score_dtype=torch.float32, zero_empty_rows=True),
        dict(mask=additive, zero_empty_rows=True),  # fp32 mask: summed in fp32 whatever score_dtype
        # fp16 + bf16 promote to fp32: the other half dtype's mask is summed in fp32 too
        dict(mask=additive.to(torch.bfloat16 if dtype == torch.float16 else torch.float16)),
    ]
    for options in cases:
        mask = options.pop("mask", None)
        out, want = _run_both(q, k, v, mask, scale=0.25, **options)
        _assert_same(out, want, dtype)
    assert sdpa_calls.count(FLASH) == len(cases)


def test_float64(sdpa_calls):
    q, k, v = _qkv(2, 4, 2, 7, 9, 8, 6, dtype=torch.float64, seed=8)
    mask = torch.randn(2, 1, 7, 9)  # fp32 mask, exactly cast to fp64
    mask[1, 0, 2] = -math.inf
    for zero_empty_rows in (False, True):
        out, want = _run_both(q, k, v, mask, scale=0.3, causal=True, zero_empty_rows=zero_empty_rows)
        _assert_same(out, want, torch.float64)
    assert sdpa_calls.count(FLASH) == 2


def test_strided_inputs(sdpa_calls):
    """(B, N, H, d) layouts, last-dim strides other than 1: still the fused kernel."""
    base = torch.randn(2, 7, 4, 8)
    q = base.transpose(1, 2)
    k = torch.randn(2, 4, 8, 9).transpose(-1, -2)
    v = torch.randn(2, 4, 9, 16)[..., ::2]
    out, want = _run_both(q, k, v, scale=0.3)
    _assert_same(out, want, torch.float32)
    assert sdpa_calls.count(FLASH) == 1


NOT_SDPA = {
    "finite fill": lambda q, k, v: exact_attention(
        q, k, v, fill_mask=torch.rand(q.shape[2], k.shape[2]) > 0.5, fill_value=-1e4, scale=0.3),
    "float mask in fp64": lambda q, k, v: exact_attention(
        q, k, v, torch.randn(q.shape[2], k.shape[2]).double(), scale=0.3),
    "score_dtype fp64": lambda q, k, v: exact_attention(
        q, k, v, torch.randn(q.shape[2], k.shape[2]), score_dtype=torch.float64, scale=0.3),
    "half scores round a float mask": lambda q, k, v: exact_attention(
        q.half(), k.half(), v.half(), torch.randn(q.shape[2], k.shape[2]).half(), scale=0.3),
    "no keys": lambda q, k, v: exact_attention(q, k[:, :, :0], v[:, :, :0], scale=0.3),
    "dropout (op)": lambda q, k, v: torch.ops.attnopt.exact_attention(q, k, v, None, scale=0.3, dropout_p=0.5),
    "dropout (wrapper)": lambda q, k, v: exact_attention(q, k, v, scale=0.3, dropout_p=0.5),
}


@pytest.mark.parametrize("case", NOT_SDPA)
def test_reference_where_sdpa_is_another_function(case, sdpa_calls):
    q, k, v = _qkv(2, 2, 2, 5, 6, 8, 8, seed=9)
    NOT_SDPA[case](q, k, v)
    assert sdpa_calls == []


def test_backward_through_reference(sdpa_calls):
    """The forward runs SDPA; gradients (and second derivatives) are the reference's."""
    q, k, v = (x.double().requires_grad_() for x in _qkv(1, 4, 2, 5, 6, 4, 3, seed=10))
    mask = torch.randn(1, 1, 5, 6, dtype=torch.float64)
    mask[0, 0, 1] = -math.inf
    options = dict(scale=0.4, causal=True, zero_empty_rows=True)
    torch.autograd.gradcheck(lambda *x: exact_attention(*x, mask, **options), (q, k, v))
    torch.autograd.gradgradcheck(lambda *x: exact_attention(*x, mask, **options), (q, k, v))
    grads = torch.autograd.grad(exact_attention(q, k, v, mask, **options).sum(), (q, k, v))
    wants = torch.autograd.grad(exact_attention_reference(q, k, v, mask, **options).sum(), (q, k, v))
    for grad, want in zip(grads, wants):
        torch.testing.assert_close(grad, want)
    assert sdpa_calls.count(FLASH) >= 1


def test_flop_formula_unchanged(sdpa_calls):
    q, k, v = _qkv(2, 4, 2, 6, 9, 8, 5)
    with FlopCounterMode(display=False) as counter:
        exact_attention(q, k, v, torch.rand(6, 9) > 0.2, scale=0.3, causal=True)
    assert counter.get_total_flops() == 2 * 2 * 4 * 6 * 9 * (8 + 5)
    assert sdpa_calls.count(FLASH) == 1


def test_sdpa_path_runs_on_fake_tensors():
    """The rule and the mask folding read metadata only, so tracing (fake tensors, as torch.compile
    does when it traces through the op) takes the SDPA path too, with no data-dependent branch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attnopt.kernels import exact as exact_module

    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 6, 8), torch.empty(2, 2, 9, 8), torch.empty(2, 2, 9, 5)
        mask, fill = torch.empty(2, 1, 6, 9), torch.empty(6, 9, dtype=torch.bool)
        assert exact_module._sdpa_computes(q, k, v, mask, fill, -math.inf, None, 0.0, 0.3)
        out = exact_module._sdpa_attention(q, k, v, mask, fill, scale=0.3, causal=True, zero_empty_rows=False)
        assert out.shape == (2, 4, 6, 5) and out.is_contiguous()


class _OpsSeen(TorchDispatchMode):
    """Records every op that reaches the dispatcher (attnopt's own included)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_plain_eager_inference_skips_the_dispatcher_and_computes_the_same():
    """Inference outside any mode, trace or transform runs the op's implementation directly
    (the dispatcher's route costs tens of microseconds a call); everything else still sees the op."""
    from attnopt.kernels import exact as exact_module

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 8, 16).unbind(0)
    mask = torch.rand(2, 1, 8, 8) > 0.3
    call = dict(scale=0.25)
    with torch.no_grad():
        direct = exact_attention(q, k, v, mask, **call)
        assert exact_module._plain_eager_inference((q, k, v, mask, None, None))
        through_op = torch.ops.attnopt.exact_attention(q, k, v, mask, None, None, **call)
    torch.testing.assert_close(direct, through_op, rtol=0, atol=0)
    torch.testing.assert_close(direct, exact_attention_reference(q, k, v, mask, **call), **TOLERANCE[torch.float32])

    # a dispatch mode (FlopCounterMode, attnopt's kernel counter, fake tensors) sees the op
    with torch.no_grad(), _OpsSeen() as recorder:
        exact_attention(q, k, v, mask, **call)
    assert "attnopt.exact_attention" in recorder.seen
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        exact_attention(q, k, v, mask, **call)
    assert counter.get_total_flops() == 2 * 2 * 4 * 8 * 8 * (16 + 16)

    # a profiler's trace names the op
    with torch.no_grad(), torch.profiler.profile() as profile:
        exact_attention(q, k, v, mask, **call)
    assert any(event.name == "attnopt::exact_attention" for event in profile.events())

    # a gradient needed: through the op and its autograd formula
    leaf = q.clone().requires_grad_()
    assert not exact_module._plain_eager_inference((leaf, k, v, mask, None, None))
    exact_attention(leaf, k, v, mask, **call).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    with torch.no_grad():
        assert exact_module._plain_eager_inference((leaf, k, v, mask, None, None))

    # under vmap, and in a torch.compile trace, the op (with its batching and fake rules) runs
    batched = torch.vmap(lambda q1: exact_attention(q1, k, v, mask, **call))(q.unsqueeze(0).expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(batched[1], direct, **TOLERANCE[torch.float32])
    compiled = torch.compile(lambda q1: exact_attention(q1, k, v, mask, **call), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q), direct, **TOLERANCE[torch.float32])
