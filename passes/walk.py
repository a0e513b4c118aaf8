"""Walking the graph from a node through ops that do not change what it means.

One table (`TRANSPARENT`) says which ops a walk may pass and how: VALUE ops leave every value
where it was (casts, copies), VIEW ops regroup leading dims, LAYOUT ops move dims. Each walk
below names the kinds it passes; all share one depth limit. Adding an idiom that is "the same
tensor, spelled differently" is one row here.

A second table (`FLOW_OPS`) is wider: the ops scores or weights pass while keeping their meaning
(slices, pads, reassembly, masks, scales), which `flow_up` and `flow_down` follow from a softmax
no matcher read, to tell attention attnopt does not model from a softmax that is not attention
(passes/detect.py's `unmatched_attention`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .fx_utils import arg, normalize_dim, op_name, shape_of

VALUE, VIEW, LAYOUT = "value", "view", "layout"
TRANSPARENT: dict[str, str] = {
    "to": VALUE, "clone": VALUE, "contiguous": VALUE,
    "view": VIEW, "reshape": VIEW, "flatten": VIEW,
    "transpose": LAYOUT, "permute": LAYOUT, "mT": LAYOUT, "t": LAYOUT, "swapaxes": LAYOUT, "swapdims": LAYOUT,
}
"""Op name → how it changes a tensor without changing its values."""

VALUE_OPS = frozenset(op for op, kind in TRANSPARENT.items() if kind == VALUE)
LAYOUT_OPS = frozenset(op for op, kind in TRANSPARENT.items() if kind == LAYOUT)
WALK_DEPTH = 12
"""How many ops any walk passes before it gives up."""


def keeps_last_two(a: Any, b: Any) -> bool:
    """A view that only regroups leading (batch/head) dims, keeping (queries, keys)."""
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and len(sa) >= 2 and len(sb) >= 2 and sa[-2:] == sb[-2:]

def reaches_matmul(node: Any, depth: int = WALK_DEPTH, passes: Any = None) -> bool:
    """Whether the scores path from `node` leads up to a matmul (through values, regrouping
    views, masks and scales). `passes(node)`, when given, names more steps a walk may take: the
    node to go on from, or None (match_matmul passes a logit softcap so)."""
    while isinstance(node, fx.Node) and depth > 0:
        if node.target is torch.matmul:
            return True
        name = op_name(node)
        source = passes(node) if passes is not None else None
        if source is not None:
            node = source
        elif name in VALUE_OPS or name in ("masked_fill", "div") or (
                TRANSPARENT.get(name) == VIEW and keeps_last_two(node.args[0], node)):
            node = node.args[0]
        elif name in ("mul", "add") and len(node.args) == 2:
            return any(reaches_matmul(a, depth - 1, passes) for a in node.args
                       if isinstance(a, fx.Node) and shape_of(a) == shape_of(node))
        elif name == "where" and len(node.args) == 3:
            return any(reaches_matmul(a, depth - 1, passes) for a in node.args[1:] if isinstance(a, fx.Node))
        else:
            return False
        depth -= 1
    return False

def unwrap_key(kt_operand: fx.Node) -> tuple[fx.Node, fx.Node | None, int | None]:
    """For Kᵀ = transpose(repeat(K)), return (Kᵀ, K before repetition, its head count)."""
    if op_name(kt_operand) not in LAYOUT_OPS:
        return kt_operand, None, None
    shape = shape_of(kt_operand)
    inner = kt_operand.args[0]
    inner_shape = shape_of(inner)
    if shape is None or inner_shape is None or len(shape) != 4:
        return kt_operand, None, None
    if inner_shape[:2] != shape[:2] or inner_shape[2:] != (shape[3], shape[2]):
        return kt_operand, None, None
    _, peeled = peel_repeat(inner)
    if peeled is None:
        return kt_operand, None, None
    return kt_operand, peeled, shape_of(peeled)[1]

def peel_repeat(node: Any) -> tuple[Any, fx.Node | None]:
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

def head_split(q_operand: fx.Node, scores_shape: tuple[int, ...], softmax_lead: tuple[int, ...] = ()) -> tuple[int, int] | None:
    """(B, H) when 3-D scores come from a (B, H, N, d) tensor folded to (B·H, N, d)."""
    if len(softmax_lead) == 2:
        return softmax_lead
    if len(scores_shape) != 3:
        return None
    node = q_operand
    for _ in range(WALK_DEPTH):
        if not isinstance(node, fx.Node):
            return None
        shape = shape_of(node)
        if shape is not None and len(shape) == 4 and shape[0] * shape[1] == scores_shape[0]:
            return shape[0], shape[1]
        if TRANSPARENT.get(op_name(node)) in (VALUE, VIEW) or op_name(node) == "mul":
            node = node.args[0]
        else:
            return None
    return None

def upstream_factor(node: Any) -> float:
    """Python-number scale already applied to an operand (Q·s before QKᵀ), for the report."""
    factor = 1.0
    for _ in range(WALK_DEPTH):
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
        elif name in TRANSPARENT:
            node = node.args[0]
        else:
            break
    return factor


# ── Where a softmax's values come from and go, for softmaxes no matcher read ─────────────────

FLOW_OPS = frozenset({
    *TRANSPARENT, "getitem", "as_strided", "expand", "expand_as", "unsqueeze", "squeeze", "unflatten", "narrow",
    "select", "pad", "roll", "cat", "stack", "functional_setitem", "tril", "triu", "repeat", "repeat_interleave",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "masked_fill", "where", "dropout", "type_as",
    "float", "half", "bfloat16", "double",
})
"""Ops through which attention scores or weights keep their meaning — moved, sliced, padded,
reassembled, scaled, masked — without being projected or reduced: what `flow_up` and
`flow_down` pass. A projection (`linear`, a convolution), a normalisation or a reduction stops
them, so a router's or a classifier's softmax over `linear` logits never reaches a product."""

FLOW_DEPTH = 2 * WALK_DEPTH
"""How many ops `flow_up` and `flow_down` pass on any path (Longformer's sliding chunks take
about a dozen each way)."""

PRODUCTS = frozenset({"matmul", "einsum"})


def is_product(node: Any) -> bool:
    """A canonical product of two tensors: a matmul (canonicalize's spelling of bmm, @, ...) or an
    einsum canonicalize left as it was."""
    return isinstance(node, fx.Node) and (node.target is torch.matmul or op_name(node) == "einsum")


def _flow_args(node: fx.Node) -> list[fx.Node]:
    """The operands of a FLOW_OPS node that carry its values (not a mask's condition or a
    broadcast term of another shape), first operand first."""
    name = op_name(node)
    if name in ("cat", "stack"):
        parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [p for p in parts if isinstance(p, fx.Node)] if isinstance(parts, (list, tuple)) else []
    if name == "functional_setitem":
        return [a for a in (node.args[0], node.args[2] if len(node.args) > 2 else None) if isinstance(a, fx.Node)]
    if name == "where":
        return [a for a in node.args[1:3] if isinstance(a, fx.Node) and shape_of(a) == shape_of(node)]
    if name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"):
        return [a for a in node.args[:2] if isinstance(a, fx.Node) and shape_of(a) == shape_of(node)]
    first = node.args[0] if node.args else None
    return [first] if isinstance(first, fx.Node) else []


def flow_up(node: Any, depth: int = FLOW_DEPTH) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]]:
    """Where the values of `node` (a softmax's input) come from, nearest first: the products
    (`is_product`) and the graph inputs reached through FLOW_OPS, and the nodes passed on the
    way, in the order met (a breadth-first walk, first operands first)."""
    products, inputs, passed = [], [], []
    seen, frontier = set(), [node] if isinstance(node, fx.Node) else []
    for _ in range(depth):
        following = []
        for current in frontier:
            if current in seen:
                continue
            seen.add(current)
            if is_product(current):
                products.append(current)
            elif current.op == "placeholder":
                inputs.append(current)
            elif op_name(current) in FLOW_OPS:
                passed.append(current)
                following += _flow_args(current)
        frontier = following
    return products, inputs, passed


def flow_down(node: fx.Node, depth: int = FLOW_DEPTH) -> tuple[list[tuple[fx.Node, fx.Node]], bool, list[fx.Node]]:
    """Where the values of `node` (a softmax's weights) go, nearest first: (product, the operand
    that carries them) for each product they reach through FLOW_OPS; whether they reach the
    graph's output so; and the nodes passed on the way."""
    products, passed, leaves = [], [], False
    seen, frontier = set(), [node]
    for _ in range(depth):
        following = []
        for current in frontier:
            for user in current.users:
                if user in seen:
                    continue
                if is_product(user):
                    products.append((user, current))
                    seen.add(user)
                elif user.op == "output":
                    leaves = True
                elif op_name(user) in FLOW_OPS and current in _flow_args(user):
                    seen.add(user)
                    passed.append(user)
                    following.append(user)
        frontier = following
    return products, leaves, passed
