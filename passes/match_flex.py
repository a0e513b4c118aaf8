"""`torch.nn.attention.flex_attention` as an attention site: read the `flex_attention`
higher-order op dynamo captures into attnopt's canonical call, or say why not.

Dynamo captures `flex_attention(q, k, v, score_mod=..., block_mask=..., scale=...)` as

    torch.ops.higher_order.flex_attention(q, k, v, score_mod_body, block_mask_tuple, scale,
                                          kernel_options, score_mod_buffers, mask_mod_buffers)

with the score_mod and the block mask's mask_mod as subgraphs (get_attr GraphModules of scalar
functions) and the tensors they close over passed as buffers. torch 2.13's reference (its eager
path, which is also what the captured graph runs outside Inductor) computes

    softmax(where(mask_mod(b, h, q_idx, kv_idx), score_mod(q kᵀ·scale, b, h, q_idx, kv_idx), -inf)) v

in fp32 (fp64 for fp64 inputs), a row with no allowed key giving 0, GQA by repeating K/V heads.
The block structure of the BlockMask is not read there: the mask_mod alone defines the result
(Inductor's kernel follows the blocks instead, which agrees whenever the blocks were built from
that mask_mod — `create_block_mask` — and differs otherwise; attnopt follows the reference, the
function its verification and end-to-end check compare against).

A site is rewritable when its score_mod is, read from the output down to the score,

    score_mod(s) = where(keep(b, h, q, kv), cap(s) + bias(b, h, q, kv), -inf)

in any nesting of `+`/`-` of terms that do not read the score, `where(c, ·, -inf)` /
`masked_fill(·, c, -inf)` with conditions that do not, and at most one `c·tanh(s / c)` applied to
the score itself; then the exact op computes it with `softcap=c` and one mask built on every
call by evaluating the terms and the mask_mod on index grids exactly as torch does (vmap over
torch.arange, `passes/site_call.py` FlexSiteCall), with the tensors they read (the buffers) as
site inputs. Everything else is a site refused with a reason naming flex_attention: a score_mod
that transforms the score otherwise, a used logsumexp (`return_lse`, `return_aux`), kernel
options that change numerics, a subgraph that does not evaluate on index grids.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from .fx_utils import (
    body_module,
    dtype_of,
    higher_order_name,
    meta_value,
    number_valued,
    op_name,
    shape_of,
    to_networkx,
)
from .match_library import call_arguments
from .site_call import flex_masking
from .site_ir import (
    FlexRecipe,
    Input,
    SiteMatch,
    index_of,
    memory_order,
    partial_shape,
    refuse,
)

FLEX_HOP = "flex_attention"

NEUTRAL_KERNEL_OPTIONS = frozenset({
    "BACKEND", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION", "USE_TMA",
    "OUTPUT_LOGSUMEXP", "OUTPUT_MAX", "ROWS_GUARANTEED_SAFE",
    "num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
    "kpack", "matrix_instr_nonkdim", "waves_per_eu",
})
"""flex_attention kernel options that choose how its compiled kernel runs, not what it computes
(tiles, warps, the backend, which statistics it writes; ROWS_GUARANTEED_SAFE only promises that no
row is fully masked). They may carry a `fwd_` / `bwd_` prefix. Any other option with a value
other than its default is refused by name: PRESCALE_QK=True rounds q·scale before the product."""

_DEFAULT_KERNEL_OPTIONS = {"PRESCALE_QK": False}


def _flex_signature(query, key, value, score_mod, block_mask, scale, kernel_options,
                    score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """`torch.ops.higher_order.flex_attention`'s signature."""


def is_flex_attention(node: fx.Node) -> bool:
    return higher_order_name(node) == FLEX_HOP


def match_flex(node: fx.Node, dag: nx.DiGraph) -> SiteMatch | None:
    """The flex_attention call at `node` as a site (refused with its reason where attnopt cannot
    compute it exactly); None for any other node."""
    if not is_flex_attention(node):
        return None
    args = call_arguments(_flex_signature, node)
    outputs = [u for u in node.users if op_name(u) == "getitem" and u.args[1] == 0]
    output = outputs[0] if len(outputs) == 1 else node
    match = SiteMatch(kind="flex", anchor=node, output=output, form="flex", inputs=[], internal=[node],
                      recipe=None, shape={})
    if args is None:
        return refuse(match, "flex_attention's arguments do not bind to its signature, so attnopt cannot read them.")
    q, k, v = args["query"], args["key"], args["value"]
    q_shape, k_shape = shape_of(q), shape_of(k)
    if q_shape is not None and k_shape is not None and len(q_shape) == 4 and len(k_shape) == 4:
        match.shape = partial_shape(q, None, v, kv_heads=k_shape[1])
        match.shape["M"] = k_shape[2]
    scale = args["scale"]
    if number_valued(scale):  # computed from symbolic sizes (`1 / sqrt(d)` of a dynamic graph): read per call
        match.scale = float(meta_value(scale))
    elif _number(scale) is not None:
        match.scale = float(scale)

    reason = _outputs_reason(node, outputs) or _shapes_reason(q, k, v) or _options_reason(args["kernel_options"])
    if reason is None and match.scale is None:
        reason = "flex_attention's scale is not a number known when the graph is compiled."
    score_body = _body(node, args["score_mod"])
    block_mask = args["block_mask"]
    mask_body = _body(node, block_mask[-1]) if isinstance(block_mask, tuple) and block_mask else None
    if reason is None and (score_body is None or mask_body is None):
        reason = "flex_attention's score_mod or mask_mod is not a subgraph attnopt can read."
    read = _read_score_mod(score_body) if reason is None else None
    if isinstance(read, str):
        reason, read = read, None
    if reason is not None:
        return refuse(match, reason)

    score_buffers, mask_buffers = tuple(args["score_mod_other_buffers"]), tuple(args["mask_mod_other_buffers"])
    inputs = [q, k, v]
    tensor_terms = [(term, negate) for term, negate in read.adds if isinstance(term, fx.Node)]
    recipe = FlexRecipe(
        scale=_operand(inputs, scale) if isinstance(scale, fx.Node) else match.scale, softcap=read.softcap,
        terms=_outputs_module(score_body, [term for term, _ in tensor_terms]),
        term_signs=tuple(-1 if negate else 1 for _, negate in tensor_terms),
        term_offset=sum((-term if negate else term) for term, negate in read.adds if not isinstance(term, fx.Node)),
        has_number_terms=len(tensor_terms) < len(read.adds),
        keeps=_outputs_module(score_body, [condition for condition, _ in read.keeps]),
        keep_negated=tuple(negated for _, negated in read.keeps),
        mask_mod=None if _is_noop_mask(mask_body) else mask_body,
        score_buffers=tuple(_operand(inputs, b) for b in score_buffers),
        mask_buffers=tuple(_operand(inputs, b) for b in mask_buffers),
        out_dtype=dtype_of(output), out_order=memory_order(output))
    match.inputs = inputs
    match.internal = [n for n in node.graph.nodes
                      if n is node or n is output or n in (args["score_mod"], block_mask[-1])]
    # the block tensors: torch's reference does not read them (see the module doc); verification
    # feeds them zeros, which under block semantics would mask everything
    match.constants = {n: _zeros_like(n) for n in node.all_input_nodes
                       if n not in inputs and n not in match.internal}
    match.recipe = recipe
    match.mask_inputs = _indexed_biases(score_body, [term for term, _ in tensor_terms], score_buffers) + [
        b for b in (*score_buffers, *mask_buffers) if dtype_of(b) == torch.bool]  # drawn with whole rows blocked
    trial = _trial_reason(recipe, inputs)
    if trial is not None:
        return refuse(match, trial)
    match.causal = _keeps_causal(recipe, inputs)
    if recipe.term_signs or recipe.has_number_terms:
        match.mask = "additive"
    elif match.causal:
        match.mask = "causal"
    elif recipe.keeps is not None or recipe.mask_mod is not None:
        match.mask = "boolean"
    return match


def _body(node: fx.Node, value: Any) -> fx.GraphModule | None:
    if not isinstance(value, fx.Node) or value.op != "get_attr" or node.graph.owning_module is None:
        return None
    body = body_module(node.graph.owning_module, value)
    return body if isinstance(body, fx.GraphModule) else None


def _operand(inputs: list, value: Any) -> Any:
    """A buffer as a recipe operand: a graph value as an `Input` (among all the site's inputs), or the constant."""
    return Input(index_of(inputs, value)) if isinstance(value, fx.Node) else value


def _zeros_like(node: fx.Node) -> Any:
    value = meta_value(node)
    if isinstance(value, torch.Tensor):
        return torch.zeros(tuple(int(s) for s in value.shape), dtype=value.dtype)
    return int(value) if isinstance(value, (int, torch.SymInt)) else value


def _outputs_reason(node: fx.Node, outputs: list[fx.Node]) -> str | None:
    for user in node.users:
        if op_name(user) != "getitem":
            return "flex_attention's (output, logsumexp, max) tuple is used as a whole."
        if user.args[1] in (1, 2) and user.users:
            what = "logsumexp (return_lse / return_aux)" if user.args[1] == 1 else "max scores (return_aux)"
            return f"flex_attention's {what} is used, which attnopt's exact op does not return."
    if len(outputs) != 1:
        return "flex_attention's output is read through several nodes." if outputs else \
            "flex_attention's output is not read."
    return None


def _shapes_reason(q: Any, k: Any, v: Any) -> str | None:
    shapes = [shape_of(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        return "flex_attention's query, key or value is not a 4-D tensor of known shape."
    if len({dtype_of(t) for t in (q, k, v)}) != 1:
        return "flex_attention's key or value has another dtype than its query."
    (bq, hq, _, _), (bk, hk, _, _), _ = shapes
    if hq % hk or (bk != bq and bk != 1):
        return "flex_attention's key heads or batch do not divide its query's."
    return None


def _options_reason(options: Any) -> str | None:
    for name, value in dict(options or {}).items():
        base = name.removeprefix("fwd_").removeprefix("bwd_")
        if base in NEUTRAL_KERNEL_OPTIONS:
            continue
        if base in _DEFAULT_KERNEL_OPTIONS and value == _DEFAULT_KERNEL_OPTIONS[base]:
            continue
        if base == "PRESCALE_QK":
            return (f"flex_attention's kernel option {name}=True makes its compiled kernel round q·scale before "
                    "the product, which attnopt's exact op does not reproduce.")
        return f"flex_attention's kernel option {name}={value!r} is not one attnopt knows to leave the result unchanged."
    return None


# ── the score_mod, read from its output down to the score ────────────────────────────────────────


@dataclasses.dataclass
class _ScoreModRead:
    """score_mod(s) = where(all keeps, cap(s) + Σ ±adds, -inf). adds: (node or number, negated);
    keeps: (bool node, negated)."""

    softcap: float | None = None
    adds: list[tuple[Any, bool]] = dataclasses.field(default_factory=list)
    keeps: list[tuple[fx.Node, bool]] = dataclasses.field(default_factory=list)


def _read_score_mod(body: fx.GraphModule) -> _ScoreModRead | str:
    """How the score_mod transforms the score, or why attnopt cannot compute it."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    outputs = [n for n in body.graph.nodes if n.op == "output"]
    if len(placeholders) < 5 or len(outputs) != 1:
        return "flex_attention's score_mod is not a function of (score, b, h, q_idx, kv_idx)."
    score = placeholders[0]
    reads_score = {score} | set(nx.descendants(to_networkx(body.graph), score))
    read = _ScoreModRead()
    node = outputs[0].args[0]
    while node is not score:
        if not isinstance(node, fx.Node) or node not in reads_score:
            return "flex_attention's score_mod does not return the score (it replaces it)."
        name = op_name(node)
        args = node.args
        if name in ("add", "sub") and len(args) == 2 and not node.kwargs:
            first, second = (a in reads_score for a in args)
            if first and second:
                return f"flex_attention's score_mod combines the score with a value computed from it (`{node.name}`)."
            if name == "sub" and second:
                return "flex_attention's score_mod subtracts the score from a value."
            term = args[1] if first else args[0]
            if not isinstance(term, fx.Node) and (isinstance(term, bool) or not isinstance(term, (int, float))):
                return f"flex_attention's score_mod adds {term!r} to the score."
            read.adds.append((term, name == "sub"))
            node = args[0] if first else args[1]
        elif name == "where" and len(args) == 3 and not node.kwargs and args[0] not in reads_score:
            condition, kept, other = args
            if _is_neg_inf(other) and kept in reads_score:
                read.keeps.append((condition, False))
                node = kept
            elif _is_neg_inf(kept) and other in reads_score:
                read.keeps.append((condition, True))
                node = other
            else:
                return "flex_attention's score_mod replaces scores by a value other than -inf."
        elif name == "masked_fill" and len(args) == 3 and not node.kwargs and args[1] not in reads_score:
            if not _is_neg_inf(args[2]):
                return "flex_attention's score_mod fills scores with a value other than -inf."
            read.keeps.append((args[1], True))
            node = args[0]
        else:
            cap = _softcap_of(node, score)
            if cap is None:
                return (f"flex_attention's score_mod applies `{name or node.op}` to the score: attnopt computes "
                        "score + bias(b, h, q_idx, kv_idx), -inf masks and a c·tanh(score / c) softcap only.")
            read.softcap = cap
            node = score
    return read


def _is_neg_inf(value: Any) -> bool:
    return isinstance(value, float) and value == -math.inf


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _softcap_of(node: fx.Node, score: fx.Node) -> float | None:
    """c for `c · tanh(score / c)` (either operand order; `score · (1/c)` too) taken of the score
    itself, a positive finite c; else None."""
    if op_name(node) != "mul" or len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    cap, tanh = (_number(first), second) if _number(first) is not None else (_number(second), first)
    if cap is None or not (math.isfinite(cap) and cap > 0) or not isinstance(tanh, fx.Node):
        return None
    if op_name(tanh) != "tanh" or len(tanh.args) != 1 or tanh.kwargs or not isinstance(tanh.args[0], fx.Node):
        return None
    inner = tanh.args[0]
    if len(inner.args) != 2 or inner.kwargs or inner.args[0] is not score:
        return None
    divisor = _number(inner.args[1])
    if divisor is None:
        return None
    if op_name(inner) == "div" and divisor == cap:
        return cap
    if op_name(inner) == "mul" and math.isclose(divisor * cap, 1.0, rel_tol=1e-12):
        return cap
    return None


def _outputs_module(body: fx.GraphModule, nodes: list[fx.Node]) -> fx.GraphModule | None:
    """A copy of the score_mod (same placeholders) that returns `nodes` (terms that do not read
    the score) instead of the modified score; None for no nodes."""
    if not nodes:
        return None
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(body.graph, mapping)
    graph.output(tuple(mapping[node] for node in nodes))
    graph.eliminate_dead_code()
    return fx.GraphModule(body, graph)


def _indexed_biases(body: fx.GraphModule, terms: list[fx.Node], buffers: tuple) -> list[fx.Node]:
    """The float buffers that are added to the score as they are, indexed (`bias[b, h, q_idx,
    kv_idx]`, `bias[h]`): masks in all but name, so verification draws them as masks (-inf
    entries and whole blocked rows, which flex_attention gives 0)."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    found = []
    for term in terms:
        if op_name(term) != "getitem" or term.args[0] not in placeholders[5:]:
            continue
        buffer = buffers[placeholders.index(term.args[0]) - 5]
        dtype = dtype_of(buffer)
        if isinstance(buffer, fx.Node) and dtype is not None and dtype.is_floating_point and buffer not in found:
            found.append(buffer)
    return found


def _is_noop_mask(body: fx.GraphModule) -> bool:
    """The mask_mod flex_attention uses without a block mask (`noop_mask`: True everywhere)."""
    outputs = [n for n in body.graph.nodes if n.op == "output"]
    value = outputs[0].args[0] if len(outputs) == 1 else None
    if value is True:
        return True
    return isinstance(value, fx.Node) and op_name(value) == "new_ones" and value.kwargs.get("dtype") is torch.bool \
        and tuple(value.kwargs.get("size", value.args[1] if len(value.args) > 1 else (0,))) == ()


def _trial_reason(recipe: FlexRecipe, inputs: list) -> str | None:
    """Evaluate the score terms and the mask_mod on index grids of the site's sizes, the buffers
    zeros: why they cannot be (an op that does not vmap, a term that is not a tensor), or None."""
    try:
        with torch.no_grad():
            flex_masking(recipe, tuple(_zeros_like(n) for n in inputs))
    except Exception as error:  # noqa: BLE001 - any failure is a reason, never a crash
        first = (str(error).strip().splitlines() or [""])[0][:160]
        return (f"flex_attention's score_mod or mask_mod does not evaluate on index grids "
                f"({type(error).__name__}: {first}), so attnopt cannot build its mask.")
    return None


def _keeps_causal(recipe: FlexRecipe, inputs: list) -> bool:
    """Whether what the mask_mod and the score_mod's -inf masks keep is exactly q_idx >= kv_idx,
    read from the subgraphs alone (neither reads a buffer)."""
    if recipe.mask_mod is None and recipe.keeps is None:
        return False
    if _reads_past(recipe.mask_mod, 4) or _reads_past(recipe.keeps, 5):
        return False
    keeps_only = dataclasses.replace(recipe, terms=None, term_signs=(), has_number_terms=False, softcap=None)
    try:
        with torch.no_grad():
            keep = flex_masking(keeps_only, tuple(_zeros_like(n) for n in inputs)).mask
    except Exception:  # noqa: BLE001 - then it is not known to be causal
        return False
    if keep is None or keep.dtype != torch.bool or keep.dim() != 4:
        return False
    n, m = keep.shape[-2:]
    return bool(torch.equal(keep, torch.ones(n, m, dtype=torch.bool).tril().expand_as(keep)))


def _reads_past(body: fx.GraphModule | None, count: int) -> bool:
    """Whether `body` reads any placeholder after its first `count` (the buffers after the indices)."""
    if body is None:
        return False
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    return any(node.users for node in placeholders[count:])
