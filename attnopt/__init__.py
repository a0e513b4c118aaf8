"""attnopt: find every softmax attention in a PyTorch model, audit it, and rewrite it.

    report = attnopt.inspect(model, args=(x,))
    exact = attnopt.rewrite(model, "exact", args=(x,))
    fast = attnopt.optimize(model, budget=0.5, args=(x,))      # or attnopt.Budget(max_error=0.05)
    fast = attnopt.optimize(model, 0.5, args=(x,), calibration=batches)   # fitted on your data
    attnopt.report_of(fast)
    attnopt.save(fast, "plans.pt"); fast = attnopt.load(model, "plans.pt")   # no re-planning
    torch.compile(model, backend="attnopt", options={"budget": 0.5})
"""

import torch._dynamo

from .api import AttnoptModule, attnopt_backend, inspect, optimize, report_of, rewrite
from .backend import AttnoptError
from .calibration import Calibration
from .persist import load, save
from .planner import Budget, BudgetError, BudgetNotMetWarning
from .report import Decision, GraphPlan, Report, Site
from .variants import (
    AgentConfig,
    ClusteredConfig,
    ExactConfig,
    HybridConfig,
    LinearConfig,
    MediatorConfig,
    MediatorSchedule,
    mediator_count,
    mediator_timestep,
)

if "attnopt" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(attnopt_backend, name="attnopt")

__all__ = [
    "AgentConfig",
    "AttnoptError",
    "AttnoptModule",
    "Budget",
    "BudgetError",
    "Calibration",
    "ClusteredConfig",
    "BudgetNotMetWarning",
    "Decision",
    "ExactConfig",
    "GraphPlan",
    "HybridConfig",
    "LinearConfig",
    "MediatorConfig",
    "MediatorSchedule",
    "Report",
    "Site",
    "inspect",
    "load",
    "mediator_count",
    "mediator_timestep",
    "optimize",
    "report_of",
    "rewrite",
    "save",
]
