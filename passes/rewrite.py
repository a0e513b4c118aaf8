"""Replace each chosen site's nodes by one call of its `SiteCall` module.

The site's output node is redirected to a `call_module` on a new submodule
`attnopt_site_<id>` of the GraphModule; the old scores/softmax/matmul nodes become dead and are
removed. Nothing else in the graph changes.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .detect import SiteMatch
from .fx_utils import copy_meta


def rewrite(gm: fx.GraphModule, replacements: list[tuple[SiteMatch, nn.Module, int]]) -> fx.GraphModule:
    """Apply `(match, site_call, site_id)` replacements to `gm` in place and return it."""
    graph = gm.graph
    for match, site_call, site_id in replacements:
        name = f"attnopt_site_{site_id}"
        gm.add_submodule(name, site_call)
        with graph.inserting_before(match.output):
            call = graph.call_module(name, tuple(match.inputs))
        copy_meta(match.anchor, call)
        if "val" in match.output.meta:
            call.meta["val"] = match.output.meta["val"]
        match.output.replace_all_uses_with(call)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm
