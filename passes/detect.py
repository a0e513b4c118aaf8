"""Find softmax attention in a canonicalized FX graph, by meaning.

Five kinds of site, each found by its own matcher (the table `MATCHERS`):

* `matmul` — softmax(Q Kᵀ·scale + masks) V written with matmuls (passes/match_matmul.py; masks,
  fills, constants and causality in passes/mask_terms.py; the ops a walk passes in passes/walk.py);
* `sdpa`, `mha`, `encoder-layer` — `F.scaled_dot_product_attention`, `F.multi_head_attention_forward`
  and the fused `torch._transformer_encoder_layer_fwd` (passes/match_library.py);
* `flex` — the `flex_attention` higher-order op, its score_mod / mask_mod read (passes/match_flex.py).

Every match is a `SiteMatch` (passes/site_ir.py); those that are not safely rewritable carry a
one-sentence `reason` instead of being dropped silently — an in-place write to anything the site
reads, while it reads it, is one such reason (checked here for every kind of site).

`detect(gm, subgraphs=True)` also searches the bodies of torch.utils.checkpoint regions (the
higher-order ops in fx_utils.SEARCHED_HIGHER_ORDER_OPS); `unsearched_regions` lists the others
but flex attention, which is a site (fx_utils.MATCHED_HIGHER_ORDER_OPS).
"""

from __future__ import annotations

from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx

from .fx_utils import (
    MATCHED_HIGHER_ORDER_OPS,
    alias_root,
    body_module,
    higher_order_name,
    mutated_by,
    op_name,
    searched_body,
    to_networkx,
)
from .match_flex import match_flex
from .match_library import match_encoder_layer, match_mha, match_sdpa
from .match_matmul import match_softmax, match_unstable_softmax
from .site_ir import SiteMatch

MATCHERS: dict[str, Callable[[fx.Node, nx.DiGraph], SiteMatch | None]] = {
    "softmax": match_softmax,
    "scaled_dot_product_attention": match_sdpa,
    "multi_head_attention_forward": match_mha,
    "eager_multi_head_attention_forward": match_mha,
    "_transformer_encoder_layer_fwd": match_encoder_layer,
    "flex_attention": match_flex,
}
"""Op name → the matcher that reads a site from such a call (canonicalize spells every softmax
`torch.softmax`; an unstable hand-written one is marked on its division)."""


def _matcher(node: fx.Node) -> Callable[[fx.Node, nx.DiGraph], SiteMatch | None] | None:
    if "attnopt_unstable_softmax" in node.meta:
        return match_unstable_softmax
    if op_name(node) == "softmax" and node.target is not torch.softmax:
        return None  # only the canonical torch.softmax
    return MATCHERS.get(op_name(node))


def detect(gm: fx.GraphModule, subgraphs: bool = False) -> list[SiteMatch]:
    """Every attention site of `gm`, in graph order.

    With `subgraphs`, the bodies of searched higher-order ops (torch.utils.checkpoint; see
    fx_utils.SEARCHED_HIGHER_ORDER_OPS) are searched too, where they are called: their sites'
    nodes belong to the body's graph (`match.output.graph.owning_module` is the body), which
    `rewrite` and `rewritten_copy` handle. Canonicalize `gm` first: that gives every call its
    own body, with metadata.
    """
    dag = to_networkx(gm.graph)
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    writes = [(position[node], node, alias_root(mutated_by(node))) for node in gm.graph.nodes
              if mutated_by(node) is not None]
    matches = []
    for node in gm.graph.nodes:
        body = searched_body(node) if subgraphs else None
        if body is not None:
            matches += detect(body_module(gm, body), subgraphs=True)
            continue
        matcher = _matcher(node)
        match = matcher(node, dag) if matcher is not None else None
        if match is not None:
            if match.reason is None and writes:
                match.reason = _write_inside(match, writes, position)
            matches.append(match)
    return matches

def _write_inside(match: SiteMatch, writes: list[tuple[int, fx.Node, Any]], position: dict[fx.Node, int]) -> str | None:
    """Why the site cannot be replaced by one call at its output: an in-place write, between the
    site's first read and its output, to a tensor the site reads (or to one of its views)."""
    nodes = [n for n in [*match.inputs, *match.internal] if isinstance(n, fx.Node)]
    first = min(position[n] for n in match.internal) if match.internal else position[match.output]
    read = {alias_root(n) for n in nodes}
    for where, write, root in writes:
        if first <= where <= position[match.output] and (root in read or write in match.internal):
            return (f"`{write.name}` writes in place to `{getattr(root, 'name', root)}` while the attention "
                    "reads it, so one call at the output would read another value.")
    return None

def unsearched_regions(gm: fx.GraphModule, subgraphs: bool = False) -> list[fx.Node]:
    """The higher-order-op calls whose subgraphs `detect(gm, subgraphs)` does not search (all of
    them without `subgraphs`), including those nested in searched bodies, in graph order. Flex
    attention is not among them: it is a site, rewritten or refused with its reason."""
    regions = []
    for node in gm.graph.nodes:
        body = searched_body(node) if subgraphs else None
        if body is not None:
            regions += unsearched_regions(body_module(gm, body), subgraphs=True)
        elif higher_order_name(node) not in (None, *MATCHED_HIGHER_ORDER_OPS):
            regions.append(node)
    return regions
