"""Launcher of the generated agent-attention kernels (forward only; backward uses the reference).

Stage 1 has only n agent rows per head against M keys, so its keys are split across programs
(enough to fill the GPU) and the partial results merged here by their running maxima. Stage 2
reads agent_v (fp32) with one tile covering every agent: a single pass per query block. The
stages cannot fuse further: every query needs all of agent_v, a reduction over all M keys.
"""

from __future__ import annotations

import torch
import triton

from .codegen import kernel_module
from .exact_triton import softmax_kernel_args
from .launch_config import attention_tiles, dtype_name, mask_layout
from .softmax_template import AgentKernelConfig, scores_in_natural_units
from .template_parts import block_width


def _keys_per_split(device: torch.device, n_programs: int, n_keys: int, block_n: int) -> int:
    """Keys per stage-1 program: about two programs per GPU multiprocessor; on CPU two splits."""
    n_tiles = triton.cdiv(n_keys, block_n)
    if device.type == "cuda":
        wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        n_splits = max(1, min(n_tiles, wanted // max(1, n_programs)))
    else:
        n_splits = min(n_tiles, 2)
    return triton.cdiv(n_tiles, n_splits) * block_n


def _merge_splits(acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, natural_units: bool) -> torch.Tensor:
    """Combine split-K partials (S, B, H, n, ·) into the softmax output; their maxima are in
    natural-log units or log2 units (see softmax_template.scores_in_natural_units)."""
    top = row_max.amax(0)
    top = torch.where(torch.isinf(top), 0.0, top)
    weight = (torch.exp if natural_units else torch.exp2)(row_max - top)
    # all keys masked: the total sum is 0 and the row becomes NaN, as torch.softmax gives
    return (weight.unsqueeze(-1) * acc).sum(0) / (weight * row_sum).sum(0).unsqueeze(-1)


def agent_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    mask: torch.Tensor | None,
    agent_bias: torch.Tensor | None = None,
    *,
    scale: float,
    agent_scale: float,
) -> torch.Tensor:
    """softmax(q agentsᵀ·agent_scale + agent_bias) · softmax(agents kᵀ·scale + mask) v via two Triton kernels."""
    batch, n_heads, n_queries, head_dim = q.shape
    n_agents, n_keys, value_dim = agents.shape[2], k.shape[2], v.shape[3]
    tiles = attention_tiles(q.device, head_dim)
    mask_kind, broadcast, mask_tensor, mask_strides = mask_layout(mask)
    # the bias is an additive mask of stage 2, one row (B|1, H|1, 1, n) shared by every query
    _, bias_broadcast, bias_tensor, bias_strides = mask_layout(None if agent_bias is None else agent_bias.unsqueeze(-2))
    config = AgentKernelConfig(
        head_dim=head_dim,
        value_dim=value_dim,
        agent_block=min(block_width(n_agents), 128),
        dtype=dtype_name(q.dtype),
        mask=mask_kind,
        mask_broadcast=broadcast,
        block_m=tiles.block_m,
        block_n=tiles.block_n,
        agent_bias=agent_bias is not None,
        bias_broadcast=bias_broadcast if agent_bias is not None else AgentKernelConfig.bias_broadcast,
    )
    module = kernel_module("agent_attention", config)
    agents = agents.to(q.dtype).expand(batch, -1, -1, -1)  # agents shared by the batch: stride 0

    agent_blocks = triton.cdiv(n_agents, config.agent_rows)
    keys_per_split = _keys_per_split(q.device, agent_blocks * batch * n_heads, n_keys, tiles.block_n)
    n_splits = triton.cdiv(n_keys, keys_per_split)
    partial = torch.empty(n_splits, batch, n_heads, n_agents, value_dim, device=q.device, dtype=torch.float32)
    row_max = torch.empty(n_splits, batch, n_heads, n_agents, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    torch.library.wrap_triton(module.agent_stage1_kernel)[(agent_blocks, batch * n_heads, n_splits)](
        *softmax_kernel_args(agents, k.to(q.dtype), v.to(q.dtype), partial, mask_tensor, mask_strides, scale),
        row_max, row_sum, partial.stride(0), keys_per_split,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    agent_values = _merge_splits(partial, row_max, row_sum, scores_in_natural_units(config.mask))

    out = q.new_empty(batch, n_heads, n_queries, value_dim)
    torch.library.wrap_triton(module.agent_stage2_kernel)[(triton.cdiv(n_queries, tiles.block_m), batch * n_heads)](
        *softmax_kernel_args(q, agents, agent_values, out, bias_tensor, bias_strides, agent_scale),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
