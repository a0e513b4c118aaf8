"""Find softmax attention in a canonicalized FX graph, by meaning.

Three kinds of site:

* `matmul` — from every `torch.softmax` walk *up* through casts, scales (`mul`), masks (`add`,
  `masked_fill`, `where`) to the matmul producing the scores, whose operands are Q and Kᵀ; walk
  *down* through casts and dropout to the matmul with V. Q, Kᵀ and V are bound at the matmul
  operands themselves, so no permute or view between them and the user's tensors can be
  mis-bound. A `repeat_kv`-style head repetition of K and V is peeled off (GQA).
* `sdpa` — a call of `F.scaled_dot_product_attention`, with every argument.
* `mha` / `encoder-layer` — `F.multi_head_attention_forward` and the fused
  `torch._transformer_encoder_layer_fwd` that `nn.TransformerEncoderLayer` takes on its fast path.

Every softmax that is fed by a matmul becomes a `SiteMatch`; those that are not attention, or
not safely rewritable, carry a one-sentence `reason` instead of being dropped silently.

`detect(gm, subgraphs=True)` also searches the bodies of torch.utils.checkpoint regions (the
higher-order ops in fx_utils.SEARCHED_HIGHER_ORDER_OPS); `unsearched_regions` lists the others.
A mask is reported as causal only when it is built from constants with tril/triu and its value,
computed at detection time, blocks exactly the keys after each query.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from attnopt.numerics import MASKED_AT_OR_BELOW

from .eager_paths import eager_multi_head_attention_forward, mha_call_arguments
from .fx_utils import (
    alias_root, arg, body_module, dtype_of, higher_order_name, is_scalar, meta_value, module_path, mutated_by,
    normalize_dim, op_name, searched_body, shape_of, source_line, tensor_meta, to_networkx,
)

_PASSTHROUGH = {"to", "clone", "contiguous"}
_LAYOUT = {"transpose", "permute", "mT", "t", "swapaxes", "swapdims"}


@dataclasses.dataclass
class MaskTerm:
    """One additive contribution to the scores, as seen from the QK matmul.

    kind "add": `value` is added (to scores held in `score_dtype`). kind "fill" / "keep": where
    the bool `value` is True / False the score is replaced by `fill`, a constant. Scales applied
    to the scores *after* the term (python `factor` and tensor `factor_nodes`) also multiply it.
    """

    kind: str
    value: Any
    fill: Any = None
    factor: float = 1.0
    factor_nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    layout: tuple[int, ...] = ()  # leading dims of the scores where the term is applied
    score_dtype: torch.dtype | None = None  # dtype of the scores the value is added to


@dataclasses.dataclass
class SiteMatch:
    """A detected attention and everything needed to verify and replace it."""

    kind: str
    anchor: fx.Node
    output: fx.Node
    form: str
    inputs: list[Any]
    internal: list[fx.Node]
    recipe: dict[str, Any]
    shape: dict[str, int]
    causal: bool = False
    mask: str | None = None
    dropout: float = 0.0
    scale: float | None = None
    reason: str | None = None
    # Inputs that hold masks (bool, or float 0/-inf/large negative); verification draws such
    # values for them, whole rows masked included.
    mask_inputs: list[fx.Node] = dataclasses.field(default_factory=list)
    # Nodes the site reads whose value is a constant the recipe holds (fills): verification feeds
    # them their value; the rewrite does not read them.
    constants: dict[fx.Node, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module that owns the site: where its output is computed."""
        return module_path(self.output) or module_path(self.anchor)

    @property
    def source(self) -> str:
        return source_line(self.anchor)

    @property
    def dtype(self) -> str:
        dtype = dtype_of(self.output) or dtype_of(self.anchor) or (dtype_of(self.inputs[0]) if self.inputs else None)
        return str(dtype).replace("torch.", "") if dtype is not None else "?"


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
        name = op_name(node)
        body = searched_body(node) if subgraphs else None
        if body is not None:
            matches += detect(body_module(gm, body), subgraphs=True)
            continue
        if node.target is torch.softmax:
            match = _match_softmax(node, dag)
        elif "attnopt_unstable_softmax" in node.meta:
            match = _match_unstable_softmax(node)
        elif name == "scaled_dot_product_attention":
            match = _match_sdpa(node, dag)
        elif name in ("multi_head_attention_forward", "eager_multi_head_attention_forward"):
            match = _match_mha(node)
        elif name == "_transformer_encoder_layer_fwd":
            match = _match_encoder_layer(node)
        else:
            continue
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
    them without `subgraphs`), including those nested in searched bodies, in graph order."""
    regions = []
    for node in gm.graph.nodes:
        body = searched_body(node) if subgraphs else None
        if body is not None:
            regions += unsearched_regions(body_module(gm, body), subgraphs=True)
        elif higher_order_name(node) is not None:
            regions.append(node)
    return regions


# ---------------------------------------------------------------------------------------------
# matmul – softmax – matmul


def _refuse(match: SiteMatch, reason: str) -> SiteMatch:
    match.reason = reason
    return match


def _user_names(node: fx.Node) -> str:
    return ", ".join(sorted(user.name for user in node.users))


def _match_softmax(softmax: fx.Node, dag: nx.DiGraph) -> SiteMatch | None:
    up = _walk_up(softmax.args[0])
    if up is None:
        write = _write_on_scores(softmax.args[0])
        if write is not None:  # attention, seen through a write attnopt could not make out-of-place
            match = SiteMatch(kind="matmul", anchor=softmax, output=softmax, form="matmul", inputs=[], internal=[],
                              recipe={}, shape={})
            return _refuse(match, f"the scores are written in place by `{write.name}` on a tensor others can see "
                                  "(an input, a buffer or a shared view), so attnopt cannot follow them.")
        return None  # not fed by a matmul: a softmax, but not attention
    scores_matmul, chain, terms, scale, factor_nodes, up_reason = up
    q_operand, kt_operand = scores_matmul.args
    scores_shape = shape_of(scores_matmul)
    form = scores_matmul.meta.get("attnopt_form") or "matmul"
    if form == "matmul" and softmax.meta.get("attnopt_form") == "manual-softmax":
        form = "manual-softmax"
    match = SiteMatch(
        kind="matmul", anchor=softmax, output=softmax, form=form, inputs=[], internal=[],
        recipe={}, shape=_partial_shape(q_operand, kt_operand, None), scale=scale,
    )
    if up_reason:
        return _refuse(match, up_reason)
    fill_reason = _constant_fills(terms, dag, match.constants)
    if fill_reason:
        return _refuse(match, fill_reason)
    if scores_shape is None or len(scores_shape) < 2:
        return _refuse(match, "the scores have no known shape of rank ≥ 2.")
    softmax_rank = len(shape_of(softmax) or scores_shape)
    dim = normalize_dim(arg(softmax, 1, "dim"), softmax_rank)
    if dim != softmax_rank - 1:
        return _refuse(match, f"softmax is taken over dimension {dim}, not over the keys (the last dimension of QKᵀ).")

    down = [softmax]
    node = softmax
    dropout = 0.0
    while True:
        users = list(node.users)
        if len(users) != 1:
            where = "returned or used elsewhere" if users else "not used"
            return _refuse(match, f"the attention weights are {where} ({_user_names(node) or 'no users'}), so the site cannot be replaced.")
        user = users[0]
        name = op_name(user)
        if (name in _PASSTHROUGH or (name in ("view", "reshape") and _same_last_two(node, user))) and user.args[0] is node:
            down.append(user)
        elif user.target is torch.nn.functional.dropout and user.args[0] is node:
            dropout = float(arg(user, 1, "p", 0.5))
            down.append(user)
        else:
            break
        node = user
    if user.target is not torch.matmul or user.args[0] is not node:
        return _refuse(match, f"the attention weights feed `{user.name}`, not a matmul with values.")
    pv_matmul = user
    v_operand = pv_matmul.args[1]

    qk_lead, softmax_lead, pv_lead = shape_of(scores_matmul)[:-2], shape_of(softmax)[:-2], shape_of(pv_matmul)[:-2]
    regrouped = not (qk_lead == softmax_lead == pv_lead) or any(t.layout != softmax_lead for t in terms)
    _, k_peeled, kv_heads = _unwrap_key(kt_operand)
    _, v_peeled = _peel_repeat(v_operand)
    if k_peeled is not None and not regrouped and v_peeled is not None and kv_heads == shape_of(v_peeled)[1]:
        key_input, value_input, grouped = k_peeled, v_peeled, True
    else:
        key_input, value_input, grouped = kt_operand, v_operand, False
        kv_heads = None

    match.output = pv_matmul
    match.dropout = dropout
    match.internal = _between(dag, [q_operand, key_input, value_input, *_term_inputs(terms), *factor_nodes], pv_matmul)
    match.inputs = [q_operand, key_input, value_input]
    tensor_inputs = []
    term_specs = []
    for term in terms:
        spec = {"kind": term.kind, "factor": term.factor, "factor_nodes": [], "value": None, "fill": None,
                "layout": term.layout, "score_dtype": term.score_dtype}
        for key in ("value", "fill"):
            item = getattr(term, key)
            if isinstance(item, fx.Node):
                spec[key] = ("input", _index(tensor_inputs, item))
            else:
                spec[key] = ("const", item)
        spec["factor_nodes"] = [_index(tensor_inputs, f) for f in term.factor_nodes]
        term_specs.append(spec)
    scale_inputs = [_index(tensor_inputs, f) for f in factor_nodes]
    match.inputs += tensor_inputs
    heads = _head_split(q_operand, scores_shape, softmax_lead)
    match.recipe = {
        "key_transposed": not grouped, "grouped": grouped, "scale": scale,
        "scale_inputs": scale_inputs, "terms": term_specs, "dropout_p": dropout,
        "head_split": heads, "out_dtype": dtype_of(pv_matmul),
        "leads": (qk_lead, softmax_lead, pv_lead) if regrouped else None,
    }
    match.mask_inputs = [term.value for term in terms if isinstance(term.value, fx.Node)]
    match.shape = _partial_shape(q_operand, kt_operand, v_operand, heads=heads, kv_heads=kv_heads)
    match.mask, match.causal = _mask_kind(terms, scores_shape, dag)
    match.scale = scale * _upstream_factor(q_operand) * _upstream_factor(kt_operand)
    for node in chain:
        extra = [u for u in node.users if u not in match.internal and u is not pv_matmul]
        if extra:
            return _refuse(match, f"intermediate `{node.name}` is also used by {_user_names(node)}.")
    return match


def _match_unstable_softmax(node: fx.Node) -> SiteMatch | None:
    """`exp(s) / exp(s).sum(-1)` on attention scores, without subtracting the max: reported, not
    rewritten (it overflows and underflows where softmax does not, so it is another function)."""
    up = _walk_up(node.meta["attnopt_unstable_softmax"])
    if up is None:
        return None
    match = SiteMatch(kind="matmul", anchor=node, output=node, form="manual-softmax", inputs=[], internal=[],
                      recipe={}, shape=_partial_shape(*up[0].args, None))
    return _refuse(match, "its softmax is written as exp(s) / Σ exp(s) without subtracting the row maximum, which "
                          "overflows for scores above ~88 and gives 0/0 on rows of very negative scores; "
                          "softmax would change those results.")


def _write_on_scores(node: Any) -> fx.Node | None:
    """The in-place write on the way up from a softmax's input to a QK matmul, if any."""
    for _ in range(12):
        if not isinstance(node, fx.Node):
            return None
        if mutated_by(node) is not None:
            return node if _reaches_matmul(mutated_by(node)) or any(
                _reaches_matmul(a) for a in node.args if isinstance(a, fx.Node)) else None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _walk_up(node: Any):
    """From the softmax input up to the QK matmul.

    Returns (matmul, chain, mask terms, python scale, tensor scale nodes, reason) or None when
    no matmul produces the scores. `chain` lists the nodes from the matmul to the softmax input.
    """
    chain: list[fx.Node] = []
    steps: list[tuple[str, Any]] = []
    current = node
    while isinstance(current, fx.Node):
        name = op_name(current)
        chain.append(current)
        if current.target is torch.matmul:
            break
        if name in _PASSTHROUGH:
            current = current.args[0]
            continue
        if name in ("view", "reshape") and _same_last_two(current.args[0], current):
            steps.append(("layout", shape_of(current)[:-2]))
            current = current.args[0]
            continue
        if name == "mul" and len(current.args) == 2:
            path, factor = _split_operands(current)
            if path is None:
                return None
            steps.append(("scale", factor))
            current = path
            continue
        if name == "div" and len(current.args) == 2 and not current.kwargs:
            # per-head and scalar divisors were turned into products by canonicalize: what is
            # left divides by something else, which is reported, not passed over
            path, divisor = current.args
            if not isinstance(path, fx.Node) or shape_of(path) != shape_of(current) or not _reaches_matmul(path):
                return None
            steps.append(("divide", divisor))
            current = path
            continue
        if name == "add" and len(current.args) == 2 and not current.kwargs:
            path, other = _split_operands(current, allow_full=True)
            if path is None:
                return None
            steps.append(("add", (other, dtype_of(path))))
            current = path
            continue
        if name == "masked_fill":
            steps.append(("fill", (current.args[1], current.args[2], dtype_of(current))))
            current = current.args[0]
            continue
        if name == "where" and len(current.args) == 3:
            cond, a, b = current.args
            if _reaches_matmul(a):
                steps.append(("fill", (("not", cond), b, dtype_of(current))))
                current = a
            elif _reaches_matmul(b):
                steps.append(("fill", (cond, a, dtype_of(current))))
                current = b
            else:
                return None
            continue
        return None
    else:
        return None
    chain.reverse()
    scale, factor_nodes, terms = 1.0, [], []
    reason = None
    layout = shape_of(chain[0])[:-2]
    for kind, item in reversed(steps):  # from the matmul towards the softmax
        if kind == "layout":
            layout = item
            continue
        if kind == "scale":
            if isinstance(item, (int, float)):
                scale *= float(item)
                for term in terms:
                    term.factor *= float(item)
            elif _scales_per_head(item, shape_of(chain[-1])) and (
                    layout == shape_of(chain[0])[:-2] or _single_value(item)):
                # a one-element factor scales every score alike, whatever view the scores are in
                factor_nodes.append(item)
                for term in terms:
                    term.factor_nodes.append(item)
            else:
                reason = f"the scores are multiplied by `{item.name}`, which varies over queries or keys, so it is not a scale."
        elif kind == "divide":
            what = f"`{item.name}`" if isinstance(item, fx.Node) else repr(item)
            reason = f"the scores are divided by {what}, which is not a scale attnopt can fold into the query."
        elif kind == "add":
            terms.append(MaskTerm("add", item[0], layout=layout, score_dtype=item[1]))
        else:
            cond, fill, dtype = item
            if isinstance(cond, tuple):
                terms.append(MaskTerm("keep", cond[1], fill, layout=layout, score_dtype=dtype))
            else:
                terms.append(MaskTerm("fill", cond, fill, layout=layout, score_dtype=dtype))
    return chain[0], chain, terms, scale, factor_nodes, reason


def _constant_fills(terms: list[MaskTerm], dag: nx.DiGraph, constants: dict[fx.Node, torch.Tensor]) -> str | None:
    """Make every fill a Python number, or say why not: a fill held in a tensor is data (an
    input, a buffer, `q.mean()`) unless it is built from constants alone; it must be a mask
    value (≤ -1e4, or -inf); and one site fills with one value (scaled as the scores are)."""
    filled = set()
    for term in terms:
        if term.kind == "add":
            continue
        fill = term.fill
        if isinstance(fill, fx.Node):
            value = _constant_value(fill, dag)
            if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.is_complex():
                return (f"the scores are filled with `{fill.name}`, a value computed from the inputs or the "
                        "model's tensors, not a constant mask value.")
            flat = value.detach().double().flatten()
            if not bool((flat == flat[0]).all()):
                return f"the scores are filled with `{fill.name}`, whose values differ from entry to entry."
            constants[fill] = value
            fill = float(flat[0])
        if not isinstance(fill, (int, float)) or isinstance(fill, bool) or math.isnan(fill) or fill > MASKED_AT_OR_BELOW:
            return f"the scores are filled with {fill}, which is not a mask value (-inf or a large negative number)."
        term.fill = float(fill)
        if term.fill * term.factor > MASKED_AT_OR_BELOW:
            return f"the filled scores are scaled by {term.factor}, which makes the fill {term.fill * term.factor}, not a mask value."
        if term.factor_nodes:
            return ("the filled scores are then multiplied by a tensor, so the masked value is not a known "
                    "constant.")
        filled.add(term.fill * term.factor)
    if len(filled) > 1:
        return f"the scores are filled with several different values ({sorted(filled)}), which attnopt does not model."
    return None


def _same_last_two(a: Any, b: Any) -> bool:
    """A view that only regroups leading (batch/head) dims, keeping (queries, keys)."""
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) >= 2 and len(sb) >= 2 and sa[-2:] == sb[-2:]


def _split_operands(node: fx.Node, allow_full: bool = False) -> tuple[fx.Node | None, Any]:
    """(scores path, other operand) of a binary node on the scores path."""
    a, b = node.args
    candidates = [(a, b), (b, a)]
    for path, other in candidates:
        if isinstance(path, fx.Node) and shape_of(path) == shape_of(node) and _reaches_matmul(path):
            if not allow_full and not is_scalar(other) and not isinstance(other, fx.Node):
                continue
            return path, other
    return None, None


def _reaches_matmul(node: Any, depth: int = 12) -> bool:
    while isinstance(node, fx.Node) and depth > 0:
        if node.target is torch.matmul:
            return True
        name = op_name(node)
        if name in _PASSTHROUGH or name in ("masked_fill", "div") or (
                name in ("view", "reshape") and _same_last_two(node.args[0], node)):
            node = node.args[0]
        elif name in ("mul", "add") and len(node.args) == 2:
            return any(_reaches_matmul(a, depth - 1) for a in node.args
                       if isinstance(a, fx.Node) and shape_of(a) == shape_of(node))
        elif name == "where" and len(node.args) == 3:
            return any(_reaches_matmul(a, depth - 1) for a in node.args[1:] if isinstance(a, fx.Node))
        else:
            return False
        depth -= 1
    return False


def _scales_per_head(factor: Any, scores_shape: tuple[int, ...] | None) -> bool:
    """A tensor factor that is constant over queries and keys can be folded into Q."""
    shape = shape_of(factor)
    if shape is None or scores_shape is None:
        return False
    if len(shape) < 2:
        return len(shape) == 0 or shape == (1,)
    return shape[-1] == 1 and shape[-2] == 1 and len(shape) <= len(scores_shape)


def _single_value(factor: Any) -> bool:
    shape = shape_of(factor)
    return shape is not None and math.prod(shape) == 1


def _index(items: list, item: Any) -> int:
    for i, existing in enumerate(items):
        if existing is item:
            return i
    items.append(item)
    return len(items) - 1


def _term_inputs(terms: list[MaskTerm]) -> list[fx.Node]:
    nodes = []
    for term in terms:
        nodes += [x for x in (term.value, term.fill) if isinstance(x, fx.Node)]
        nodes += term.factor_nodes
    return nodes


def _between(dag: nx.DiGraph, inputs: list[Any], output: fx.Node) -> list[fx.Node]:
    """Nodes on a path from one of `inputs` to `output` that passes through no other input,
    in graph order. (A mask shared by every layer must not pull earlier layers in.)"""
    boundary = {n for n in inputs if isinstance(n, fx.Node)}
    cut = dag.subgraph(n for n in dag.nodes if n not in boundary)
    ancestors = nx.ancestors(cut, output) | {output}
    reached: set[fx.Node] = set()
    for node in boundary:
        for user in dag.successors(node):
            if user not in boundary:
                reached |= nx.descendants(cut, user) | {user}
    inside = ancestors & reached
    return [n for n in output.graph.nodes if n in inside]


def _unwrap_key(kt_operand: fx.Node) -> tuple[fx.Node, fx.Node | None, int | None]:
    """For Kᵀ = transpose(repeat(K)), return (Kᵀ, K before repetition, its head count)."""
    if op_name(kt_operand) not in _LAYOUT:
        return kt_operand, None, None
    shape = shape_of(kt_operand)
    inner = kt_operand.args[0]
    inner_shape = shape_of(inner)
    if shape is None or inner_shape is None or len(shape) != 4:
        return kt_operand, None, None
    if inner_shape[:2] != shape[:2] or inner_shape[2:] != (shape[3], shape[2]):
        return kt_operand, None, None
    _, peeled = _peel_repeat(inner)
    if peeled is None:
        return kt_operand, None, None
    return kt_operand, peeled, shape_of(peeled)[1]


def _peel_repeat(node: Any) -> tuple[Any, fx.Node | None]:
    """If `node` repeats the heads of a (B, Hkv, M, d) tensor, return that tensor."""
    shape = shape_of(node)
    if shape is None or len(shape) != 4:
        return node, None
    name = op_name(node)
    if name == "repeat_interleave":
        source = node.args[0]
        dim = arg(node, 2, "dim")
        source_shape = shape_of(source)
        if source_shape is not None and len(source_shape) == 4 and dim in (1, -3):
            if source_shape[0] == shape[0] and source_shape[2:] == shape[2:] and shape[1] % source_shape[1] == 0:
                return node, source
        return node, None
    if name in ("reshape", "view") or _flattens_dims_1_2(node):
        expanded = node.args[0]
        if op_name(expanded) != "expand":
            return node, None
        unsqueezed = expanded.args[0]
        expanded_shape = shape_of(expanded)
        source = _unsqueezed_at_2(unsqueezed)
        source_shape = shape_of(source)
        if source is None or expanded_shape is None or source_shape is None or len(expanded_shape) != 5:
            return node, None
        batch, kv_heads, repeats, length, dim = expanded_shape
        if source_shape == (batch, kv_heads, length, dim) and shape == (batch, kv_heads * repeats, length, dim):
            return node, source
    return node, None


def _flattens_dims_1_2(node: fx.Node) -> bool:
    """`x.flatten(1, 2)` / `torch.flatten(x, 1, 2)` of a 5-D x (negative dims allowed)."""
    if op_name(node) != "flatten" or not isinstance(node.args[0], fx.Node):
        return False
    source_shape = shape_of(node.args[0])
    if source_shape is None or len(source_shape) != 5:
        return False
    start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
    if not isinstance(start, int) or not isinstance(end, int):
        return False
    return normalize_dim(start, 5) == 1 and normalize_dim(end, 5) == 2


def _unsqueezed_at_2(node: Any) -> fx.Node | None:
    """x for `x.unsqueeze(2)` or `x[:, :, None]` / `x[:, :, None, :, :]`, else None."""
    name = op_name(node)
    if name == "unsqueeze" and arg(node, 1, "dim") in (2, -3):
        return node.args[0]
    if name == "getitem" and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if len(index) >= 3 and index[0] == full and index[1] == full and index[2] is None \
                and all(i == full or i is Ellipsis for i in index[3:]):
            return node.args[0]
    return None


def _head_split(q_operand: fx.Node, scores_shape: tuple[int, ...], softmax_lead: tuple[int, ...] = ()) -> tuple[int, int] | None:
    """(B, H) when 3-D scores come from a (B, H, N, d) tensor folded to (B·H, N, d)."""
    if len(softmax_lead) == 2:
        return softmax_lead
    if len(scores_shape) != 3:
        return None
    node = q_operand
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        shape = shape_of(node)
        if shape is not None and len(shape) == 4 and shape[0] * shape[1] == scores_shape[0]:
            return shape[0], shape[1]
        if op_name(node) in ("reshape", "view", "mul", "contiguous", "to", "clone", "flatten"):
            node = node.args[0]
        else:
            return None
    return None


def _partial_shape(q_operand: Any, kt_operand: Any, v_operand: Any, heads=None, kv_heads=None) -> dict[str, int]:
    q_shape = shape_of(q_operand) or ()
    kt_shape = shape_of(kt_operand) or ()
    v_shape = shape_of(v_operand) or ()
    lead = q_shape[:-2] if len(q_shape) >= 2 else ()
    if heads is not None:
        batch, head_count = heads
    elif len(lead) >= 2:
        batch, head_count = math.prod(lead[:-1]), lead[-1]
    elif len(lead) == 1:
        batch, head_count = lead[0], 1
    else:
        batch, head_count = 1, 1
    shape = {"B": batch, "H": head_count, "Hkv": kv_heads or head_count}
    if len(q_shape) >= 2:
        shape["N"], shape["d"] = q_shape[-2], q_shape[-1]
    if len(kt_shape) >= 2:
        shape["M"] = kt_shape[-1]
    if len(v_shape) >= 2:
        shape["e"] = v_shape[-1]
    return shape


def _upstream_factor(node: Any) -> float:
    """Python-number scale already applied to an operand (Q·s before QKᵀ), for the report."""
    factor = 1.0
    for _ in range(6):
        if not isinstance(node, fx.Node):
            break
        name = op_name(node)
        if name == "mul" and len(node.args) == 2:
            a, b = node.args
            number = a if isinstance(a, (int, float)) else b if isinstance(b, (int, float)) else None
            if number is None:
                break
            factor *= float(number)
            node = b if number is a else a
        elif name in _LAYOUT | _PASSTHROUGH | {"view", "reshape"}:
            node = node.args[0]
        else:
            break
    return factor


def _mask_kind(terms: list[MaskTerm], scores_shape: tuple[int, ...], dag: nx.DiGraph) -> tuple[str | None, bool]:
    """Name the mask for the report: key_padding (per key), causal, boolean or additive."""
    if not terms:
        return None, False
    per_key = True
    boolean = any(t.kind in ("fill", "keep") for t in terms)
    for term in terms:
        shape = _unexpanded_shape(term.value) or ()
        padded = (1,) * (len(scores_shape) - len(shape)) + tuple(shape)
        if len(padded) >= 2 and padded[-2] != 1:
            per_key = False
    if per_key:
        return "key_padding", False
    if _is_causal(terms, scores_shape, dag):
        return "causal", True
    return ("boolean" if boolean else "additive"), False


def _unexpanded_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a mask before `expand` broadcast it (an expanded per-key mask is per key)."""
    for _ in range(4):
        if not isinstance(node, fx.Node) or op_name(node) != "expand":
            break
        node = node.args[0]
    return shape_of(node)


# A mask is named causal only when it is built from constants (through tril/triu) and its value,
# computed here, blocks exactly the keys after each query: structure alone is not enough (a bool
# tril filled with -inf is all True, and adding it shifts every score by one).
_MASK_LIMIT = 1 << 25  # elements of any tensor computed to name a mask
_NOT_CONSTANT = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "dropout",
                 "normal", "randperm", "multinomial", "uniform_", "normal_", "bernoulli_", "empty", "empty_like",
                 "new_empty", "empty_strided"}


def _is_causal(terms: list[MaskTerm], scores_shape: tuple[int, ...], dag: nx.DiGraph) -> bool:
    """True when the terms together block exactly the keys j > i for query i (and nothing else)."""
    n, m = scores_shape[-2:]
    blocked = None
    for term in terms:
        if term.factor_nodes or term.factor <= 0 or not _built_from_tril(term.value, dag):
            return False
        value = _constant_value(term.value, dag)
        if not isinstance(value, torch.Tensor):
            return False
        if term.kind == "add":
            if value.dtype == torch.bool:
                return False  # a bool added shifts scores by 0 or 1: never a mask
            value = value * term.factor if term.factor != 1.0 else value
            if not bool(((value == 0) | (value <= MASKED_AT_OR_BELOW)).all()):
                return False  # a bias, not only a mask
            term_blocked = value <= MASKED_AT_OR_BELOW
        else:
            fill = _constant_value(term.fill, dag)
            if isinstance(fill, torch.Tensor):
                fill = float(fill.double().max()) if fill.numel() else None
            if not isinstance(fill, (int, float)) or fill * term.factor > MASKED_AT_OR_BELOW:
                return False
            condition = value.bool()
            term_blocked = condition if term.kind == "fill" else ~condition
        if term_blocked.dim() < 2:
            return False
        try:
            term_blocked = torch.broadcast_to(term_blocked, (*term_blocked.shape[:-2], n, m))
            blocked = term_blocked if blocked is None else blocked | term_blocked
        except RuntimeError:
            return False
    if blocked is None:
        return False
    after = torch.ones(n, m, dtype=torch.bool, device=blocked.device).triu(diagonal=1)
    return bool((blocked == after).all())


def _built_from_tril(node: Any, dag: nx.DiGraph) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return any(op_name(a) in ("tril", "triu") for a in nx.ancestors(dag, node) | {node})


def _constant_value(node: Any, dag: nx.DiGraph) -> Any:
    """The value of `node` when it depends on no graph input and nothing random, else None.
    Python numbers are their own value."""
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None
    cache = dag.graph.setdefault("attnopt_constant_values", {})  # a mask shared by every layer
    if node not in cache:
        cache[node] = _evaluate_constant(node, dag)
    return cache[node]


def _evaluate_constant(node: fx.Node, dag: nx.DiGraph) -> torch.Tensor | None:
    ancestors = nx.ancestors(dag, node) | {node}
    if len(ancestors) > 64:
        return None
    for ancestor in ancestors:
        if ancestor.op == "placeholder" and not isinstance(meta_value(ancestor), (int, float, bool)):
            return None
        if op_name(ancestor) in _NOT_CONSTANT or ancestor.op in ("call_module", "output") \
                or higher_order_name(ancestor) is not None:
            return None
        value = tensor_meta(ancestor)
        if value is not None and value.numel() > _MASK_LIMIT:
            return None
    env: dict[fx.Node, Any] = {}
    owner = node.graph.owning_module
    try:
        with torch.no_grad():
            for original in node.graph.nodes:
                if original not in ancestors:
                    continue
                args, kwargs = fx.node.map_arg((original.args, original.kwargs), lambda n: env[n])
                if original.op == "placeholder":
                    env[original] = meta_value(original)
                elif original.op == "get_attr":
                    value = owner
                    for part in original.target.split("."):
                        value = getattr(value, part)
                    # a copy: an in-place op of the mask's construction must not touch the module
                    env[original] = value.detach().clone() if isinstance(value, torch.Tensor) else value
                elif original.op == "call_function":
                    env[original] = original.target(*args, **kwargs)
                elif original.op == "call_method":
                    env[original] = getattr(args[0], original.target)(*args[1:], **kwargs)
                else:
                    return None
    except Exception:  # anything we cannot run on its own is simply not known to be causal
        return None
    value = env[node]
    return value if isinstance(value, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention


def _match_sdpa(node: fx.Node, dag: nx.DiGraph) -> SiteMatch:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout = float(arg(node, 4, "dropout_p", 0.0) or 0.0)
    causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    enable_gqa = bool(arg(node, 7, "enable_gqa", False))
    q_shape = shape_of(q)
    match = SiteMatch(kind="sdpa", anchor=node, output=node, form="sdpa", inputs=[], internal=[node],
                      recipe={}, shape=_partial_shape(q, None, v), causal=causal, dropout=dropout)
    if q_shape is None or shape_of(k) is None:
        return _refuse(match, "the query or key has no known shape.")
    k_shape = shape_of(k)
    match.shape.update({"M": k_shape[-2]})
    if scale is None:
        scale = 1.0 / math.sqrt(q_shape[-1])
    if not isinstance(scale, (int, float)):
        return _refuse(match, "the scale argument is not a number known when the graph is compiled.")
    match.scale = float(scale)
    grouped = enable_gqa
    key_input, value_input = k, v
    kv_heads = k_shape[-3] if enable_gqa and len(k_shape) >= 3 else None
    if not enable_gqa:
        _, k_peeled = _peel_repeat(k)
        _, v_peeled = _peel_repeat(v)
        if k_peeled is not None and v_peeled is not None and shape_of(k_peeled)[1] == shape_of(v_peeled)[1]:
            key_input, value_input, grouped = k_peeled, v_peeled, True
            kv_heads = shape_of(k_peeled)[1]
    if grouped and len(q_shape) != 4:
        return _refuse(match, "grouped-query attention is supported for 4-D (B, H, N, d) inputs only.")
    match.inputs = [q, key_input, value_input] + ([mask] if isinstance(mask, fx.Node) else [])
    match.internal = _between(dag, match.inputs, node)
    match.shape = _partial_shape(q, None, v, kv_heads=kv_heads)
    match.shape["M"] = k_shape[-2]
    match.recipe = {"key_transposed": False, "grouped": grouped, "scale": float(scale),
                    "has_mask": isinstance(mask, fx.Node), "causal": causal, "dropout_p": dropout,
                    "out_dtype": dtype_of(node)}
    if isinstance(mask, fx.Node):
        mask_shape = shape_of(mask) or ()
        per_key = len(mask_shape) < 2 or mask_shape[-2] == 1
        boolean = dtype_of(mask) == torch.bool
        match.mask = "key_padding" if per_key else ("boolean" if boolean else "additive")
        term = MaskTerm("keep", mask, float("-inf")) if boolean else MaskTerm("add", mask)
        if not per_key and _is_causal([term], (q_shape[-2], k_shape[-2]), dag):
            match.mask, match.causal = "causal", True
    elif causal:
        match.mask = "causal"
    return match


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention and the TransformerEncoderLayer fast path

def mha_arguments(node: fx.Node) -> dict[str, Any]:
    """All arguments of an `F.multi_head_attention_forward` call node, by name."""
    return mha_call_arguments(node.args, node.kwargs)


def argument_recipe(args: dict[str, Any]) -> tuple[list[fx.Node], dict[str, tuple[str, Any]]]:
    """Split named call arguments into graph inputs and a spec: ("input", i) or ("const", v)."""
    inputs: list[fx.Node] = []
    spec = {}
    for name, value in args.items():
        spec[name] = ("input", _index(inputs, value)) if isinstance(value, fx.Node) else ("const", value)
    return inputs, spec


def _match_mha(node: fx.Node) -> SiteMatch:
    args = mha_arguments(node)
    query, key = args["query"], args["key"]
    q_shape, k_shape = shape_of(query), shape_of(key)
    heads = args["num_heads"]
    embed = args["embed_dim_to_check"]
    batched = q_shape is not None and len(q_shape) == 3
    batch = q_shape[1] if batched else 1
    shape = {"B": batch, "H": heads, "Hkv": heads, "N": q_shape[0] if q_shape else 0,
             "M": k_shape[0] if k_shape else 0, "d": embed // heads, "e": embed // heads}
    training = args["training"]
    dropout = float(args["dropout_p"]) if training else 0.0
    mask_node, padding = args["attn_mask"], args["key_padding_mask"]
    mask = "key_padding" if padding is not None and mask_node is None else (
        "causal" if args["is_causal"] else ("additive" if mask_node is not None else None))
    inputs, spec = argument_recipe(args)
    match = SiteMatch(kind="mha", anchor=node, output=node, form="mha", inputs=inputs, internal=[node],
                      recipe={"kind": "mha", "arguments": spec, "eager_fused_path": node.target is eager_multi_head_attention_forward},
                      shape=shape, causal=bool(args["is_causal"]) and mask_node is not None,
                      mask=mask, dropout=dropout, scale=1.0 / math.sqrt(embed // heads),
                      mask_inputs=[n for n in (mask_node, padding) if isinstance(n, fx.Node)])
    weights_used = [u for u in node.users if op_name(u) == "getitem" and u.args[1] == 1 and u.users]
    if weights_used:
        return _refuse(match, "nn.MultiheadAttention's attention weights are used, so the site cannot be replaced.")
    if any(u for u in node.users if op_name(u) != "getitem"):
        return _refuse(match, "the (output, weights) tuple of nn.MultiheadAttention is used as a whole.")
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if args[name] is not None:
            return _refuse(match, f"nn.MultiheadAttention with `{name}` is not supported.")
    if args["add_zero_attn"]:
        return _refuse(match, "nn.MultiheadAttention with add_zero_attn is not supported.")
    if not isinstance(heads, int) or not isinstance(embed, int):
        return _refuse(match, "the head count or embedding size is not a constant.")
    return match


_ENCODER_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                 "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2",
                 "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask",
                 "mask_type")


def encoder_layer_arguments(node: fx.Node) -> dict[str, Any]:
    """All arguments of a `torch._transformer_encoder_layer_fwd` call node, by name."""
    values = {"mask": None, "mask_type": None}
    values.update(zip(_ENCODER_ARGS, node.args))
    values.update(node.kwargs)
    return values


def _match_encoder_layer(node: fx.Node) -> SiteMatch:
    args = encoder_layer_arguments(node)
    src_shape = shape_of(args["src"]) or (1, 0, 0)
    heads, embed = args["num_heads"], args["embed_dim"]
    shape = {"B": src_shape[0], "H": heads, "Hkv": heads, "N": src_shape[-2], "M": src_shape[-2],
             "d": embed // heads, "e": embed // heads}
    mask = None
    if args["mask"] is not None:
        mask = "key_padding" if args["mask_type"] == 1 else "additive"
    inputs, spec = argument_recipe(args)
    match = SiteMatch(kind="encoder-layer", anchor=node, output=node, form="encoder-layer",
                      inputs=inputs, internal=[node], recipe={"kind": "encoder-layer", "arguments": spec}, shape=shape,
                      mask=mask, scale=1.0 / math.sqrt(embed // heads),
                      mask_inputs=[args["mask"]] if isinstance(args["mask"], fx.Node) else [])
    if len(src_shape) != 3:
        return _refuse(match, "the fused encoder layer is supported for batched (B, N, E) inputs only.")
    return match
