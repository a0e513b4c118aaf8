"""Launcher of the generated linear-attention kernels (forward only; backward uses the reference).

The state kernel reduces splits of the keys to partial sums; torch adds them up (non-causal) or
turns chunk sums into exclusive prefix sums (causal, one chunk per query tile); the output kernel
applies φ(q) to them.
"""

from __future__ import annotations

import torch
import triton

from .codegen import kernel_module
from .launch_config import dtype_name, linear_tiles
from .linear_template import LinearKernelConfig

SPLITS_PER_HEAD = 16
"""Non-causal key splits per (batch, kv head): parallelism for the state reduction."""


def _exclusive_prefix(chunk_sums: torch.Tensor) -> torch.Tensor:
    """Sums over the chunks before each chunk, along dim 0."""
    return torch.cat([torch.zeros_like(chunk_sums[:1]), chunk_sums.cumsum(0)[:-1]])


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str,
    normalization: str,
    power: float,
    causal: bool,
    key_mask: torch.Tensor | None,
    eps: float,
    feature_scale: float = 1.0,
) -> torch.Tensor:
    """Linear attention through the generated state and output kernels (see linear_template)."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys, value_dim = k.shape[1], k.shape[2], v.shape[3]
    tiles = linear_tiles(q.device, head_dim, value_dim)
    config = LinearKernelConfig(
        head_dim=head_dim,
        value_dim=value_dim,
        dtype=dtype_name(q.dtype),
        feature_map=feature_map,
        power=power,
        normalization=normalization,
        causal=causal,
        key_mask=key_mask is not None,
        block_m=tiles.block_m,
        block_n=tiles.block_n,
        feature_scale=float(feature_scale),
    )
    module = kernel_module("linear_attention", config)
    if causal:
        keys_per_split = tiles.block_m
    else:
        keys_per_split = triton.cdiv(triton.cdiv(n_keys, SPLITS_PER_HEAD), tiles.block_n) * tiles.block_n
    n_splits = triton.cdiv(n_keys, keys_per_split)
    state_rows = batch * n_kv_heads
    f32 = dict(device=q.device, dtype=torch.float32)
    sums = [
        torch.empty(n_splits, state_rows, head_dim, value_dim, **f32),
        torch.empty(n_splits, state_rows, head_dim, **f32),
        torch.empty(n_splits, state_rows, value_dim, **f32),
        torch.empty(n_splits, state_rows, **f32),
    ]
    mask = key_mask.view(torch.uint8) if key_mask is not None else q
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    k, v = k.to(q.dtype), v.to(q.dtype)
    torch.library.wrap_triton(module.linear_state_kernel)[(n_splits, state_rows)](
        k, v, mask, *sums, *k.stride(), *v.stride(), *mask_strides,
        n_kv_heads, n_keys, keys_per_split,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    sums = [_exclusive_prefix(part) if causal else part.sum(0, keepdim=True) for part in sums]
    out = q.new_empty(batch, n_heads, n_queries, value_dim)
    torch.library.wrap_triton(module.linear_output_kernel)[(triton.cdiv(n_queries, tiles.block_m), batch * n_heads)](
        q, k, v, mask, *sums, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        n_heads, n_heads // n_kv_heads, n_queries, state_rows, eps,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
