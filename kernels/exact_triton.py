"""Launcher of the generated exact-attention kernel (forward only; backward uses the reference)."""

from __future__ import annotations

import torch
import triton

from .codegen import kernel_module
from .exact_reference import mask_sum_dtype
from .launch_config import attention_tiles, dtype_name, mask_layout
from .softmax_template import ExactKernelConfig


def softmax_kernel_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    mask: torch.Tensor | None,
    mask_strides: tuple[int, ...],
    scale: float,
) -> list[object]:
    """Arguments of a generated softmax-attention kernel: q (B, H, N, d) over k, v (B, Hkv, M, ·).

    out's last four dims are (B, H, N, e); a leading split dim of out is the caller's to pass.
    """
    n_heads, n_queries = q.shape[1], q.shape[2]
    return [
        q, k, v, out, mask if mask is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[-4:], *mask_strides,
        n_heads, n_heads // k.shape[1], n_queries, k.shape[2], scale,
    ]


def exact_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    causal: bool,
    fill_mask: torch.Tensor | None = None,
    fill_value: float = float("-inf"),
    score_dtype: torch.dtype | None = None,
    zero_empty_rows: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(where(fill_mask, fill_value, cap(q kᵀ·scale)) + mask) v through the generated
    FlashAttention-2 style kernel, with sinks (broadcastable to (B, H, N, 1), at most fp32: the
    kernel's softmax is fp32) in the normaliser; a float mask must be added in at most fp32 (see
    mask_sum_dtype). cap(s) = softcap·tanh(s / softcap), the identity for softcap None."""
    tiles = attention_tiles(q.device, q.shape[3])
    mask_kind, broadcast, mask_tensor, mask_strides = mask_layout(mask)
    _, fill_broadcast, fill_tensor, fill_strides = mask_layout(fill_mask)
    _, sinks_broadcast, sinks_tensor, sinks_strides = mask_layout(sinks)
    sum_dtype = mask_sum_dtype(q.dtype, mask, score_dtype)
    config = ExactKernelConfig(
        head_dim=q.shape[3],
        value_dim=v.shape[3],
        dtype=dtype_name(q.dtype),
        causal=causal,
        mask=mask_kind,
        mask_broadcast=broadcast,
        block_m=tiles.block_m,
        block_n=tiles.block_n,
        fill=fill_mask is not None,
        fill_broadcast=fill_broadcast,
        mask_sum_dtype="float32" if sum_dtype in (None, torch.float32) else dtype_name(sum_dtype),
        zero_empty_rows=zero_empty_rows,
        softcap=softcap is not None,
        sinks=sinks is not None,
        sinks_broadcast=sinks_broadcast if sinks is not None else (False, False, False, True),
    )
    kernel = kernel_module("exact_attention", config).exact_attention_kernel
    batch, n_heads, n_queries = q.shape[:3]
    out = q.new_empty(batch, n_heads, n_queries, v.shape[3])
    fill_args = [] if fill_mask is None else [fill_tensor, *fill_strides, fill_value]
    softcap_args = [] if softcap is None else [float(softcap)]
    sink_args = [] if sinks is None else [sinks_tensor, *sinks_strides[:3]]  # the last dim is 1
    grid = (triton.cdiv(n_queries, tiles.block_m), batch * n_heads)
    torch.library.wrap_triton(kernel)[grid](
        *softmax_kernel_args(q, k.to(q.dtype), v.to(q.dtype), out, mask_tensor, mask_strides, scale),
        *fill_args, *softcap_args, *sink_args,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
