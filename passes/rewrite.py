"""Replace each chosen site's nodes by one call of its `SiteCall` module.

The site's output node is redirected to a `call_module` on a new submodule
`attnopt_site_<id>` of the GraphModule that owns the site's graph (the top-level module, or
the body of a higher-order op such as torch.utils.checkpoint); the old scores/softmax/matmul
nodes become dead and are removed. Nothing else in the graph changes.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch.fx as fx
from torch import nn

from .detect import SiteMatch
from .fx_utils import body_module, copy_meta, has_side_effects, searched_body


def rewrite(gm: fx.GraphModule, replacements: list[tuple[SiteMatch, nn.Module, int]]) -> fx.GraphModule:
    """Apply `(match, site_call, site_id)` replacements to `gm` in place and return it.

    A match found in a subgraph (`detect(gm, subgraphs=True)`) is rewritten inside the
    subgraph module that owns it."""
    touched: dict[int, fx.GraphModule] = {id(gm): gm}
    for match, site_call, site_id in replacements:
        owner = match.output.graph.owning_module or gm
        touched[id(owner)] = owner
        graph = owner.graph
        name = f"attnopt_site_{site_id}"
        owner.add_submodule(name, site_call)
        with graph.inserting_before(match.output):
            call = graph.call_module(name, tuple(match.inputs))
        copy_meta(match.anchor, call)
        if "val" in match.output.meta:
            call.meta["val"] = match.output.meta["val"]
        match.output.replace_all_uses_with(call)
    for owner in touched.values():
        owner.graph.eliminate_dead_code(is_impure_node=has_side_effects)
        owner.graph.lint()
        owner.recompile()
    return gm


def copy_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of `gm` whose graph, and the bodies of its searched higher-order ops (recursively),
    are copies too, with the map from every original node to its copy.

    Rewriting the copy leaves `gm` and its subgraph modules as they were. (A bare
    `fx.GraphModule(gm, deepcopy(gm.graph))` shares the subgraph modules with `gm`.)"""
    mapping: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    copied = graph.graph_copy(gm.graph, mapping, return_output_node=True)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    if copied is not None:
        value, old_output = copied
        new_output = graph.output(value, type_expr=getattr(old_output, "type", None))
        new_output.meta = copy.copy(old_output.meta)
        mapping[old_output] = new_output
    result = fx.GraphModule(gm, graph)
    copied_bodies = set()
    for node in gm.graph.nodes:
        body = searched_body(node)
        if body is None or body.target in copied_bodies:
            continue
        copied_bodies.add(body.target)
        inner, inner_mapping = copy_module(body_module(gm, body))
        mapping.update(inner_mapping)
        target = mapping[body].target
        parent, _, leaf = target.rpartition(".")
        holder = result.get_submodule(parent) if parent else result
        setattr(holder, leaf, inner)
    return result, mapping


def rewritten_copy(gm: fx.GraphModule, replacements: list[tuple[SiteMatch, nn.Module, int]]) -> fx.GraphModule:
    """`rewrite` applied to a copy of `gm` (`copy_module`): `gm` itself is left as it was.

    Matches are carried over node by node, so a match inside a subgraph lands in the copy of
    that subgraph (carrying by node name would confuse a body's `matmul` with the top level's)."""
    work, mapping = copy_module(gm)

    def carry(value: Any) -> Any:
        return mapping[value] if isinstance(value, fx.Node) else value

    moved = [(dataclasses.replace(match, anchor=carry(match.anchor), output=carry(match.output),
                                  inputs=[carry(i) for i in match.inputs], internal=[carry(n) for n in match.internal],
                                  mask_inputs=[carry(n) for n in match.mask_inputs],
                                  constants={carry(n): value for n, value in match.constants.items()}), call, site_id)
             for match, call, site_id in replacements]
    return rewrite(work, moved)
