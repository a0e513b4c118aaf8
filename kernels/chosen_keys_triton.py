"""Triton forward of `attnopt::chosen_keys_attention`: each query's softmax over its own t keys.

One program owns BLOCK_M queries of one (batch, head). It walks the t chosen keys in chunks of
BLOCK_T: loads the (BLOCK_M, BLOCK_T) key indices, gathers the key rows they name (a
(BLOCK_M, BLOCK_T, d) tile, addressed by index · row stride) and, where given, the bias of each
chosen key, scores them against the queries by an fp32 multiply-and-sum over d, and folds the
chunk into an online softmax (running max, running sum, fp32 accumulator) before gathering the
value rows the same way. The queries of a block read different keys, so there is no shared key
tile for tl.dot: the kernel is a gather bound by memory, t·(d + e) elements per query.

Scores stay in natural units (exp of the difference to the running max), as the generated softmax
kernels do when they add a float mask: a finite bias near the fp32 range (finfo.min) would
overflow to -inf if multiplied by log2(e) first. A row whose chosen keys are all -inf ends with a
running sum of 0 and an accumulator of 0, and is divided by 1 instead: exactly 0, as the reference
gives. Inputs fp32, fp16 or bf16 (q, k, v, bias each in its own dtype, all read into fp32), output
in q's dtype. Keys must lie in [0, M): the kernel reads what they address without a check.

Written as a plain @triton.jit kernel, not generated through codegen's templates: its only
specialisations (head dims, bias or none, tile sizes) are constexpr arguments, and the templates
are built around a contiguous key tile streamed into tl.dot with mask kinds, broadcasts and
causality spelled into the text — none of which a gathered-key loop has.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import Tiles


@triton.jit
def chosen_keys_attention_kernel(
    Q, K, V, Keys, Bias, Out,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_ve,
    stride_ib, stride_ih, stride_in, stride_it,
    stride_bb, stride_bh, stride_bm,
    stride_ob, stride_oh, stride_on, stride_oe,
    n_heads, n_queries, n_chosen, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, D_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """softmax over each query's chosen keys of q·k·scale + bias, times their values, for BLOCK_M
    queries of one (batch, head)."""
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D_PAD)
    offs_e = tl.arange(0, E_PAD)
    query_ok = offs_m < n_queries
    d_ok = offs_d < HEAD_DIM
    e_ok = offs_e < VALUE_DIM
    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=query_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(tl.float32) * scale
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    keys_base = Keys + batch * stride_ib + head * stride_ih + offs_m[:, None] * stride_in
    bias_base = Bias + batch * stride_bb + head * stride_bh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, E_PAD], tl.float32)
    for start in range(0, n_chosen, BLOCK_T):
        chosen_ok = query_ok[:, None] & (start + offs_t < n_chosen)[None, :]  # (BLOCK_M, BLOCK_T)
        index = tl.load(keys_base + (start + offs_t)[None, :] * stride_it, mask=chosen_ok, other=0)
        k = tl.load(
            k_base + index[:, :, None] * stride_km + offs_d[None, None, :] * stride_kd,
            mask=chosen_ok[:, :, None] & d_ok[None, None, :], other=0.0,
        )
        scores = tl.sum(q[:, None, :] * k.to(tl.float32), 2)
        if HAS_BIAS:
            scores += tl.load(bias_base + index * stride_bm, mask=chosen_ok, other=0.0).to(tl.float32)
        scores = tl.where(chosen_ok, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # rows with no visible key yet keep max -inf; shift by 0 so exp gives 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        probs = tl.exp(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v = tl.load(
            v_base + index[:, :, None] * stride_vm + offs_e[None, None, :] * stride_ve,
            mask=chosen_ok[:, :, None] & e_ok[None, None, :], other=0.0,
        )
        acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * v.to(tl.float32), 1)
        row_max = new_max
    # every chosen key masked: sum 0 and accumulator 0, so 0 (a NaN sum stays NaN)
    out = acc / tl.where(row_sum == 0, 1.0, row_sum)[:, None]
    tl.store(
        Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_e[None, :] * stride_oe,
        out.to(Out.dtype.element_ty),
        mask=query_ok[:, None] & e_ok[None, :],
    )


GATHER_ELEMENTS = 4096
"""Gathered elements per chunk on a GPU (BLOCK_M · BLOCK_T · padded head dim), up to twice that
for long rows of large heads. At 4 warps ptxas gives 40 to 167 registers per thread for sm_90
(fp32/fp16/bf16, head dims 32 to 256, t from 3 to 1000), spilling at most 8 bytes; not yet timed."""


def chosen_keys_tiles(device: torch.device, head_dim: int, value_dim: int, n_chosen: int) -> Tiles:
    """Queries per program (block_m) and chosen keys per chunk (block_n).

    On a GPU the chunk takes up to 64 of a row's keys and the program as many queries (at most 4)
    as the budget leaves: a query's q row and accumulator are replicated across the threads that
    split its chunk, so wide query blocks cost more registers than long chunks. Under the interpreter,
    small fixed tiles, so tiny tests still cover several query blocks and key chunks.
    """
    if device.type != "cuda":
        return Tiles(block_m=16, block_n=8, num_warps=4, num_stages=1)
    width = triton.next_power_of_2(max(head_dim, value_dim))
    block_t = min(64, triton.next_power_of_2(max(1, n_chosen)), max(1, 2 * GATHER_ELEMENTS // width))
    block_m = min(4, max(1, GATHER_ELEMENTS // (block_t * width)))
    return Tiles(block_m=block_m, block_n=block_t, num_warps=4, num_stages=2)


def chosen_keys_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                                 key_bias: torch.Tensor | None = None, *, scale: float) -> torch.Tensor:
    """out_i = softmax_{j ∈ keys_i}(q_i·k_j·scale + bias_j) · v_{keys_i} → (B, H, N, e) in q's dtype.

    Shapes as the op's (checked there): q (B, H, N, d), k (B, H, M, d), v (B, H, M, e), keys
    (B, H, N, t) int64 in [0, M), key_bias (B, H, 1, M) or None; any strides. t = 0 gives 0.
    """
    batch, n_heads, n_queries, head_dim = q.shape
    value_dim = v.shape[3]
    out = q.new_empty(batch, n_heads, n_queries, value_dim)
    if out.numel() == 0:
        return out
    tiles = chosen_keys_tiles(q.device, head_dim, value_dim, keys.shape[3])
    bias = q if key_bias is None else key_bias  # q: a placeholder pointer the kernel never reads
    bias_strides = (0, 0, 0) if key_bias is None else (bias.stride(0), bias.stride(1), bias.stride(3))
    grid = (triton.cdiv(n_queries, tiles.block_m), batch * n_heads)
    chosen_keys_attention_kernel[grid](
        q, k, v, keys, bias, out,
        *q.stride(), *k.stride(), *v.stride(), *keys.stride(), *bias_strides, *out.stride(),
        n_heads, n_queries, keys.shape[3], scale,
        HEAD_DIM=head_dim, VALUE_DIM=value_dim,
        D_PAD=triton.next_power_of_2(head_dim), E_PAD=triton.next_power_of_2(value_dim),
        BLOCK_M=tiles.block_m, BLOCK_T=tiles.block_n, HAS_BIAS=key_bias is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
