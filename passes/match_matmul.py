"""Matmul–softmax–matmul sites: from a softmax, walk up to the QK matmul and down to the PV matmul.

From every `torch.softmax` walk *up* through casts, scales (`mul`), masks (`add`, `masked_fill`,
`where`) to the matmul producing the scores, whose operands are Q and Kᵀ; walk *down* through
casts and dropout to the matmul with V. Q, Kᵀ and V are bound at the matmul operands themselves,
so no permute or view between them and the user's tensors can be mis-bound. A `repeat_kv`-style
head repetition of K and V is peeled off (GQA).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from .fx_utils import arg, dtype_of, is_scalar, mutated_by, nodes_between, normalize_dim, op_name, shape_of
from .mask_terms import MaskTerm, constant_fills, mask_kind, scales_per_head, single_value, term_inputs
from .site_ir import Input, MatmulRecipe, SiteMatch, TermSpec, index_of, memory_order, partial_shape, refuse
from .walk import TRANSPARENT, VALUE_OPS, VIEW, WALK_DEPTH, head_split, keeps_last_two, peel_repeat, reaches_matmul, unwrap_key, upstream_factor


def _user_names(node: fx.Node) -> str:
    return ", ".join(sorted(user.name for user in node.users))

def match_softmax(softmax: fx.Node, dag: nx.DiGraph) -> SiteMatch | None:
    up = _walk_up(softmax.args[0])
    if up is None:
        write = _write_on_scores(softmax.args[0])
        if write is not None:  # attention, seen through a write attnopt could not make out-of-place
            match = SiteMatch(kind="matmul", anchor=softmax, output=softmax, form="matmul", inputs=[], internal=[],
                              recipe=None, shape={})
            return refuse(match, f"the scores are written in place by `{write.name}` on a tensor others can see "
                                  "(an input, a buffer or a shared view), so attnopt cannot follow them.")
        return _opaque_site(softmax)
    scores_matmul, chain, terms, scale, factor_nodes, up_reason = up
    q_operand, kt_operand = scores_matmul.args
    scores_shape = shape_of(scores_matmul)
    form = scores_matmul.meta.get("attnopt_form") or "matmul"
    if form == "matmul" and softmax.meta.get("attnopt_form") == "manual-softmax":
        form = "manual-softmax"
    match = SiteMatch(
        kind="matmul", anchor=softmax, output=softmax, form=form, inputs=[], internal=[],
        recipe=None, shape=partial_shape(q_operand, kt_operand, None), scale=scale,
    )
    if up_reason:
        return refuse(match, up_reason)
    fill_reason = constant_fills(terms, dag, match.constants)
    if fill_reason:
        return refuse(match, fill_reason)
    if scores_shape is None or len(scores_shape) < 2:
        return refuse(match, "the scores have no known shape of rank ≥ 2.")
    softmax_rank = len(shape_of(softmax) or scores_shape)
    dim = normalize_dim(arg(softmax, 1, "dim"), softmax_rank)
    if dim != softmax_rank - 1:
        return refuse(match, f"softmax is taken over dimension {dim}, not over the keys (the last dimension of QKᵀ).")

    down = [softmax]
    node = softmax
    dropout = 0.0
    while True:
        users = list(node.users)
        if len(users) != 1:
            where = "returned or used elsewhere" if users else "not used"
            return refuse(match, f"the attention weights are {where} ({_user_names(node) or 'no users'}), so the site cannot be replaced.")
        user = users[0]
        name = op_name(user)
        if (name in VALUE_OPS or (TRANSPARENT.get(name) == VIEW and keeps_last_two(node, user))) and user.args[0] is node:
            down.append(user)
        elif user.target is torch.nn.functional.dropout and user.args[0] is node:
            dropout = float(arg(user, 1, "p", 0.5))
            down.append(user)
        else:
            break
        node = user
    if user.target is not torch.matmul or user.args[0] is not node:
        return refuse(match, f"the attention weights feed `{user.name}`, not a matmul with values.")
    pv_matmul = user
    v_operand = pv_matmul.args[1]

    qk_lead, softmax_lead, pv_lead = shape_of(scores_matmul)[:-2], shape_of(softmax)[:-2], shape_of(pv_matmul)[:-2]
    regrouped = not (qk_lead == softmax_lead == pv_lead) or any(t.layout != softmax_lead for t in terms)
    _, k_peeled, kv_heads = unwrap_key(kt_operand)
    _, v_peeled = peel_repeat(v_operand)
    if k_peeled is not None and not regrouped and v_peeled is not None and kv_heads == shape_of(v_peeled)[1]:
        key_input, value_input, grouped = k_peeled, v_peeled, True
    else:
        key_input, value_input, grouped = kt_operand, v_operand, False
        kv_heads = None

    match.output = pv_matmul
    match.dropout = dropout
    match.internal = nodes_between(dag, [q_operand, key_input, value_input, *term_inputs(terms), *factor_nodes], pv_matmul)
    match.inputs = [q_operand, key_input, value_input]
    tensor_inputs: list[fx.Node] = []

    def operand(item: Any) -> Any:
        return Input(index_of(tensor_inputs, item)) if isinstance(item, fx.Node) else item

    specs = tuple(TermSpec(term.kind, operand(term.value), term.fill, term.factor,
                           tuple(index_of(tensor_inputs, f) for f in term.factor_nodes), tuple(term.layout),
                           term.score_dtype) for term in terms)
    scale_inputs = tuple(index_of(tensor_inputs, f) for f in factor_nodes)
    match.inputs += tensor_inputs
    heads = head_split(q_operand, scores_shape, softmax_lead)
    match.recipe = MatmulRecipe(scale=scale, terms=specs, scale_inputs=scale_inputs, grouped=grouped,
                                dropout_p=dropout, head_split=heads, out_dtype=dtype_of(pv_matmul),
                                out_order=memory_order(pv_matmul),
                                leads=(tuple(qk_lead), tuple(softmax_lead), tuple(pv_lead)) if regrouped else None)
    match.mask_inputs = [term.value for term in terms if isinstance(term.value, fx.Node)]
    match.shape = partial_shape(q_operand, kt_operand, v_operand, heads=heads, kv_heads=kv_heads)
    match.mask, match.causal = mask_kind(terms, scores_shape, dag)
    match.scale = scale * upstream_factor(q_operand) * upstream_factor(kt_operand)
    for node in chain:
        extra = [u for u in node.users if u not in match.internal and u is not pv_matmul]
        if extra:
            return refuse(match, f"intermediate `{node.name}` is also used by {_user_names(node)}.")
    return match

def match_unstable_softmax(node: fx.Node, dag: nx.DiGraph) -> SiteMatch | None:
    """`exp(s) / exp(s).sum(-1)` on attention scores, without subtracting the max: reported, not
    rewritten (it overflows and underflows where softmax does not, so it is another function)."""
    up = _walk_up(node.meta["attnopt_unstable_softmax"].args[0])
    if up is None:
        return None
    match = SiteMatch(kind="matmul", anchor=node, output=node, form="manual-softmax", inputs=[], internal=[],
                      recipe=None, shape=partial_shape(*up[0].args, None))
    return refuse(match, "its softmax is written as exp(s) / Σ exp(s) without subtracting the row maximum, which "
                          "overflows for scores above ~88 and gives 0/0 on rows of very negative scores; "
                          "softmax would change those results.")

def _opaque_site(softmax: fx.Node) -> SiteMatch | None:
    """A softmax whose scores come from a QK matmul through an op attnopt does not model (logit
    softcapping's tanh, a concatenated sink column, ...) and whose weights feed a matmul with
    values: attention, reported with the op it could not pass — never silently left out.
    Anything else (a router's softmax, a softmax over a projection) is not attention: None."""
    node, opaque = softmax.args[0], None
    for _ in range(WALK_DEPTH):
        if not isinstance(node, fx.Node):
            return None
        if node.target is torch.matmul:
            break
        name = op_name(node)
        modelled = name in VALUE_OPS or name in ("mul", "add", "div", "masked_fill", "where") or TRANSPARENT.get(name) == VIEW
        if not modelled and opaque is None:
            opaque = node
        operands = [a for item in node.args for a in (item if isinstance(item, (list, tuple)) else (item,))]
        sources = [a for a in operands if isinstance(a, fx.Node) and shape_of(a) is not None and len(shape_of(a)) >= 2]
        if not sources:
            return None
        node = sources[0]
    else:
        return None
    if opaque is None or not _feeds_value_matmul(softmax):
        return None
    match = SiteMatch(kind="matmul", anchor=softmax, output=softmax, form=node.meta.get("attnopt_form") or "matmul",
                      inputs=[], internal=[], recipe=None, shape=partial_shape(*node.args, None))
    return refuse(match, f"the scores pass through `{op_name(opaque)}` (`{opaque.name}`) on their way to the "
                          "softmax, which attnopt does not model.")


def _feeds_value_matmul(softmax: fx.Node, depth: int = 4) -> bool:
    """Whether the softmax's weights reach, through at most `depth` single-use ops of any kind
    (a slice dropping a sink column, a cast), the left operand of a matmul."""
    node = softmax
    for _ in range(depth):
        if len(node.users) != 1:
            return False
        user = next(iter(node.users))
        if user.target is torch.matmul:
            return user.args[0] is node
        if not user.args or user.args[0] is not node:
            return False
        node = user
    return False


def _write_on_scores(node: Any) -> fx.Node | None:
    """The in-place write on the way up from a softmax's input to a QK matmul, if any."""
    for _ in range(WALK_DEPTH):
        if not isinstance(node, fx.Node):
            return None
        if mutated_by(node) is not None:
            return node if reaches_matmul(mutated_by(node)) or any(
                reaches_matmul(a) for a in node.args if isinstance(a, fx.Node)) else None
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
        if name in VALUE_OPS:
            current = current.args[0]
            continue
        if TRANSPARENT.get(name) == VIEW and keeps_last_two(current.args[0], current):
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
            if not isinstance(path, fx.Node) or shape_of(path) != shape_of(current) or not reaches_matmul(path):
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
            if reaches_matmul(a):
                steps.append(("fill", (("not", cond), b, dtype_of(current))))
                current = a
            elif reaches_matmul(b):
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
            elif scales_per_head(item, shape_of(chain[-1])) and (
                    layout == shape_of(chain[0])[:-2] or single_value(item)):
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

def _split_operands(node: fx.Node, allow_full: bool = False) -> tuple[fx.Node | None, Any]:
    """(scores path, other operand) of a binary node on the scores path."""
    a, b = node.args
    candidates = [(a, b), (b, a)]
    for path, other in candidates:
        if isinstance(path, fx.Node) and shape_of(path) == shape_of(node) and reaches_matmul(path):
            if not allow_full and not is_scalar(other) and not isinstance(other, fx.Node):
                continue
            return path, other
    return None, None
