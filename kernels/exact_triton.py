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
) -> torch.Tensor:
    """softmax(where(fill_mask, fill_value, q kᵀ·scale) + mask) v through the generated
    FlashAttention-2 style kernel; a float mask must be added in at most fp32 (see mask_sum_dtype)."""
    tiles = attention_tiles(q.device, q.shape[3])
    mask_kind, broadcast, mask_tensor, mask_strides = mask_layout(mask)
    _, fill_broadcast, fill_tensor, fill_strides = mask_layout(fill_mask)
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
    )
    kernel = kernel_module("exact_attention", config).exact_attention_kernel
    batch, n_heads, n_queries = q.shape[:3]
    out = q.new_empty(batch, n_heads, n_queries, v.shape[3])
    fill_args = [] if fill_mask is None else [fill_tensor, *fill_strides, fill_value]
    grid = (triton.cdiv(n_queries, tiles.block_m), batch * n_heads)
    torch.library.wrap_triton(kernel)[grid](
        *softmax_kernel_args(q, k.to(q.dtype), v.to(q.dtype), out, mask_tensor, mask_strides, scale), *fill_args,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
