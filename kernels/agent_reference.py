"""Plain-PyTorch agent attention (also mediator attention): the oracle and the CPU path.

Two softmax attentions through n agent tokens: the agents read the keys and values, then the
queries read the agents. Cost n·M + N·n instead of N·M.
"""

from __future__ import annotations

import torch

from .exact_reference import softmax_attention_fp32


def agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    agent_scale: float,
) -> torch.Tensor:
    """softmax(q agentsᵀ·agent_scale) · softmax(agents kᵀ·scale + mask) v, fp32 inside."""
    agent_values = softmax_attention_fp32(agents, k, v, mask, scale=scale)
    out = softmax_attention_fp32(q, agents, agent_values, scale=agent_scale)
    return out.to(q.dtype)
