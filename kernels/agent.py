"""The `attnopt::agent_attention` op: agent attention, and mediator attention with learned agents.

Stage 1: the n agents attend over the M keys (agent_v = softmax(agents kᵀ·scale + mask) v);
stage 2: the N queries attend over the agents (softmax(q agentsᵀ·agent_scale + agent_bias) agent_v).
CPU tensors run `agent_reference` (one fused SDPA call per stage); CUDA tensors (or forced CPU
ones under TRITON_INTERPRET=1) run two generated Triton kernels, the agent bias entering stage 2
as an additive mask over the agents. Backward is autograd through the reference, twice
differentiable (see autograd_reference). The op takes agent_bias as its sixth positional
argument (torch.library allows no keyword-only tensors); the Python wrapper keeps it keyword-only.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import config
from .agent_reference import agent_attention_reference
from .autograd_reference import reference_gradients
from .shapes import check_mask, check_qkv


def _check_agent_inputs(q, k, v, agents, mask, agent_bias) -> None:
    check_qkv(q, k, v)
    batch, n_heads, _, head_dim = q.shape
    if agents.dim() != 4 or agents.shape[0] not in (1, batch) or agents.shape[1::2] != (n_heads, head_dim):
        raise ValueError(
            f"agents must be (B or 1, H, n, d) = ({batch} or 1, {n_heads}, n, {head_dim}); got {tuple(agents.shape)}"
        )
    check_mask(mask, (batch, n_heads, 1, k.shape[2]))
    if agent_bias is not None:
        if not agent_bias.dtype.is_floating_point:
            raise TypeError(f"agent_bias must be floating, got {agent_bias.dtype}")
        check_mask(agent_bias, (batch, n_heads, agents.shape[2]))


@torch.library.triton_op("attnopt::agent_attention", mutates_args=())
def _agent_attention_op(
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
    _check_agent_inputs(q, k, v, agents, mask, agent_bias)
    options = dict(scale=scale, agent_scale=agent_scale)
    if not config.use_triton(q):
        # contiguous, as the fake impl promises (CPU SDPA follows its inputs' layout)
        return agent_attention_reference(q, k, v, agents, mask, agent_bias, **options).contiguous()
    from .agent_triton import agent_attention_triton

    return agent_attention_triton(q, k, v, agents, mask, agent_bias, **options)


@_agent_attention_op.register_fake
def _agent_attention_fake(q, k, v, agents, mask=None, agent_bias=None, *, scale, agent_scale):
    _check_agent_inputs(q, k, v, agents, mask, agent_bias)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.options = keyword_only_inputs


def _backward(ctx, grad_output):
    return reference_gradients(
        agent_attention_reference,
        ctx.saved_tensors,
        ctx.needs_input_grad[:6],
        grad_output,
        **ctx.options,
    )


_agent_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.attnopt.agent_attention)
def _agent_attention_flops(q_shape, k_shape, v_shape, agents_shape, *args, out_shape=None, **kwargs) -> int:
    """2·B·H·n·M·(d+e) for stage 1 plus 2·B·H·N·n·(d+e) for stage 2 (the agent bias is not counted)."""
    batch, n_heads, n_queries, head_dim = q_shape
    n_agents, per_token = agents_shape[2], head_dim + v_shape[3]
    return 2 * batch * n_heads * n_agents * (k_shape[2] + n_queries) * per_token


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    agent_scale: float,
    agent_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Agent (or mediator) attention through n agent tokens.

    q (B, H, N, d); k (B, Hkv, M, d); v (B, Hkv, M, e), GQA as in exact_attention; agents
    (B or 1, H, n, d). Stage 1: agent_v = softmax(agents kᵀ·scale + mask) v, (B, H, n, e);
    stage 2: out = softmax(q agentsᵀ·agent_scale + agent_bias) agent_v, (B, H, N, e) in q's
    dtype. mask: None, bool (True = may attend) or float, broadcastable to (B, H, 1, M) — a
    per-key mask used in stage 1 only. agent_bias: None or float, broadcastable to (B, H, n) —
    a logit offset per agent, added in stage 2 only (e.g. −agent_scale·‖a‖²/2 for distance
    weighting, log(cluster size) for size weighting). An agent whose keys are all masked gives
    NaN, as torch.softmax does. Half inputs are computed in fp32.
    """
    return torch.ops.attnopt.agent_attention(
        q, k, v, agents, mask, agent_bias, scale=scale, agent_scale=agent_scale
    )
