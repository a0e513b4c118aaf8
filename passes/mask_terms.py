"""Masks on the scores: their terms, whether they are constants, what kind they are, causality.

A mask is named causal only when it is built from constants (through tril/triu) and its value,
computed here, blocks exactly the keys after each query. A fill must be a constant mask value:
a fill held in a tensor is data unless it is built from constants alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from attnopt.numerics import MASKED_AT_OR_BELOW

from .fx_utils import higher_order_name, meta_value, op_name, shape_of, tensor_meta


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

def constant_fills(terms: list[MaskTerm], dag: nx.DiGraph, constants: dict[fx.Node, torch.Tensor]) -> str | None:
    """Make every fill a Python number, or say why not: a fill held in a tensor is data (an
    input, a buffer, `q.mean()`) unless it is built from constants alone; it must be a mask
    value (≤ -1e4, or -inf); and one site fills with one value (scaled as the scores are)."""
    filled = set()
    for term in terms:
        if term.kind == "add":
            continue
        fill = term.fill
        if isinstance(fill, fx.Node):
            value = constant_value(fill, dag)
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
            return (f"the filled scores are then multiplied by `{term.factor_nodes[0].name}`, so the masked value "
                    "is not a known constant.")
        filled.add(term.fill * term.factor)
    if len(filled) > 1:
        return f"the scores are filled with several different values ({sorted(filled)}), which attnopt does not model."
    return None

def term_inputs(terms: list[MaskTerm]) -> list[fx.Node]:
    nodes = []
    for term in terms:
        nodes += [x for x in (term.value, term.fill) if isinstance(x, fx.Node)]
        nodes += term.factor_nodes
    return nodes

def scales_per_head(factor: Any, scores_shape: tuple[int, ...] | None) -> bool:
    """A tensor factor that is constant over queries and keys can be folded into Q."""
    shape = shape_of(factor)
    if shape is None or scores_shape is None:
        return False
    if len(shape) < 2:
        return len(shape) == 0 or shape == (1,)
    return shape[-1] == 1 and shape[-2] == 1 and len(shape) <= len(scores_shape)

def single_value(factor: Any) -> bool:
    shape = shape_of(factor)
    return shape is not None and math.prod(shape) == 1

def mask_kind(terms: list[MaskTerm], scores_shape: tuple[int, ...], dag: nx.DiGraph) -> tuple[str | None, bool]:
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
    if is_causal(terms, scores_shape, dag):
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

def is_causal(terms: list[MaskTerm], scores_shape: tuple[int, ...], dag: nx.DiGraph) -> bool:
    """True when the terms together block exactly the keys j > i for query i (and nothing else)."""
    n, m = scores_shape[-2:]
    blocked = None
    for term in terms:
        if term.factor_nodes or term.factor <= 0 or not _built_from_tril(term.value, dag):
            return False
        value = constant_value(term.value, dag)
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
            fill = constant_value(term.fill, dag)
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

def constant_value(node: Any, dag: nx.DiGraph) -> Any:
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
