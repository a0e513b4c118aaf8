"""The `attnopt::linear_attention` op: kernelised linear attention, sum or InLine normalised.

The op takes key_mask as its fourth positional argument (torch.library allows no keyword-only
tensors); the Python wrapper keeps it keyword-only. CPU tensors run `linear_reference` in state
form (a d×e state per head, chunked when causal: O(N·d·e), no N×M matrix); CUDA tensors (or
forced CPU ones under TRITON_INTERPRET=1) run generated Triton kernels that build the same state
Σφ(k)ᵀv — chunked and prefix-summed when causal — with the feature map (and feature_scale)
fused in. Backward is autograd through the state-form reference, twice differentiable (see
autograd_reference).
`linear_reference.linear_attention_quadratic` (the N×M form) is the oracle the tests hold both
paths to.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from . import config
from .autograd_reference import reference_gradients
from .linear_reference import FEATURE_MAPS, NORMALIZATIONS, linear_attention_reference
from .shapes import check_qkv


def _check_linear_inputs(q, k, v, feature_map, normalization, causal, key_mask, feature_scale=1.0) -> None:
    check_qkv(q, k, v)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {FEATURE_MAPS}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal linear attention needs N == M; got N={q.shape[2]}, M={k.shape[2]}")
    if not math.isfinite(feature_scale):
        raise ValueError(f"feature_scale must be finite; got {feature_scale!r}")
    expected = (q.shape[0], k.shape[2])
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != expected):
        raise ValueError(f"key_mask must be bool (B, M) = {expected}; got {key_mask.dtype} {tuple(key_mask.shape)}")


@torch.library.triton_op("attnopt::linear_attention", mutates_args=())
def _linear_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    feature_map: str = "elu1",
    normalization: str = "sum",
    power: float = 3.0,
    causal: bool = False,
    eps: float = 1e-6,
    feature_scale: float = 1.0,
) -> torch.Tensor:
    _check_linear_inputs(q, k, v, feature_map, normalization, causal, key_mask, feature_scale)
    options = dict(
        feature_map=feature_map, normalization=normalization, power=power, causal=causal, key_mask=key_mask, eps=eps,
        feature_scale=feature_scale,
    )
    if not config.use_triton(q):
        return linear_attention_reference(q, k, v, **options)
    from .linear_triton import linear_attention_triton

    return linear_attention_triton(q, k, v, **options)


@_linear_attention_op.register_fake
def _linear_attention_fake(
    q, k, v, key_mask=None, *, feature_map="elu1", normalization="sum", power=3.0, causal=False, eps=1e-6,
    feature_scale=1.0,
):
    _check_linear_inputs(q, k, v, feature_map, normalization, causal, key_mask, feature_scale)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.options = keyword_only_inputs


def _backward(ctx, grad_output):
    q, k, v, key_mask = ctx.saved_tensors
    return reference_gradients(
        linear_attention_reference,
        (q, k, v),
        ctx.needs_input_grad[:3],
        grad_output,
        key_mask=key_mask,
        **ctx.options,
    ) + (None,)


_linear_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.attnopt.linear_attention)
def _linear_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, normalization="sum", **kwargs) -> int:
    """2·B·H·(M·d·e + N·d·e) for state and output, plus the normaliser.

    sum: z = Σφ(k) and φ(q)·z, 2·B·H·(M·d + N·d). inline: the same two plus Σv and the
    mean-correction of each output row, 2·B·H·(M·d + N·d + M·e + N·e).
    """
    batch, n_heads, n_queries, head_dim = q_shape
    n_keys, value_dim = k_shape[2], v_shape[3]
    terms = (n_keys + n_queries) * head_dim * value_dim + (n_keys + n_queries) * head_dim
    if normalization == "inline":
        terms += (n_keys + n_queries) * value_dim
    return 2 * batch * n_heads * terms


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    normalization: str = "sum",
    power: float = 3.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    feature_scale: float = 1.0,
) -> torch.Tensor:
    """Linear attention φ(q)(φ(k)ᵀv) with a feature map φ and a normalisation.

    q (B, H, N, d); k (B, Hkv, M, d); v (B, Hkv, M, e), GQA as in exact_attention.
    feature_map: "elu1" (elu(x)+1), "relu", "focused" (FLatten: y = relu(x),
    φ = y**power · ‖y‖/‖y**power‖ over the head dim, 0 where y = 0), "identity" (already mapped).
    normalization "sum": out_i = φ(q_i)·S / (φ(q_i)·z + eps), S = Σ_j φ(k_j)ᵀ v_j, z = Σ_j φ(k_j).
    normalization "inline" (InLine, injective): weights φ(q_i)·φ(k_j) − mean_s φ(q_i)·φ(k_s)
    + 1/M_valid, out_i = Σ_j w_ij v_j (rows sum to 1); a row with no visible key gives 0.
    causal: sums over j <= i only (N == M). key_mask: None or bool (B, M), True = valid key;
    invalid keys are left out of every sum. Half inputs accumulate in fp32; output in q's dtype.
    feature_scale s: φ is applied to s·q and s·k (for "identity" too: the features are scaled),
    inside the op, so no scaled copy of q or k is made (s = √scale puts a softmax scale there).
    """
    return torch.ops.attnopt.linear_attention(
        q, k, v, key_mask, feature_map=feature_map, normalization=normalization, power=power,
        causal=causal, eps=eps, feature_scale=feature_scale,
    )
