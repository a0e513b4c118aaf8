"""attnopt: find every softmax attention in a PyTorch model, audit it, and rewrite it.

    report = attnopt.inspect(model, args=(x,))
    fast = attnopt.rewrite(model, "exact", args=(x,))
    attnopt.report_of(fast)
    torch.compile(model, backend="attnopt")
"""

import torch._dynamo

from .api import AttnoptModule, attnopt_backend, inspect, report_of, rewrite
from .backend import AttnoptError
from .report import Decision, Report, Site

if "attnopt" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(attnopt_backend, name="attnopt")

__all__ = ["AttnoptError", "AttnoptModule", "Decision", "Report", "Site", "inspect", "report_of", "rewrite"]
