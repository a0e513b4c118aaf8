"""The `attnopt::exact_attention` op: softmax attention, same function as the model's own.

CPU tensors run `exact_reference`; CUDA tensors (or CPU ones with config.force_triton under
TRITON_INTERPRET=1) run the generated FlashAttention-2 style Triton kernel. Backward is autograd
through the reference (see autograd_reference). FlopCounterMode counts 2·B·H·N·M·(d+e).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import config
from .autograd_reference import reference_gradients
from .exact_reference import exact_attention_reference
from .shapes import check_mask, check_qkv


@torch.library.triton_op("attnopt::exact_attention", mutates_args=())
def _exact_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    check_qkv(q, k, v)
    check_mask(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    if dropout_p > 0 or not config.use_triton(q):
        return exact_attention_reference(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p)
    from .exact_triton import exact_attention_triton  # launchers load on first use, not at import

    return exact_attention_triton(q, k, v, mask, scale=scale, causal=causal)


@_exact_attention_op.register_fake
def _exact_attention_fake(q, k, v, mask=None, *, scale, causal=False, dropout_p=0.0):
    check_qkv(q, k, v)
    check_mask(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
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
    q, k, v, mask = ctx.saved_tensors
    return reference_gradients(
        exact_attention_reference,
        (q, k, v, mask),
        ctx.needs_input_grad[:4],
        grad_output,
        scale=ctx.options["scale"],
        causal=ctx.options["causal"],
    )


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
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v, the same function a model's attention computes.

    q (B, H, N, d); k (B, Hkv, M, d); v (B, Hkv, M, e) with H % Hkv == 0 (query head h reads kv
    head h // (H // Hkv)). mask: None, bool (True = may attend) or float (added to the scores),
    broadcastable to (B, H, N, M). causal: key j visible to query i iff j <= i (top-left).
    Returns (B, H, N, e) in q's dtype; half inputs are computed in fp32. Rows with every key
    masked come out NaN, as torch.softmax gives. dropout_p > 0 applies
    F.dropout(probs, dropout_p, training=True), consuming the RNG exactly like a hand-written
    dropout(softmax(...)) of the same shape; that path always runs (and differentiates) the
    reference, never the Triton kernel.
    """
    if dropout_p > 0:
        check_qkv(q, k, v)
        return exact_attention_reference(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p)
    return torch.ops.attnopt.exact_attention(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p)
