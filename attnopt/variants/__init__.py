"""Variants of attention that a site can be rewritten into: exact, agent, linear, mediator, hybrid, clustered.

Each variant is a frozen config dataclass with one `VariantSpec` registered from its own file
(registry.py): refusal, build, cost formula, default candidates and the params reports show.

    spec = spec_for(AgentConfig())                      # or spec_named("agent")
    reason = refusal(AgentConfig(), site_info)          # None, or why it cannot stand in
    module = build_site_module(AgentConfig(), site_info, example=(q, k, v, mask))
    out = module(q, k, v, mask=mask, scale=s)           # canonical layout, (B, H, N, e)
    cost = spec.formula(AgentConfig(), site_info)       # a costmodel.CostFormula
    relative_error(module, q, k, v, mask, s)            # vs exact attention, for the planner

Mediator sites read their count from `mediator_count(n)` or, through their schedule, from
`mediator_timestep(t)` (context managers the model wrapper sets around a forward).
"""

# registration order is the order candidates are tried and listed: exact first
from .exact import ExactAttention, ExactConfig  # isort: skip
from .agent import AgentAttention, AgentConfig, AgentLayout  # isort: skip
from .linear import LearnedFeatureMap, LinearAttention, LinearConfig  # isort: skip
from .mediator import (MediatorAttention, MediatorConfig, MediatorSchedule, mediator_count,  # isort: skip
                       mediator_timestep)
from .hybrid import HybridAttention, HybridConfig  # isort: skip
from .clustered import ClusteredAttention, ClusteredConfig  # isort: skip
from .masks import mask_kind_of
from .registry import (
    VariantSpec,
    build_site_module,
    config_for,
    output_error,
    refusal,
    register_variant,
    relative_error,
    spec_for,
    spec_named,
    specs,
)
from .site import SiteInfo, TokenGrid, infer_grid

__all__ = [
    "AgentAttention",
    "AgentConfig",
    "AgentLayout",
    "ClusteredAttention",
    "ClusteredConfig",
    "ExactAttention",
    "ExactConfig",
    "HybridAttention",
    "HybridConfig",
    "LearnedFeatureMap",
    "LinearAttention",
    "LinearConfig",
    "MediatorAttention",
    "MediatorConfig",
    "MediatorSchedule",
    "SiteInfo",
    "TokenGrid",
    "VariantSpec",
    "build_site_module",
    "config_for",
    "infer_grid",
    "mask_kind_of",
    "mediator_count",
    "mediator_timestep",
    "output_error",
    "refusal",
    "register_variant",
    "relative_error",
    "spec_for",
    "spec_named",
    "specs",
]
