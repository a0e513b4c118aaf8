"""Variants of attention that a site can be rewritten into: exact, agent, linear, mediator.

Each variant is a frozen config dataclass registered with two functions (registry.py):

    reason = refusal(AgentConfig(), site_info)          # None, or why it cannot stand in
    module = build_site_module(AgentConfig(), site_info, example=(q, k, v, mask))
    out = module(q, k, v, mask=mask, scale=s)           # canonical layout, (B, H, N, e)
    relative_error(module, q, k, v, mask, s)            # vs exact attention, for the planner

Mediator sites read their count from `mediator_count(n)` or, through their schedule, from
`mediator_timestep(t)` (context managers the model wrapper sets around a forward).
"""

from .agent import AgentAttention, AgentConfig, AgentLayout
from .exact import ExactAttention, ExactConfig
from .linear import LearnedFeatureMap, LinearAttention, LinearConfig
from .masks import mask_kind_of
from .mediator import MediatorAttention, MediatorConfig, MediatorSchedule, mediator_count, mediator_timestep
from .registry import (
    VariantHandler,
    build_site_module,
    config_for,
    handler_for,
    output_error,
    refusal,
    register_variant,
    relative_error,
)
from .site import SiteInfo, TokenGrid, infer_grid

__all__ = [
    "AgentAttention",
    "AgentConfig",
    "AgentLayout",
    "ExactAttention",
    "ExactConfig",
    "LearnedFeatureMap",
    "LinearAttention",
    "LinearConfig",
    "MediatorAttention",
    "MediatorConfig",
    "MediatorSchedule",
    "SiteInfo",
    "TokenGrid",
    "VariantHandler",
    "build_site_module",
    "config_for",
    "handler_for",
    "infer_grid",
    "mask_kind_of",
    "mediator_count",
    "mediator_timestep",
    "output_error",
    "refusal",
    "register_variant",
    "relative_error",
]
