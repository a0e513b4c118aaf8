"""Plain-PyTorch agent attention (also mediator attention): the CPU path and the kernels' reference.

Two softmax attentions through n agent tokens: the agents read the keys and values, then the
queries read the agents. Cost n·M + N·n instead of N·M. Each stage is one call of torch's
scaled_dot_product_attention with an explicit scale (on CPU a fused flash kernel: the n×M and
N×n weights are never stored, and the scale and the mask or agent bias are applied inside it),
so a stage costs its two matmuls and one softmax. tests/kernels/test_references.py holds this
function to the dense N×M product of the two stages' softmax weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .exact_reference import accumulation_dtype


def agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    mask: torch.Tensor | None = None,
    agent_bias: torch.Tensor | None = None,
    *,
    scale: float,
    agent_scale: float,
) -> torch.Tensor:
    """softmax(q agentsᵀ·agent_scale + agent_bias) · softmax(agents kᵀ·scale + mask) v, fp32 inside.

    agent_bias: None or float, broadcastable to (B, H, n): one logit offset per agent in stage 2.
    An agent whose keys are all masked gets NaN values, as torch.softmax gives (so do the
    queries that read it); SDPA itself would give 0 there.
    """
    out_dtype, dtype = q.dtype, accumulation_dtype(q.dtype)
    batch, n_heads = q.shape[:2]
    n_kv_heads, head_dim = k.shape[1], k.shape[3]
    agents = agents.to(dtype).expand(batch, -1, -1, -1)  # the fused kernels want one batch size
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    stage1_mask = None if mask is None else _as_4d(mask if mask.dtype == torch.bool else mask.to(dtype))
    if n_kv_heads != n_heads and (stage1_mask is None or stage1_mask.shape[1] == 1):
        # grouped heads: the G agent sets of one kv head read it together, as G·n query rows
        group_agents = agents.reshape(batch, n_kv_heads, -1, head_dim)
        agent_values = F.scaled_dot_product_attention(group_agents, k, v, attn_mask=stage1_mask, scale=scale)
        agent_values = agent_values.reshape(batch, n_heads, agents.shape[2], v.shape[3])
    else:
        agent_values = F.scaled_dot_product_attention(
            agents, k, v, attn_mask=stage1_mask, scale=scale, enable_gqa=n_kv_heads != n_heads
        )
    if stage1_mask is not None:
        agent_values = _nan_where_no_key_is_visible(agent_values, stage1_mask)
    stage2_bias = None if agent_bias is None else _as_4d(agent_bias.to(dtype).unsqueeze(-2))
    out = F.scaled_dot_product_attention(q, agents, agent_values, attn_mask=stage2_bias, scale=agent_scale)
    return out.to(out_dtype)


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _nan_where_no_key_is_visible(agent_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NaN for the (batch, head) rows whose per-key mask (B|1, H|1, 1, M) hides every key."""
    hidden = ~mask if mask.dtype == torch.bool else mask == float("-inf")
    no_key = hidden.all(-1, keepdim=True)  # (B|1, H|1, 1, 1): the mask is the same for every agent
    return torch.where(no_key, float("nan"), agent_values)
