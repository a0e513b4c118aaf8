"""Matmul–softmax–matmul sites: from a softmax, walk up to the QK matmul and down to the PV matmul.

From every `torch.softmax` walk *up* through casts, scales (`mul`), masks (`add`, `masked_fill`,
`where`) to the matmul producing the scores, whose operands are Q and Kᵀ; walk *down* through
casts and dropout to the matmul with V. Q, Kᵀ and V are bound at the matmul operands themselves,
so no permute or view between them and the user's tensors can be mis-bound. A `repeat_kv`-style
head repetition of K and V is peeled off (GQA).

Two score transforms of modern models are part of the site: logit softcapping,
`c·tanh(s·(1/c))` right after the scaled QK matmul and before any mask (Gemma 2), and attention
sinks, `softmax(cat([scores, sink], -1))[..., :-1]` (gpt-oss), the sink a site input.
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from .canonicalize import _einsum_operands, unshifted
from .fx_utils import (
    arg, dtype_of, is_scalar, meta_value, mutated_by, nodes_between, normalize_dim, number_valued, op_name, shape_of,
)
from .mask_terms import MaskTerm, constant_fills, mask_kind, scales_per_head, single_value, term_inputs
from .site_ir import Input, MatmulRecipe, SiteMatch, TermSpec, index_of, memory_order, partial_shape, refuse
from .walk import TRANSPARENT, VALUE_OPS, VIEW, WALK_DEPTH, head_split, keeps_last_two, peel_repeat, reaches_matmul, unwrap_key, upstream_factor

SOFTCAP_RTOL = 1e-9
"""How far the product of a softcap's inner factor and its outer one may be from 1 and still be
read as 1 (the inner one is the outer's reciprocal as Python or canonicalize rounded it)."""


def _user_names(node: fx.Node) -> str:
    return ", ".join(sorted(user.name for user in node.users))

def match_softmax(softmax: fx.Node, dag: nx.DiGraph) -> SiteMatch | None:
    stopped: list[fx.Node] = []
    up = _walk_up(softmax.args[0], stopped)
    if up is None:
        write = _write_on_scores(softmax.args[0])
        if write is not None:  # attention, seen through a write attnopt could not make out-of-place
            match = SiteMatch(kind="matmul", anchor=softmax, output=softmax, form="matmul", inputs=[], internal=[],
                              recipe=None, shape={})
            return refuse(match, f"the scores are written in place by `{write.name}` on a tensor others can see "
                                  "(an input, a buffer or a shared view), so attnopt cannot follow them.")
        return _opaque_site(softmax, stopped[0] if stopped else None)
    scores_matmul, chain, terms, scale, factor_nodes, up_reason, softcap, sink = up
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
    sliced = sink is None  # with sinks: whether the sink's column was dropped yet
    zeroed = False  # the weights zeroed where the scores were filled (XSoftmax)
    n_keys = scores_shape[-1]
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
            if not sliced and dropout > 0:
                return refuse(match, f"dropout (`{user.name}`) is applied to the weights with the sink's column "
                                     "still in them, which draws another mask than dropout of the attention weights.")
            down.append(user)
        elif not sliced and _drops_last_column(node, user, n_keys):
            sliced = True
            down.append(user)
        elif op_name(user) == "masked_fill" and user.args[0] is node and not zeroed:
            reason = _zeroing_refusal(user, terms, sink)
            if reason:
                return refuse(match, reason)
            zeroed = True
            down.append(user)
        else:
            break
        node = user
    if not sliced:
        return refuse(match, f"the softmax runs over the scores and a sink column (`{sink.name}`), and `{user.name}` "
                             "does not drop that column before the matmul with values.")
    if user.target is not torch.matmul or user.args[0] is not node:
        return refuse(match, f"the attention weights feed `{user.name}`, not a matmul with values.")
    pv_matmul = user
    v_operand = pv_matmul.args[1]

    qk_lead, softmax_lead, pv_lead = shape_of(scores_matmul)[:-2], shape_of(softmax)[:-2], shape_of(pv_matmul)[:-2]
    regrouped = not (qk_lead == softmax_lead == pv_lead) or any(t.layout != softmax_lead for t in terms)
    if regrouped and sink is not None:
        return refuse(match, "the scores are viewed with other leading dims between the matmuls and joined by "
                             "sink logits, which attnopt does not regroup.")
    _, k_peeled, kv_heads = unwrap_key(kt_operand)
    _, v_peeled = peel_repeat(v_operand)
    if k_peeled is not None and not regrouped and v_peeled is not None and kv_heads == shape_of(v_peeled)[1]:
        key_input, value_input, grouped = k_peeled, v_peeled, True
    else:
        key_input, value_input, grouped = kt_operand, v_operand, False
        kv_heads = None

    match.output = pv_matmul
    match.dropout = dropout
    sources = [q_operand, key_input, value_input, *term_inputs(terms), *factor_nodes, *([sink] if sink is not None else [])]
    match.internal = nodes_between(dag, sources, pv_matmul)
    match.inputs = [q_operand, key_input, value_input]
    tensor_inputs: list[fx.Node] = []

    def operand(item: Any) -> Any:
        return Input(index_of(tensor_inputs, item)) if isinstance(item, fx.Node) else item

    specs = tuple(TermSpec(term.kind, operand(term.value), term.fill, term.factor,
                           tuple(index_of(tensor_inputs, f) for f in term.factor_nodes), tuple(term.layout),
                           term.score_dtype) for term in terms)
    scale_inputs = tuple(index_of(tensor_inputs, f) for f in factor_nodes if not number_valued(f))
    scale_numbers = tuple(index_of(tensor_inputs, f) for f in factor_nodes if number_valued(f))
    sinks = operand(sink) if sink is not None else None
    match.inputs += tensor_inputs
    heads = head_split(q_operand, scores_shape, softmax_lead)
    match.recipe = MatmulRecipe(scale=scale, terms=specs, scale_inputs=scale_inputs, scale_numbers=scale_numbers,
                                grouped=grouped,
                                dropout_p=dropout, head_split=heads, out_dtype=dtype_of(pv_matmul),
                                out_order=memory_order(pv_matmul), softcap=softcap, sinks=sinks, weights_zeroed=zeroed,
                                leads=(tuple(qk_lead), tuple(softmax_lead), tuple(pv_lead)) if regrouped else None)
    match.mask_inputs = [term.value for term in terms if isinstance(term.value, fx.Node)]
    match.shape = partial_shape(q_operand, kt_operand, v_operand, heads=heads, kv_heads=kv_heads)
    match.mask, match.causal = mask_kind(terms, scores_shape, dag)
    match.scale = scale * upstream_factor(q_operand) * upstream_factor(kt_operand) * _value_now(scale_numbers, match)
    for node in chain:
        extra = [u for u in node.users if u not in match.internal and u is not pv_matmul]
        if extra:
            return refuse(match, f"intermediate `{node.name}` is also used by {_user_names(node)}.")
    return match

def _value_now(indices: tuple[int, ...], match: SiteMatch) -> float:
    """The product of the number-valued site inputs at `indices` (counted after q, k, v) in the
    captured call, for the report (the rewrite reads them per call); 1.0 where unknown."""
    product = 1.0
    for index in indices:
        try:
            product *= float(meta_value(match.inputs[3 + index]))
        except (TypeError, ValueError, RuntimeError):  # symbolic, no hint
            return 1.0
    return product


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

PROJECTIONS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})
"""Ops whose output, softmaxed over its last dim into weights for a matmul with values, is
attention with learned queries (MGP-STR's token learner, attention pooling): reported, not rewritten."""


def _opaque_site(softmax: fx.Node, stopped: fx.Node | None = None) -> SiteMatch | None:
    """A softmax whose weights feed a matmul with values and whose scores come from a QK matmul
    through an op attnopt does not model (a tanh that is no softcap, a concatenation that is no
    sink column, ...; or `stopped`, where the walk up gave up on an op it models in other forms,
    such as `add(s, m, alpha=2)`), or from a projection (`PROJECTIONS`): attention, reported with
    the op it could not pass — never silently left out. Anything else (a router's softmax, whose
    weights feed no matmul) is not attention: None."""
    node, opaque = softmax.args[0], None
    for _ in range(WALK_DEPTH):
        if not isinstance(node, fx.Node):
            return None
        name = op_name(node)
        if node.target is torch.matmul or name == "einsum" or name in PROJECTIONS:
            break
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
    if not _feeds_value_matmul(softmax):
        return None
    match = SiteMatch(kind="matmul", anchor=softmax, output=softmax, form=node.meta.get("attnopt_form") or "matmul",
                      inputs=[], internal=[], recipe=None, shape={})
    if op_name(node) in PROJECTIONS:
        n_queries, n_keys = (shape_of(softmax) or (0, 0))[-2:]
        match.shape, match.form = {"N": n_queries, "M": n_keys}, op_name(node)
        return refuse(match, f"the scores are computed by `{op_name(node)}` (`{node.name}`), a projection, not by a "
                             "matmul of queries and keys, which attnopt does not model.")
    match.shape = partial_shape(*_product_operands(node), None)
    how = "which attnopt does not model"
    if opaque is None and stopped is not None and stopped is not node:
        opaque = stopped
        keywords = ", ".join(f"{key}=" for key in stopped.kwargs)
        how = "in a form attnopt does not model" + (f" (with {keywords})" if keywords else "")
    if opaque is None:
        return None
    return refuse(match, f"the scores pass through `{op_name(opaque)}` (`{opaque.name}`) on their way to the "
                          f"softmax, {how}.")


def _product_operands(node: fx.Node) -> tuple[Any, Any]:
    """The two operands of a matmul, or of a two-operand einsum (else twice None)."""
    if op_name(node) == "einsum":
        operands = _einsum_operands(node)
        return operands[1:] if operands is not None else (None, None)
    return node.args[0], node.args[1]


def _feeds_value_matmul(softmax: fx.Node, depth: int = 4) -> bool:
    """Whether the softmax's weights reach, through at most `depth` ops of any kind that take
    them first (a slice dropping a sink column, a cast, column blocks split for several value
    matmuls), the left operand of a matmul (or of an einsum canonicalize left as it was)."""
    frontier = [softmax]
    for _ in range(depth):
        following = []
        for node in frontier:
            for user in node.users:
                if user.target is torch.matmul or op_name(user) == "einsum":
                    operands = _einsum_operands(user) if op_name(user) == "einsum" else user.args
                    if operands is not None and operands[-2] is node:
                        return True
                elif user.args and user.args[0] is node:
                    following.append(user)
        frontier = following
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

def _walk_up(node: Any, stopped: list[fx.Node] | None = None):
    """From the softmax input up to the QK matmul.

    Returns (matmul, chain, mask terms, python scale, tensor scale nodes, reason, softcap, sink
    node) or None when no matmul produces the scores. `chain` lists the nodes from the matmul to
    the softmax input. softcap: c where the scores are capped to c·tanh(s / c), else None. sink:
    the tensor concatenated to the scores as one more key right before the softmax, else None.
    `stopped`, when given, receives the node where the walk gave up.
    """
    chain: list[fx.Node] = []
    steps: list[tuple[str, Any]] = []
    current = node
    sink = None
    while isinstance(current, fx.Node):
        if stopped is not None:
            stopped[:] = [current]
        name = op_name(current)
        chain.append(current)
        if current.target is torch.matmul:
            break
        if name in VALUE_OPS:
            current = current.args[0]
            continue
        if name == "sub" and not steps and unshifted(current) is not None:
            current = unshifted(current)  # the row max, subtracted behind a cast canonicalize kept
            continue
        if name == "cat":
            split = _sink_split(current)
            if split is None or steps or sink is not None:
                return None
            current, sink = split
            continue
        cap = _softcap_of(current)
        if cap is not None:
            c, folded, nodes, current = cap
            chain += nodes
            steps.append(("softcap", c))
            if folded != 1.0:
                steps.append(("scale", folded))  # applied before the cap
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
            if not isinstance(path, fx.Node) or shape_of(path) != shape_of(current) or not _reaches_scores(path):
                return None
            steps.append(("divide", divisor))
            current = path
            continue
        if name == "add" and len(current.args) == 2 and not current.kwargs:
            path, other = _split_operands(current, allow_full=True)
            if path is None:
                return None
            if not (_is_number(other) and other == 0):  # `s + 0` (DeBERTa without relative attention)
                steps.append(("add", (other, dtype_of(path))))
            current = path
            continue
        if name == "masked_fill":
            steps.append(("fill", (current.args[1], current.args[2], dtype_of(current))))
            current = current.args[0]
            continue
        if name == "where" and len(current.args) == 3:
            cond, a, b = current.args
            if _reaches_scores(a):
                steps.append(("fill", (("not", cond), b, dtype_of(current))))
                current = a
            elif _reaches_scores(b):
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
    softcap = None
    layout = shape_of(chain[0])[:-2]
    for kind, item in reversed(steps):  # from the matmul towards the softmax
        if kind == "layout":
            layout = item
            continue
        if kind == "softcap":
            if softcap is not None:
                reason = "the scores are capped with tanh twice, which attnopt does not model."
            elif terms:
                reason = ("a mask is applied to the scores before their tanh softcap, which attnopt models only "
                          "after it.")
            softcap = item
            continue
        if kind == "scale" and softcap is not None:
            what = f"`{item.name}`" if isinstance(item, fx.Node) else repr(item)
            reason = (f"the softcapped scores are multiplied by {what}, which attnopt cannot fold into the scale "
                      "(it applies before the cap).")
            continue
        if kind == "scale":
            if isinstance(item, (int, float)):
                scale *= float(item)
                for term in terms:
                    term.factor *= float(item)
            elif number_valued(item) or (scales_per_head(item, shape_of(chain[-1])) and (
                    layout == shape_of(chain[0])[:-2] or single_value(item))):
                # a one-element factor (or a number the graph computes, e.g. from symbolic sizes)
                # scales every score alike, whatever view the scores are in
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
    return chain[0], chain, terms, scale, factor_nodes, reason, softcap, sink


def _zeroing_refusal(fill: fx.Node, terms: list[MaskTerm], sink: fx.Node | None) -> str | None:
    """None when `fill`, a masked_fill of the attention weights, is DeBERTa's XSoftmax zeroing:
    `softmax(s.masked_fill(m, f)).masked_fill(m, 0)` with the same `m` (or `~x` spelled twice;
    or `where(x, s, f)` and `~x`), f -inf or at most the scores' lowest finite value, and no
    other term on the scores. The weights it zeroes are then 0 already in every row that keeps a
    key scoring above f + 104 (their exp(f - max) underflows; with f = finfo.min that is every
    finite score but finfo.min itself), and a row whose every key is filled gives 0 instead of
    uniform weights (or NaN for -inf): softmax with `m` as a -inf mask whose fully masked rows
    give 0 (`MatmulRecipe.weights_zeroed`). Else the reason the site is refused."""
    condition, value = fill.args[1:3] if len(fill.args) == 3 else (None, None)
    what = f"the attention weights are filled after the softmax by `{fill.name}`"
    if not _is_number(value) or value != 0:
        return f"{what} with {getattr(value, 'name', value)}, not with 0, which attnopt does not model."
    fills = [t for t in terms if (t.kind == "fill" and _same_condition(t.value, condition))
             or (t.kind == "keep" and _negation_of(condition) is t.value)]
    if not fills:
        return (f"{what} where `{getattr(condition, 'name', condition)}` is True, which is not the mask the "
                "scores were filled with before it; attnopt does not model that.")
    if len(terms) != 1 or sink is not None:
        return (f"{what}, zeroing where the scores were filled, while other terms also act on the scores: the "
                "zeroed weights need not be zero before, which attnopt does not model.")
    score_dtype = fills[0].score_dtype or torch.float32
    if fills[0].fill * fills[0].factor > torch.finfo(score_dtype).min:
        return (f"{what}, zeroing where the scores were filled with {fills[0].fill}, a value above the lowest "
                f"{score_dtype}: the zeroed weights need not be zero before, which attnopt does not model.")
    return None


def _negation_of(node: Any) -> Any:
    """x for `~x` / `logical_not(x)`, else None."""
    if isinstance(node, fx.Node) and op_name(node) in ("bitwise_not", "logical_not") and len(node.args) == 1:
        return node.args[0]
    return None


def _same_condition(a: Any, b: Any) -> bool:
    """`a` and `b` are one bool mask: the same node, or the negation of one node spelled twice."""
    return a is b or (_negation_of(a) is not None and _negation_of(a) is _negation_of(b))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _softcap_of(node: fx.Node) -> tuple[float, float, list[fx.Node], fx.Node] | None:
    """(c, r·c, [the tanh, its inner product], s) when `node` is `tanh(s·r)·c`, c and r Python
    numbers (or `tanh(s / x)·c`, `c·tanh(s)`, operands of either product in any order): Gemma 2's
    logit softcapping `c·tanh(s / c)` where r = 1/c, and in general a softcap |c| of the scores
    scaled by r·c first, since c·tanh(s·r) = |c|·tanh(s·r·c / |c|)."""
    if op_name(node) != "mul" or len(node.args) != 2 or node.kwargs:
        return None
    capped, outer = node.args if _is_number(node.args[1]) else reversed(node.args)
    if not (isinstance(capped, fx.Node) and op_name(capped) == "tanh" and _is_number(outer) and outer != 0):
        return None
    inner = capped.args[0] if len(capped.args) == 1 and not capped.kwargs else None
    if not isinstance(inner, fx.Node):
        return None
    nodes, path, factor = [capped], inner, 1.0
    if op_name(inner) in ("mul", "div") and len(inner.args) == 2 and not inner.kwargs:
        a, b = inner.args
        if op_name(inner) == "mul" and _is_number(a):
            a, b = b, a
        if isinstance(a, fx.Node) and _is_number(b) and b != 0:
            nodes, path = [capped, inner], a
            factor = float(b) if op_name(inner) == "mul" else 1.0 / float(b)
    folded = factor * float(outer)
    if math.isclose(folded, 1.0, rel_tol=SOFTCAP_RTOL):
        folded = 1.0  # r is 1/c as Python or canonicalize rounded it
    return abs(float(outer)), folded, nodes, path


def _sink_split(cat: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(scores, sink) when `cat` is `cat([scores, sink], dim=-1)` with a sink of one key."""
    parts, dim = arg(cat, 0, "tensors"), arg(cat, 1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, fx.Node) for p in parts):
        return None
    scores, sink = parts
    scores_shape, sink_shape = shape_of(scores), shape_of(sink)
    if scores_shape is None or sink_shape is None or len(scores_shape) < 2 or len(sink_shape) != len(scores_shape):
        return None
    if not isinstance(dim, int) or normalize_dim(dim, len(scores_shape)) != len(scores_shape) - 1:
        return None
    if sink_shape[-1] != 1 or sink_shape[:-1] != scores_shape[:-1] or not (dtype_of(sink) or torch.bool).is_floating_point:
        return None
    return scores, sink


def _drops_last_column(source: fx.Node, user: fx.Node, n_keys: int) -> bool:
    """Whether `user` is `source[..., :-1]` (or `[..., :n_keys]`, `[:, :, :, :-1]`, `narrow(-1,
    0, n_keys)`) of weights over n_keys + 1 columns: the sink's column dropped."""
    source_shape, user_shape = shape_of(source), shape_of(user)
    if source_shape is None or user_shape is None or not user.args or user.args[0] is not source:
        return False
    if tuple(user_shape) != (*source_shape[:-1], n_keys) or source_shape[-1] != n_keys + 1:
        return False
    name = op_name(user)
    if name == "narrow":
        dim, start, length = (arg(user, i, key) for i, key in ((1, "dim"), (2, "start"), (3, "length")))
        return isinstance(dim, int) and normalize_dim(dim, len(source_shape)) == len(source_shape) - 1 \
            and start == 0 and length == n_keys
    if name != "getitem":
        return False
    index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
    if not index or not isinstance(index[-1], slice):
        return False
    full = slice(None, None, None)
    leading = [i for i in index[:-1] if i is not Ellipsis]
    if any(i != full for i in leading) or (Ellipsis not in index[:-1] and len(index) != len(source_shape)):
        return False
    last = index[-1]
    return last.start in (None, 0) and last.step in (None, 1) and last.stop in (-1, n_keys)


def _reaches_scores(node: Any) -> bool:
    """walk.reaches_matmul, also through a softcap (_softcap_of)."""
    return reaches_matmul(node, passes=_past_softcap)


def _past_softcap(node: fx.Node) -> fx.Node | None:
    cap = _softcap_of(node)
    return cap[3] if cap is not None else None


def _split_operands(node: fx.Node, allow_full: bool = False) -> tuple[fx.Node | None, Any]:
    """(scores path, other operand) of a binary node on the scores path."""
    a, b = node.args
    candidates = [(a, b), (b, a)]
    for path, other in candidates:
        if isinstance(path, fx.Node) and shape_of(path) == shape_of(node) and _reaches_scores(path):
            if not allow_full and not is_scalar(other) and not isinstance(other, fx.Node):
                continue
            return path, other
    return None, None
