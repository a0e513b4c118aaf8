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

A softmax no matcher reads is still attention when its scores come from a product of two
activations and its weights go into a product with values, through ops that only move, slice,
reassemble, scale or mask them (walk.FLOW_OPS: Longformer's sliding-window chunks): a site
refused with the ops attnopt does not follow (`unmatched_attention`). Attention cut by a graph
break (`GraphBreaks`: the break that ends the graph, and the one before it) is a site refused
with dynamo's reason: weights that leave the graph for the code after its break, or scores that
come in as an input of a graph compiled after a break. A softmax of projected logits (a
router's, a classifier's) reaches no such product and stays no site.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx

from .fx_utils import (
    MATCHED_HIGHER_ORDER_OPS,
    alias_root,
    arg,
    body_module,
    higher_order_name,
    lifted_module_state,
    mutated_by,
    normalize_dim,
    op_name,
    searched_body,
    shape_of,
    to_networkx,
)
from .match_flex import match_flex
from .match_library import match_encoder_layer, match_mha, match_sdpa
from .match_matmul import match_softmax, match_unstable_softmax
from .site_ir import SiteMatch, partial_shape, refuse
from .walk import FLOW_DEPTH, TRANSPARENT, flow_down, flow_up

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


@dataclasses.dataclass(frozen=True)
class GraphBreaks:
    """The dynamo graph breaks at the edges of one captured graph, each as "<dynamo's reason> at
    <file>:<line> in <function>" (attnopt.backend reads them from dynamo), or None: `before`, the
    break after which the graph was compiled (its inputs were computed before it); `after`, the
    break that ends it (its outputs go on to the code after it)."""

    before: str | None = None
    after: str | None = None


def detect(gm: fx.GraphModule, subgraphs: bool = False, breaks: GraphBreaks | None = None) -> list[SiteMatch]:
    """Every attention site of `gm`, in graph order.

    With `subgraphs`, the bodies of searched higher-order ops (torch.utils.checkpoint; see
    fx_utils.SEARCHED_HIGHER_ORDER_OPS) are searched too, where they are called: their sites'
    nodes belong to the body's graph (`match.output.graph.owning_module` is the body), which
    `rewrite` and `rewritten_copy` handle. Canonicalize `gm` first: that gives every call its
    own body, with metadata. `breaks`: the graph breaks around `gm`, which attention cut by one
    is reported with (none inside a body: its inputs are the region's operands).
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
        if node.target is torch.softmax:
            match = _split_or_unmatched(node, match, breaks or GraphBreaks())
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


def _split_or_unmatched(softmax: fx.Node, match: SiteMatch | None, breaks: GraphBreaks) -> SiteMatch | None:
    """The site at a canonical softmax: the matcher's, with the graph break as its reason where it
    is refused because its weights leave the graph at a break (they reach the graph's output and
    no product); for a softmax no matcher read, `unmatched_attention`'s."""
    if match is None:
        return unmatched_attention(softmax, breaks)
    if match.reason is not None and breaks.after is not None and match.output is softmax:
        products, leaves, _ = flow_down(softmax)
        scores, _, _ = flow_up(softmax.args[0])
        if leaves and not products and any(_of_activations(p) for p in scores):
            return refuse(match, _split_after(breaks.after))
    return match


def unmatched_attention(softmax: fx.Node, breaks: GraphBreaks = GraphBreaks()) -> SiteMatch | None:
    """A refused site for a softmax over the last dim that no matcher read but that is attention:

    * its scores come from a product of two activations (`_of_activations`) and its weights go
      into one, with values, through walk.FLOW_OPS: attention assembled in a way attnopt does
      not model (Longformer's and LED's sliding-window chunks: scores diagonals written into a
      fresh tensor, weights padded and re-chunked before the value product);
    * cut by a graph break (`breaks`): scores from such a product whose weights leave the graph
      at the break that ends it, or weights into such a product whose scores are an input of a
      graph compiled after a break.

    None for anything else: a softmax of projected logits (a router, a classifier) reaches no
    product of activations, and a softmax of an input of a graph no break precedes (scores the
    caller passed) is not known to be attention."""
    shape = shape_of(softmax)
    if shape is None or len(shape) < 2 or normalize_dim(arg(softmax, 1, "dim"), len(shape)) != len(shape) - 1:
        return None
    products, inputs, passed_up = flow_up(softmax.args[0])
    scores = next((p for p in products if _of_activations(p)), None)
    targets, leaves, passed_down = flow_down(softmax)
    value = next((p for p, carrier in targets if _weights_operand(p, carrier) and _of_activations(p)), None)
    if scores is not None and value is not None:
        reason = (f"the scores come from `{scores.name}` through {_ops(passed_up)} and the weights reach "
                  f"`{value.name}` through {_ops(passed_down)}: softmax attention assembled in a way attnopt does "
                  "not model (sliding-window chunks, say), so no attention call can replace it.")
    elif scores is not None and leaves and breaks.after is not None:
        reason = _split_after(breaks.after)
    elif scores is None and value is not None and breaks.before is not None and any(
            not _model_state(node) for node in inputs):
        reason = (f"attention split by a graph break ({breaks.before}): its scores come into this graph as an "
                  f"input (`{next(n for n in inputs if not _model_state(n)).name}`), computed before the break, "
                  "so its score product and its softmax are in different graphs.")
    else:
        return None
    anchor = scores or value
    if scores is not None and value is not None:
        # the softmax's leading dims are the assembly's (Longformer's: batch, queries, heads): only
        # its last one, the keys each query weighs, means what it says
        shown = {"M": shape[-1]}
    elif scores is not None:
        shown = partial_shape(*_product_operands(scores), None)
    else:
        shown = {"N": shape[-2], "M": shape[-1]}
        values = [a for a in _product_operands(value) if shape_of(a) is not None and a is not value.args[0]]
        if values and len(shape_of(values[-1])) == len(shape):
            shown["e"] = shape_of(values[-1])[-1]
    match = SiteMatch(kind="matmul", anchor=softmax, output=softmax,
                      form=anchor.meta.get("attnopt_form") or op_name(anchor) or "matmul",
                      inputs=[], internal=[], recipe=None, shape=shown)
    return refuse(match, reason)


def _product_operands(product: fx.Node) -> list[fx.Node]:
    """The tensor operands of a matmul or an einsum, in order."""
    items = product.args[1:] if op_name(product) == "einsum" else product.args
    return [a for item in items for a in (item if isinstance(item, (list, tuple)) else (item,)) if isinstance(a, fx.Node)]


def _split_after(where: str) -> str:
    return (f"attention split by a graph break ({where}): its weights leave this graph at the break before any "
            "product with values, so its softmax and its value product are in different graphs.")


def _ops(passed: list[fx.Node]) -> str:
    """The ops a flow walk passed that are not plain views or casts, as `a`, `b`, … (at most four)."""
    names = list(dict.fromkeys(op_name(n) for n in passed if TRANSPARENT.get(op_name(n)) is None))
    if not names:
        return "views"
    shown = ", ".join(f"`{name}`" for name in names[:4])
    return shown + (", …" if len(names) > 4 else "")


def _weights_operand(product: fx.Node, carrier: fx.Node) -> bool:
    """Whether `carrier` is the weights' side of `product`: a matmul's left operand (weights @ V),
    or an operand of an einsum."""
    if product.target is torch.matmul:
        return product.args[0] is carrier
    return True


def _of_activations(product: fx.Node) -> bool:
    """Whether neither operand of `product` is a model's parameter or buffer (through views and
    casts): a product of two activations, as QKᵀ and weights·V are, not a projection."""
    operands = _product_operands(product)
    return len(operands) == 2 and not any(_model_state(_through_views(a)) for a in operands)


def _through_views(node: fx.Node) -> fx.Node:
    """What `node` is a view, cast or slice of (the tensor an operand's values live in)."""
    for _ in range(FLOW_DEPTH):
        name = op_name(node)
        if not (TRANSPARENT.get(name) is not None or name in ("getitem", "expand", "unsqueeze", "squeeze", "as_strided")):
            break
        if not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


def _model_state(node: fx.Node) -> bool:
    """A parameter or buffer: a `get_attr`, or a graph input dynamo lifted from a module's
    `_parameters` / `_buffers`."""
    if node.op == "get_attr" or lifted_module_state(node):
        return True
    return node.op == "placeholder" and ("_parameters_" in node.name or "_buffers_" in node.name)


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
