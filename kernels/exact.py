"""The `attnopt::exact_attention` op: softmax attention, same function as the model's own.

CPU tensors run `exact_reference`; CUDA tensors (or CPU ones with config.force_triton under
TRITON_INTERPRET=1) run the generated FlashAttention-2 style Triton kernel. Backward is autograd
through the reference (see autograd_reference), twice differentiable. The op takes fill_mask as
its fifth positional argument (torch.library allows no keyword-only tensors), and fill_value
None for -inf (op schemas hold no infinite defaults); the Python wrapper keeps fill_mask
keyword-only and fill_value -inf. FlopCounterMode counts 2·B·H·N·M·(d+e).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from . import config
from .autograd_reference import reference_gradients
from .exact_reference import exact_attention_reference, mask_sum_dtype
from .shapes import check_mask, check_qkv


def _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype) -> None:
    check_qkv(q, k, v)
    scores_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    check_mask(mask, scores_shape)
    if fill_mask is not None:
        if fill_mask.dtype != torch.bool:
            raise TypeError(f"fill_mask must be bool, got {fill_mask.dtype}")
        check_mask(fill_mask, scores_shape)
    if score_dtype is not None and not score_dtype.is_floating_point:
        raise TypeError(f"score_dtype must be floating, got {score_dtype}")


def _kernel_computes(q, mask, score_dtype, dropout_p) -> bool:
    """Whether the Triton kernel gives the reference's result: not with dropout (the reference
    keeps torch's RNG stream), nor for a float mask added in fp64 (the kernel's softmax is fp32)."""
    return dropout_p == 0 and mask_sum_dtype(q.dtype, mask, score_dtype) != torch.float64 and config.use_triton(q)


def _fill_value(value: float | None) -> float:
    """The op's fill_value: None stands for -inf."""
    return -math.inf if value is None else value


@torch.library.triton_op("attnopt::exact_attention", mutates_args=())
def _exact_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    fill_mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
    fill_value: float | None = None,
    score_dtype: torch.dtype | None = None,
    zero_empty_rows: bool = False,
) -> torch.Tensor:
    _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype)
    masking = dict(
        fill_mask=fill_mask, fill_value=_fill_value(fill_value), score_dtype=score_dtype, zero_empty_rows=zero_empty_rows
    )
    if not _kernel_computes(q, mask, score_dtype, dropout_p):
        return exact_attention_reference(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, **masking)
    from .exact_triton import exact_attention_triton  # launchers load on first use, not at import

    return exact_attention_triton(q, k, v, mask, scale=scale, causal=causal, **masking)


@_exact_attention_op.register_fake
def _exact_attention_fake(
    q, k, v, mask=None, fill_mask=None, *, scale, causal=False, dropout_p=0.0, fill_value=None,
    score_dtype=None, zero_empty_rows=False,
):
    _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.options = keyword_only_inputs


def _backward(ctx, grad_output):
    if ctx.options["dropout_p"] > 0:
        raise RuntimeError(
            "attnopt::exact_attention cannot differentiate through dropout (its mask is not kept); "
            "call attnopt.kernels.exact_attention, which differentiates the reference directly"
        )
    q, k, v, mask, fill_mask = ctx.saved_tensors
    options = {**ctx.options, "fill_value": _fill_value(ctx.options["fill_value"])}
    return reference_gradients(
        exact_attention_reference, (q, k, v, mask), ctx.needs_input_grad[:4], grad_output, fill_mask=fill_mask, **options
    ) + (None,)


_exact_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.attnopt.exact_attention)
def _exact_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add of q kᵀ and probs·v; masks and causality are not discounted."""
    batch, n_heads, n_queries, head_dim = q_shape
    return 2 * batch * n_heads * n_queries * k_shape[2] * (head_dim + v_shape[3])


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
    fill_mask: torch.Tensor | None = None,
    fill_value: float = -math.inf,
    score_dtype: torch.dtype | None = None,
    zero_empty_rows: bool = False,
) -> torch.Tensor:
    """softmax(where(fill_mask, fill_value, q kᵀ·scale) + mask) v, the function a model's attention computes.

    q (B, H, N, d); k (B, Hkv, M, d); v (B, Hkv, M, e) with H % Hkv == 0 (query head h reads kv
    head h // (H // Hkv)). mask: None, bool (True = may attend) or float of any dtype (added to
    the scores), broadcastable to (B, H, N, M). causal: key j visible to query i iff j <= i
    (top-left). Returns (B, H, N, e) in q's dtype; half inputs are computed in fp32.
    fill_mask (bool, broadcastable to (B, H, N, M)): where True the scaled score is replaced by
    fill_value before the mask applies, like `scores.masked_fill(fill_mask, fill_value)`; the value
    is used as given in the (at least fp32) scores, so pass what the original's scores held.
    score_dtype: the dtype the original held its scores in (default q's); a float mask is added in
    torch.promote_types(score_dtype, mask.dtype) with the scores rounded to it first, as
    `scores + mask` rounds in torch (an fp16 `finfo.min` mask swamps the scores), and the softmax
    runs in that dtype or fp32, whichever is wider.
    Rows where every score is -inf give NaN, as torch.softmax does, or 0 with zero_empty_rows
    (SDPA's and nn.MultiheadAttention's rule; gradients there are 0). dropout_p > 0 applies
    F.dropout(probs, dropout_p, training=True), consuming the RNG exactly like a hand-written
    dropout(softmax(...)) of the same shape; that path always runs (and differentiates) the
    reference, never the Triton kernel.
    """
    masking = dict(fill_value=fill_value, score_dtype=score_dtype, zero_empty_rows=zero_empty_rows)
    if dropout_p > 0:
        _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype)
        return exact_attention_reference(
            q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, fill_mask=fill_mask, **masking
        )
    return torch.ops.attnopt.exact_attention(
        q, k, v, mask, fill_mask, scale=scale, causal=causal, dropout_p=dropout_p, **masking
    )
