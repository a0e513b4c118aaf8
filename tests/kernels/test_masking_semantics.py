"""The exact op's masking against the torch spellings it stands for, forward and backward, in the
dtypes the original computes in: fills, float masks (same and wider dtype), score_dtype, and rows
where every key is blocked (torch.softmax's NaN, a finite fill's uniform row, SDPA's 0)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnopt.kernels import exact_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the literal spelling rounds every intermediate to the half dtype; the op keeps fp32 inside
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
WIDER = {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _qkv(dtype, kv_heads=2, n_queries=6, n_keys=7):
    generator = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
        for shape in ((2, 4, n_queries, 8), (2, kv_heads, n_keys, 8), (2, kv_heads, n_keys, 5))
    )


def _literal(q, k, v, mask=None, *, scale, causal=False, fill_mask=None, fill_value=-math.inf, score_dtype=None):
    """softmax(where(fill, f, q kᵀ·s) + mask) v spelled as a model writes it, in its own dtypes."""
    group = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    if score_dtype is not None:
        scores = scores.to(score_dtype)
    if fill_mask is not None:
        scores = scores.masked_fill(fill_mask, fill_value)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    return (torch.softmax(scores, dim=-1).to(v.dtype) @ v.repeat_interleave(group, 1)).to(q.dtype)


def _assert_same_function(actual_fn, expected_fn, inputs, dtype, equal_nan=False):
    """Outputs and the gradients of every input that requires them agree."""
    actual, expected = actual_fn(*inputs), expected_fn(*inputs)
    assert actual.dtype == expected.dtype == dtype
    torch.testing.assert_close(actual, expected, equal_nan=equal_nan, **TOLERANCE[dtype])
    weights = torch.randn(actual.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad((actual * weights).sum(), leaves, allow_unused=True)
    wanted = torch.autograd.grad((expected * weights).sum(), leaves, allow_unused=True)
    for grad, want in zip(grads, wanted):
        torch.testing.assert_close(grad, want, equal_nan=equal_nan, **TOLERANCE[dtype])
    return actual


def _blocking(dtype, mask_kind, mask_value):
    """A fill mask that fills query row 1 entirely, and a mask that blocks query row 2 entirely
    (and a few keys elsewhere): bool, or float in q's dtype or a wider one."""
    generator = torch.Generator().manual_seed(2)
    fill = torch.rand(2, 1, 6, 7, generator=generator) > 0.7
    fill[:, :, 1] = True
    blocked = torch.rand(1, 4, 6, 7, generator=generator) > 0.75
    blocked[..., 2, :] = True
    blocked[..., 0] = False
    blocked[..., 2, 0] = True
    if mask_kind == "none":
        return fill, None
    if mask_kind == "bool":
        return fill, ~blocked
    mask_dtype = dtype if mask_kind == "float" else WIDER[dtype]
    value = torch.finfo(mask_dtype).min if mask_value == "min" else mask_value
    mask = torch.randn(1, 4, 6, 7, generator=generator).to(mask_dtype).masked_fill(blocked, value)
    return fill, mask.requires_grad_()


# fp16 scores cannot hold -1e9 (masked_fill raises in the original): that pair is no case
DTYPE_AND_FILL = [(dtype, fill) for dtype in DTYPES for fill in (-1e4, -1e9, "min", -math.inf)
                  if not (dtype == torch.float16 and fill == -1e9)]


@pytest.mark.parametrize("dtype, fill_value", DTYPE_AND_FILL)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "wider float"])
@pytest.mark.parametrize("causal", [False, True])
def test_fills_and_masks_match_the_literal_torch_spelling(dtype, fill_value, mask_kind, causal):
    fill_value = torch.finfo(dtype).min if fill_value == "min" else fill_value
    fill, mask = _blocking(dtype, mask_kind, "min")
    options = dict(scale=0.35, causal=causal, fill_mask=fill, fill_value=fill_value)
    q, k, v = _qkv(dtype, kv_heads=2 if causal else 1)
    out = _assert_same_function(
        lambda *x: exact_attention(*x, **options), lambda *x: _literal(*x, **options), (q, k, v, mask), dtype,
        equal_nan=True,  # fully blocked rows: NaN in both (torch.softmax)
    )
    # the filled row: a finite fill averages the values uniformly (causal: over its visible keys)
    if math.isfinite(fill_value) and mask_kind == "none":
        visible = 2 if causal else 7
        uniform = v.float().repeat_interleave(4 // v.shape[1], 1)[:, :, :visible].mean(-2)
        torch.testing.assert_close(out[:, :, 1].float(), uniform, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_value", ["min", -1e4, -1e300])
def test_float_masks_are_added_in_torchs_promoted_dtype(dtype, mask_value):
    """A padding row blocked by a huge finite value: in the mask's own dtype or a wider one, the
    raw scores are swamped (rounded away) and the row is (nearly) uniform, as in the original."""
    for mask_kind in ("float", "wider float"):
        mask_dtype = dtype if mask_kind == "float" else WIDER[dtype]
        if mask_value == -1e300 and mask_dtype != torch.float64:
            continue
        _, mask = _blocking(dtype, mask_kind, mask_value)
        q, k, v = _qkv(dtype)
        out = _assert_same_function(
            lambda *x: exact_attention(*x, scale=0.35), lambda *x: _literal(*x, scale=0.35), (q, k, v, mask), dtype
        )
        assert out.isfinite().all()


@pytest.mark.parametrize("dtype, mask_value", [(torch.float16, "min"), (torch.bfloat16, -1e4)])
def test_score_dtype_is_the_dtype_the_original_held_its_scores_in(dtype, mask_value):
    """A half padding mask (fp16 finfo.min, bf16 -1e4) on half scores rounds the row to (nearly)
    uniform; the same mask on scores the original had cast to fp32 keeps the raw scores apart:
    score_dtype tells the two originals apart."""
    _, mask = _blocking(dtype, "float", mask_value)
    q, k, v = _qkv(dtype)
    half_row = _assert_same_function(
        lambda *x: exact_attention(*x, scale=0.35), lambda *x: _literal(*x, scale=0.35), (q, k, v, mask), dtype
    )[:, :, 2]
    as_fp32 = dict(scale=0.35, score_dtype=torch.float32)
    fp32_row = _assert_same_function(
        lambda *x: exact_attention(*x, **as_fp32), lambda *x: _literal(*x, **as_fp32), (q, k, v, mask), dtype
    )[:, :, 2]
    assert (half_row.float() - fp32_row.float()).abs().max() > 0.1


def _sdpa_mask(mask, fill, causal, n_queries, n_keys):
    """The one attn_mask SDPA takes for a mask, a -inf fill mask and causality together."""
    blocked = torch.zeros(n_queries, n_keys, dtype=torch.bool)
    if fill is not None:
        blocked = blocked | fill
    if causal:
        blocked = blocked | ~torch.ones(n_queries, n_keys, dtype=torch.bool).tril()
    if mask is None or mask.dtype == torch.bool:
        return ~blocked if mask is None else mask & ~blocked
    return mask.masked_fill(blocked, -math.inf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("with_fill", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_empty_rows_matches_sdpa(dtype, mask_kind, with_fill, causal):
    """Rows with no visible key give 0 and finite gradients, as F.scaled_dot_product_attention
    (torch 2.13, CPU: 0 in fp32, fp16 and bf16). SDPA adds a float mask in fp32, hence score_dtype."""
    fill, mask = _blocking(dtype, mask_kind, -math.inf)
    fill = fill if with_fill else None
    q, k, v = _qkv(dtype, kv_heads=1)
    options = dict(scale=0.35, causal=causal, fill_mask=fill, score_dtype=torch.float32)

    def sdpa(q, k, v, mask):
        attn_mask = _sdpa_mask(mask, fill, causal, 6, 7)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=0.35, enable_gqa=True)

    out = _assert_same_function(lambda *x: exact_attention(*x, zero_empty_rows=True, **options), sdpa, (q, k, v, mask), dtype)
    assert (out[:, :, 2] == 0).all()
    assert not with_fill or (out[:, :, 1] == 0).all()


def test_zero_empty_rows_keeps_every_gradient_finite_to_second_order():
    q, k, v = (x.double().detach().requires_grad_() for x in _qkv(torch.float32, kv_heads=1))
    _, mask = _blocking(torch.float64, "float", -math.inf)
    out = exact_attention(q, k, v, mask, scale=0.35, zero_empty_rows=True)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v, mask), create_graph=True)
    assert all(grad.isfinite().all() for grad in grads)
    assert (grads[0][:, :, 2] == 0).all()  # no key visible: the query gets no gradient
    second = torch.autograd.grad(sum(grad.pow(2).sum() for grad in grads), (q, k, v, mask))
    assert all(grad.isfinite().all() for grad in second)


def test_a_finite_fill_row_is_not_empty_under_zero_empty_rows():
    """A row whose every score is replaced by a finite fill has visible keys: uniform, not 0."""
    q, k, v = _qkv(torch.float32)
    fill, _ = _blocking(torch.float32, "none", None)
    options = dict(scale=0.35, fill_mask=fill, fill_value=-1e9)
    _assert_same_function(
        lambda *x: exact_attention(*x, zero_empty_rows=True, **options), lambda *x: _literal(*x, **options), (q, k, v), torch.float32
    )
    out = exact_attention(q, k, v, zero_empty_rows=True, **options)
    torch.testing.assert_close(out[:, :, 1], v.repeat_interleave(2, 1).mean(-2))
    grad_q, grad_k = torch.autograd.grad(out[:, :, 1].sum(), (q, k))
    assert (grad_q[:, :, 1] == 0).all() and (grad_k == 0).all()
