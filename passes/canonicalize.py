"""Rewrite equivalent spellings of the attention building blocks to one form each.

After this pass, detection matches meaning, not spelling:

    keyword arguments of the ops below (torch.baddbmm(input=b, batch1=q, batch2=k)),
    x.where(cond, y)                                            → positional, torch.where(cond, x, y)
    ~m spelled twice (mask negated before and after a softmax)  → one node
    @ / matmul / Tensor.matmul / bmm / mm / einsum (two operands, `...` too) → torch.matmul
    baddbmm(input, b1, b2, beta, alpha)                        → alpha·(b1 @ b2) + beta·input
    x / c   (c a number, 0-dim tensor or (..., 1, 1) tensor,
             or a number the graph computes, e.g. from sizes)   → x · (1/c)
    F.softmax / torch.softmax / Tensor.softmax(dtype=...)       → torch.softmax (after a cast)
    softmax(x - max(x)) (the row max subtracted first)          → torch.softmax(x)
    exp(x - max(x)) / sum(exp(...))  (softmax written by hand)  → torch.softmax
    .float() / .half() / .to(dtype) / .type(dtype) / .type_as(t) → Tensor.to(dtype)
    dropout in eval                                             → removed
    in-place writes (add_, +=, masked_fill_, x[i] = v, …) to a
    fresh, unaliased tensor                                     → out-of-place, later reads redirected
    a.expand_as(s), zeros_like(s)                               → the same, with s's shape spelled out

Each canonical node remembers the spelling it replaced in `node.meta["attnopt_form"]`, so the
report can say how the user wrote it. Every rule is exact (or differs by one rounding, for
x/c → x·(1/c)); the rewritten model is checked end to end against the original afterwards.
"""

from __future__ import annotations

import copy
import math
import operator
import string
from typing import Any, Callable

import torch
import torch.fx as fx

from .fx_utils import (
    ALIASING_OPS, alias_root, arg, body_module, copy_meta, has_side_effects, is_scalar, mutated_by, number_valued, op_name,
    propagate_body_meta, searched_body, shape_of, tensor_meta, dtype_of,
)

_MATMUL_SPELLINGS = {"matmul", "bmm", "mm", "__matmul__"}
_CAST_TO = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_OUT_OF_PLACE = {"add_": torch.add, "sub_": torch.sub, "mul_": torch.mul, "div_": torch.div,
                 "masked_fill_": torch.Tensor.masked_fill}


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Apply every rule once, in a fixed order, then clean up dead nodes.

    The bodies of searched higher-order ops (torch.utils.checkpoint; see
    fx_utils.SEARCHED_HIGHER_ORDER_OPS) are first replaced by copies that `gm` alone owns, one
    per call, and canonicalized the same way, with their node metadata filled in; the modules
    `gm` shared them with are left untouched.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        body = searched_body(node)
        if body is not None:
            owned = _own_body(gm, node, body)
            propagate_body_meta(node, owned)
            canonicalize(owned)
            propagate_body_meta(node, owned)
    # _manual_softmax runs before _division: its `exps / exps.sum(...)` must still be a division
    # (with a single query the sum is (..., 1, 1), which _division would fold into a product).
    for node in list(graph.nodes):
        _positional(graph, node)
    _functionalise(graph)
    _one_negation(graph)
    for rule in (_shape_only_uses, _einsum, _baddbmm, _matmul, _manual_softmax,
                 _division, _casts, _softmax, _max_shift, _eval_dropout):
        for node in list(graph.nodes):
            if node.graph is graph:
                rule(graph, node)
    graph.eliminate_dead_code(is_impure_node=has_side_effects)
    graph.lint()
    gm.recompile()
    return gm


def _own_body(gm: fx.GraphModule, call: fx.Node, body: fx.Node) -> fx.GraphModule:
    """Give the higher-order op `call` its own copy of the subgraph module it calls."""
    original = body_module(gm, body)
    owned = fx.GraphModule(original, copy.deepcopy(original.graph))
    if len(body.users) == 1 and "." not in body.target:
        setattr(gm, body.target, owned)
        return owned
    name = _free_name(gm, f"{body.target.replace('.', '_')}_attnopt")
    gm.add_submodule(name, owned)
    with gm.graph.inserting_before(call):
        attribute = gm.graph.get_attr(name)
    attribute.meta.update(body.meta)
    call.replace_input_with(body, attribute)
    return owned


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, index = base, 0
    while hasattr(gm, name):
        index += 1
        name = f"{base}_{index}"
    return name


# The leading parameters of the ops the rules and the matchers read by position, looked up by the
# call's target, else by its op name (a method's first parameter is `self`, passed positionally).
# Keyword-only parameters (baddbmm's beta and alpha, add's alpha, softmax's dtype) stay keywords.
_PARAMETERS: dict[Any, tuple[str, ...]] = {
    torch.nn.functional.softmax: ("input", "dim", "_stacklevel", "dtype"),
    torch.nn.functional.dropout: ("input", "p", "training", "inplace"),
    torch.dropout: ("input", "p", "train"),
    "softmax": ("input", "dim", "dtype"), "matmul": ("input", "other"), "mm": ("input", "mat2"),
    "bmm": ("input", "mat2"), "baddbmm": ("input", "batch1", "batch2"), "addmm": ("input", "mat1", "mat2"),
    "mul": ("input", "other"), "add": ("input", "other"), "sub": ("input", "other"), "div": ("input", "other"),
    "masked_fill": ("input", "mask", "value"), "where": ("condition", "input", "other"), "cat": ("tensors", "dim"),
    "exp": ("input",), "tanh": ("input",), "reciprocal": ("input",), "sum": ("input", "dim", "keepdim"),
    "max": ("input", "dim", "keepdim"), "amax": ("input", "dim", "keepdim"),
    "transpose": ("input", "dim0", "dim1"), "permute": ("input", "dims"),
}


def _positional(graph: fx.Graph, node: fx.Node) -> None:
    """Pass the leading parameters of the ops in `_PARAMETERS` by position, as every rule and
    matcher reads them (`alibi.baddbmm(batch1=q, batch2=k, alpha=s)` → `alibi.baddbmm(q, k, alpha=s)`);
    `x.where(cond, y)`, whose `self` is the kept value, → `torch.where(cond, x, y)`."""
    if node.op not in ("call_function", "call_method"):
        return
    if node.op == "call_method" and node.target == "where":
        names = ("self", "condition", "other")
    else:
        names = _parameters_of_target(node) or _PARAMETERS.get(op_name(node))
    if names is None:
        return
    args, kwargs = list(node.args), dict(node.kwargs)
    for name in names[len(args):]:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    if node.op == "call_method" and node.target == "where" and len(args) == 3 and not kwargs:
        kept, condition, other = args
        _replace(graph, node, lambda: _call(graph, torch.where, condition, kept, other), form="where")
        return
    if len(args) != len(node.args):
        node.args, node.kwargs = tuple(args), kwargs


def _one_negation(graph: fx.Graph) -> None:
    """`~m` (or `m.logical_not()`) spelled twice → one node, so that a mask negated once for a
    fill before the softmax and again for a zeroing after it reads as one mask. Not for a mask
    written in place anywhere (its two negations may see two values)."""
    written = {alias_root(mutated_by(node)) for node in graph.nodes if mutated_by(node) is not None}
    first: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if op_name(node) not in ("bitwise_not", "logical_not") or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or alias_root(source) in written:
            continue
        key = (op_name(node), source)
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node


def _parameters_of_target(node: fx.Node) -> tuple[str, ...] | None:
    if node.op != "call_function":
        return None
    try:
        return _PARAMETERS.get(node.target)
    except TypeError:  # an unhashable target
        return None


def _replace(graph: fx.Graph, node: fx.Node, build: Callable[[], fx.Node], form: str | None = None) -> fx.Node:
    """Insert the canonical node(s) built by `build` before `node` and retire `node`."""
    with graph.inserting_before(node):
        new = build()
    new.meta["attnopt_form"] = node.meta.get("attnopt_form") or form or op_name(node)
    copy_meta(node, new)
    # The canonical node computes the same value: keep its shape and dtype visible to the rules
    # that run later in this pass (a matmul respelled from `@` must still have a shape).
    for key in ("val", "example_value"):
        if key in node.meta and key not in new.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _call(graph: fx.Graph, target, *args, **kwargs) -> fx.Node:
    return graph.call_function(target, args, kwargs)


_LIKE = {"zeros_like": torch.zeros, "ones_like": torch.ones, "empty_like": torch.empty}


def _shape_only_uses(graph: fx.Graph, node: fx.Node) -> None:
    """`a.expand_as(s)` and `zeros_like(s)` read only the shape of `s`: spell the shape out, so
    that the scores are not kept alive (nor mistaken as used) by a mask built from their shape."""
    name = op_name(node)
    if name == "expand_as" and len(node.args) == 2 and shape_of(node.args[1]) is not None:
        source, shape = node.args[0], shape_of(node.args[1])
        _replace(graph, node, lambda: graph.call_method("expand", (source, *shape)), form="expand_as")
    elif name in _LIKE and len(node.args) == 1 and set(node.kwargs) <= {"dtype"}:
        meta = tensor_meta(node.args[0])
        if meta is None:
            return
        dtype = node.kwargs.get("dtype", meta.dtype)
        factory = _LIKE[name]
        _replace(graph, node, lambda: _call(graph, factory, tuple(meta.shape), dtype=dtype, device=meta.device), form=name)


def _functionalise(graph: fx.Graph) -> None:
    """Turn each in-place write to a fresh, unaliased tensor into an out-of-place op, and make every
    later read of that tensor read the new value instead.

    `s.masked_fill_(~keep, -inf); softmax(s)` then reads as `softmax(s.masked_fill(~keep, -inf))`,
    so detection sees the mask. Writes to inputs, parameters, buffers or views (whose storage
    someone else may see) stay in place; detection refuses the sites they touch, and
    dead-code elimination keeps them (fx_utils.has_side_effects).
    """
    position = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        target = mutated_by(node)
        if target is None or not _fresh_and_unaliased(target, node, position):
            continue
        with graph.inserting_before(node):
            new = _out_of_place(graph, node, target)
        if new is None:
            continue
        new.meta["attnopt_form"] = op_name(node)
        copy_meta(node, new)
        if "val" in target.meta:
            new.meta["val"] = target.meta["val"]
        for user in list(target.users):
            if user is not node and user is not new and position.get(user, -1) > position[node]:
                user.replace_input_with(target, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _fresh_and_unaliased(target: fx.Node, write: fx.Node, position: dict[fx.Node, int],
                         via: fx.Node | None = None) -> bool:
    """Nothing but `write` and the reads after it can see `target`'s storage: it is computed here
    (not an input, attribute or parameter), no view of it taken before `write` could observe the
    write, and a view is written only when its base is seen through that view alone
    (`s = bmm(...).view(b, h, n, m); s += bias`)."""
    if target.op not in ("call_function", "call_method") or mutated_by(target) is not None or "val" not in target.meta:
        return False
    for user in target.users:
        if user is write or user is via or position.get(user, -1) > position[write]:
            continue
        if op_name(user) in ALIASING_OPS or mutated_by(user) is not None:
            return False
    if op_name(target) in ALIASING_OPS:
        base = target.args[0] if target.args else None
        if not isinstance(base, fx.Node) or len(base.users) != 1:
            return False
        return _fresh_and_unaliased(base, write, position, via=target)
    return True


def _out_of_place(graph: fx.Graph, write: fx.Node, target: fx.Node) -> fx.Node | None:
    """The value `write` leaves in `target`, computed without writing: the plain op where one
    exists with the same result dtype (so detection can read it), else a write to a copy."""
    name = op_name(write)
    args = list(write.args)
    if write.target is operator.setitem:
        return graph.call_function(functional_setitem, tuple(args))
    if write.kwargs.get("out") is not None:
        return None  # `out=` writes are rare here: leave them in place (refused where they matter)
    plain = _OUT_OF_PLACE.get(name)
    if plain is not None and len(args) >= 2 and _keeps_dtype(target, args[1:], write.kwargs):
        return graph.call_function(plain, tuple(args), dict(write.kwargs))
    method = write.target if write.op == "call_method" else getattr(write.target, "__name__", None)
    if write.op == "call_function" and write.target in _OPERATOR_METHODS:
        method = _OPERATOR_METHODS[write.target]
    if not isinstance(method, str):
        return None
    kwargs = {k: v for k, v in write.kwargs.items() if k != "inplace"}
    if write.kwargs.get("inplace") is True:
        return graph.call_function(write.target, tuple(args), kwargs)  # F.relu(x, inplace=False)
    return graph.call_function(functional_inplace, (method, *args), kwargs)


_OPERATOR_METHODS = {operator.iadd: "add_", operator.isub: "sub_", operator.imul: "mul_",
                     operator.itruediv: "div_", operator.ifloordiv: "floor_divide_", operator.imod: "remainder_",
                     operator.ipow: "pow_", operator.iand: "bitwise_and_", operator.ior: "bitwise_or_",
                     operator.ixor: "bitwise_xor_", operator.ilshift: "bitwise_left_shift_",
                     operator.irshift: "bitwise_right_shift_", operator.imatmul: "__imatmul__"}


def _keeps_dtype(target: fx.Node, others: list, kwargs: dict) -> bool:
    """The out-of-place op gives the same dtype as the in-place one (which keeps `target`'s)."""
    meta = tensor_meta(target)
    if meta is None:
        return False
    if kwargs and set(kwargs) - {"alpha", "value", "mask"}:
        return False
    if any(isinstance(o, fx.Node) and tensor_meta(o) is None for o in others):
        return False
    # the operand combined with the target: the last one (masked_fill's value, add's other)
    other = tensor_meta(others[-1]) if isinstance(others[-1], fx.Node) else others[-1]
    if not isinstance(other, (int, float, bool, torch.Tensor)):
        return False
    try:
        return torch.result_type(meta, other) == meta.dtype
    except (TypeError, RuntimeError):
        return False


def functional_inplace(method: str, target: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`target.<method>(*args)` applied to a copy: an in-place op made out-of-place, with the
    in-place op's exact semantics (dtype kept, broadcasting only of the other operands)."""
    result = target.clone()
    getattr(result, method)(*args, **kwargs)
    return result


def functional_setitem(target: torch.Tensor, index, value) -> torch.Tensor:
    """`target[index] = value` on a copy of `target`."""
    result = target.clone()
    result[index] = value
    return result


def _matmul(graph: fx.Graph, node: fx.Node) -> None:
    name = op_name(node)
    if name not in _MATMUL_SPELLINGS or node.target is torch.matmul:
        return
    if len(node.args) != 2 or node.kwargs:
        return
    a, b = node.args
    form = "matmul" if name == "__matmul__" else name
    _replace(graph, node, lambda: _call(graph, torch.matmul, a, b), form=form)


def _einsum_operands(node: fx.Node) -> tuple[str, Any, Any] | None:
    """(equation, x, y) of a two-operand einsum, spelled `einsum(eq, x, y)` or `einsum(eq, [x, y])`."""
    if op_name(node) != "einsum" or node.kwargs or not node.args or not isinstance(node.args[0], str):
        return None
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2:
        return None
    return node.args[0], operands[0], operands[1]


def _einsum(graph: fx.Graph, node: fx.Node) -> None:
    """Two-operand einsum with one free label per side and one contracted label → matmul."""
    operands = _einsum_operands(node)
    if operands is None:
        return
    equation, x, y = operands
    ranks = [tensor_meta(t).dim() if tensor_meta(t) is not None else None for t in (x, y)]
    plan = _einsum_plan(equation, *ranks)
    if plan is None:
        return
    x_order, y_order, out_order = plan

    def build() -> fx.Node:
        left = _call(graph, torch.permute, x, x_order) if x_order != list(range(len(x_order))) else x
        right = _call(graph, torch.permute, y, y_order) if y_order != list(range(len(y_order))) else y
        product = _call(graph, torch.matmul, left, right)
        if out_order != list(range(len(out_order))):
            product.meta["attnopt_form"] = "einsum"
            copy_meta(node, product)
            return _call(graph, torch.permute, product, out_order)
        return product

    new = _replace(graph, node, build, form="einsum")
    # The matmul itself is what detection looks at: make sure it carries the spelling.
    for candidate in [new, *new.all_input_nodes]:
        if candidate.target is torch.matmul:
            candidate.meta["attnopt_form"] = "einsum"
            copy_meta(node, candidate)


def _einsum_labels(subscripts: str, rank: int | None, n_broadcast: int) -> list[str] | None:
    """The labels of one operand's dims, its `...` spelled out as the last of `n_broadcast`
    broadcast dims ("…0", "…1", ...; right-aligned, as einsum and matmul broadcast them)."""
    if "..." not in subscripts:
        return list(subscripts) if "." not in subscripts else None
    before, _, after = subscripts.partition("...")
    if "." in before + after:
        return None
    if rank is None:
        return None
    n = rank - len(before) - len(after)
    if n < 0 or n > n_broadcast:
        return None
    return [*before, *(f"…{i}" for i in range(n_broadcast - n, n_broadcast)), *after]


def _einsum_plan(equation: str, x_rank: int | None = None, y_rank: int | None = None
                 ) -> tuple[list[int], list[int], list[int]] | None:
    """Permutations that turn `x,y->out` into `(batch,i,c) @ (batch,c,j)` → out, or None.
    `...` (the operands' ranks given) stands for broadcast batch dims, kept in front of the
    matmul's operands where matmul broadcasts them as einsum does."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        return None
    inputs, out = equation.split("->")
    if inputs.count(",") != 1:
        return None
    x_sub, y_sub = inputs.split(",")
    named = set((x_sub + y_sub + out).replace("...", ""))
    if not named <= set(string.ascii_letters):
        return None
    n_broadcast = 0
    for sub, rank in ((x_sub, x_rank), (y_sub, y_rank)):
        if "..." in sub:
            if rank is None:
                return None
            n_broadcast = max(n_broadcast, rank - len(sub.replace("...", "")))
    if ("..." in out) != ("..." in x_sub or "..." in y_sub):
        return None
    xs = _einsum_labels(x_sub, x_rank, n_broadcast)
    ys = _einsum_labels(y_sub, y_rank, n_broadcast)
    outs = _einsum_labels(out, len(out.replace("...", "")) + n_broadcast if "..." in out else None, n_broadcast)
    if xs is None or ys is None or outs is None:
        return None
    if any(len(set(s)) != len(s) for s in (xs, ys, outs)):
        return None
    broadcast = [f"…{i}" for i in range(n_broadcast)]
    named_x = [c for c in xs if not c.startswith("…")]
    named_y = [c for c in ys if not c.startswith("…")]
    batch = [c for c in named_x if c in named_y and c in outs]
    contracted = [c for c in named_x if c in named_y and c not in outs]
    x_free = [c for c in named_x if c not in named_y]
    y_free = [c for c in named_y if c not in named_x]
    if len(contracted) != 1 or len(x_free) != 1 or len(y_free) != 1:
        return None
    if set(outs) != set(broadcast + batch + x_free + y_free):
        return None
    x_order = [xs.index(c) for c in [b for b in broadcast if b in xs] + batch + x_free + contracted]
    y_order = [ys.index(c) for c in [b for b in broadcast if b in ys] + batch + contracted + y_free]
    produced = broadcast + batch + x_free + y_free
    out_order = [produced.index(c) for c in outs]
    return x_order, y_order, out_order


def _baddbmm(graph: fx.Graph, node: fx.Node) -> None:
    if op_name(node) != "baddbmm" or len(node.args) != 3 or set(node.kwargs) - {"beta", "alpha"}:
        return
    base, b1, b2 = node.args
    beta = node.kwargs.get("beta", 1)
    alpha = node.kwargs.get("alpha", 1)
    if not all(isinstance(v, (int, float)) for v in (alpha, beta)):
        return

    def build() -> fx.Node:
        product = _call(graph, torch.matmul, b1, b2)
        product.meta["attnopt_form"] = "baddbmm"
        copy_meta(node, product)
        scaled = _call(graph, torch.mul, product, alpha) if alpha != 1 else product
        if beta == 0:  # torch ignores `input` entirely when beta == 0
            return scaled if scaled is not product else _call(graph, torch.mul, product, 1)
        bias = _call(graph, torch.mul, base, beta) if beta != 1 else base
        return _call(graph, torch.add, scaled, bias)

    _replace(graph, node, build, form="baddbmm")


def _division(graph: fx.Graph, node: fx.Node) -> None:
    if op_name(node) not in ("div", "truediv") or len(node.args) != 2 or node.kwargs:
        return
    x, divisor = node.args
    if not isinstance(x, fx.Node):
        return
    if number_valued(divisor) and (dtype_of(x) or torch.bool).is_floating_point:
        # a number computed in the graph (a scale from symbolic sizes): its reciprocal, per call
        _replace(graph, node, lambda: _call(graph, torch.mul, x, _call(graph, reciprocal_number, divisor)), form="div")
        return
    if not (is_scalar(divisor) or _per_head_tensor(divisor)):
        return
    if isinstance(divisor, (int, float)):
        if divisor == 0:
            return
        _replace(graph, node, lambda: _call(graph, torch.mul, x, 1.0 / divisor), form="div")
    else:
        _replace(graph, node, lambda: _call(graph, torch.mul, x, _call(graph, torch.reciprocal, divisor)), form="div")


def reciprocal_number(value: float) -> float:
    """1 / value for a number the graph computes, ±inf for ±0: `x · reciprocal_number(c)` is
    `x / c` up to one rounding, also where c is 0 (inf, -inf or NaN as torch divides)."""
    return 1.0 / value if value != 0 else math.copysign(math.inf, value)


def _per_head_tensor(value) -> bool:
    """A tensor constant over the last two dims ((..., 1, 1) or one element): dividing the
    scores by it is a per-head (or per-batch) scale, the same as multiplying by its reciprocal."""
    meta = tensor_meta(value)
    if meta is None or not meta.dtype.is_floating_point:
        return False
    shape = tuple(meta.shape)
    return shape == (1,) or (len(shape) >= 2 and shape[-2:] == (1, 1))


def _cast_target(node: fx.Node) -> torch.dtype | None:
    """The dtype a cast node converts to, or None when `node` is not a pure dtype cast."""
    name = op_name(node)
    if name in _CAST_TO and len(node.args) == 1 and not node.kwargs:
        return _CAST_TO[name]
    if name == "type" and node.op == "call_method" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return node.args[1]
    if name == "type_as" and len(node.args) == 2:
        meta = tensor_meta(node.args[1])
        return meta.dtype if meta is not None else None
    if name == "to" and node.op == "call_method":
        dtypes = [a for a in [*node.args[1:], *node.kwargs.values()] if isinstance(a, torch.dtype)]
        others = [a for a in node.args[1:] if not isinstance(a, torch.dtype)]
        if len(dtypes) == 1 and not others and set(node.kwargs) <= {"dtype"}:
            return dtypes[0]
        if len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], fx.Node):
            meta = tensor_meta(node.args[1])
            source = tensor_meta(node.args[0])
            if meta is not None and source is not None and meta.device == source.device:
                return meta.dtype
    return None


def _casts(graph: fx.Graph, node: fx.Node) -> None:
    if node.target is torch.Tensor.to and node.op == "call_function":
        return
    dtype = _cast_target(node)
    if dtype is None:
        return
    source = node.args[0]
    _replace(graph, node, lambda: _call(graph, torch.Tensor.to, source, dtype), form=op_name(node))


def _softmax(graph: fx.Graph, node: fx.Node) -> None:
    """Every softmax → torch.softmax(x, dim), its `dtype` (F.softmax's fourth parameter,
    torch.softmax's and Tensor.softmax's third) a cast of x before it, as torch applies it."""
    if op_name(node) != "softmax" or not node.args:
        return
    x = node.args[0]
    dim = arg(node, 1, "dim")
    dtype = arg(node, 3 if node.target is torch.nn.functional.softmax else 2, "dtype")
    if not isinstance(dim, int) or not (dtype is None or isinstance(dtype, torch.dtype)):
        return
    if node.target is torch.softmax and len(node.args) == 2 and not node.kwargs:
        return  # canonical already

    def build() -> fx.Node:
        source = _call(graph, torch.Tensor.to, x, dtype) if dtype is not None else x
        return _call(graph, torch.softmax, source, dim)

    _replace(graph, node, build, form="softmax")


def _max_shift(graph: fx.Graph, node: fx.Node) -> None:
    """softmax(x - max(x, d), d) → softmax(x, d): the same function, bit for bit in fp32/fp64 —
    torch.softmax subtracts the row max itself, and a row of -inf is NaN either way (in half
    precision `x - max(x)` is rounded to half, where softmax subtracts in fp32: left as written).
    Attention-sink models shift their concatenated logits so; the shift may be detached."""
    if node.target is not torch.softmax or not isinstance(node.args[0], fx.Node):
        return
    dim = arg(node, 1, "dim")
    x = unshifted(node.args[0], dim) if isinstance(dim, int) else None
    if x is not None:
        node.replace_input_with(node.args[0], x)


def unshifted(shifted: fx.Node, dim: int = -1) -> fx.Node | None:
    """x when `shifted` is `x - max(x, dim, keepdim=True)` (the max maybe detached) in fp32/fp64,
    of x's shape: what a softmax over `dim` computes bit for bit without the shift (`_max_shift`;
    match_matmul reads it where the shift reaches the softmax through a cast)."""
    if op_name(shifted) != "sub" or len(shifted.args) != 2 or shifted.kwargs:
        return None
    if dtype_of(shifted) not in (torch.float32, torch.float64):  # half rounds x - max(x) where softmax does not
        return None
    if not shape_of(shifted):  # unknown, or 0-dim: no row to softmax over
        return None
    x, peak = shifted.args
    while isinstance(peak, fx.Node) and op_name(peak) == "detach":
        peak = peak.args[0]
    reduced = _reduced_over(peak, {"max", "amax"}) if isinstance(peak, fx.Node) else None
    if reduced is None or reduced[0] is not x or not _same_dim(reduced[1], dim, x) or shape_of(x) != shape_of(shifted):
        return None
    return x


def _reduced_over(node: fx.Node, names: set[str]) -> tuple[fx.Node, int] | None:
    """(input, dim) when `node` is a keepdim reduction named in `names` over one dim."""
    if op_name(node) == "getitem" and node.args[1] in (0, "values"):
        node = node.args[0]
    elif op_name(node) == "getattr" and node.args[1] == "values":
        node = node.args[0]
    if op_name(node) not in names:
        return None
    dim = arg(node, 1, "dim")
    keepdim = arg(node, 2, "keepdim", False)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or keepdim is not True:
        return None
    return node.args[0], dim


def _manual_softmax(graph: fx.Graph, node: fx.Node) -> None:
    """exp(x - max(x, d)) / sum(exp(...), d) → softmax(x, d).

    Without the max subtraction it is another function (its exp overflows above ~88 and a row
    of very negative scores is 0/0): left as written, marked for detection to report."""
    if op_name(node) not in ("div", "truediv") or len(node.args) != 2:
        return
    numerator, denominator = node.args
    if not isinstance(numerator, fx.Node) or op_name(numerator) != "exp":
        return
    summed = _reduced_over(denominator, {"sum"}) if isinstance(denominator, fx.Node) else None
    if summed is None or summed[0] is not numerator:
        return
    dim = summed[1]
    exponent = numerator.args[0]
    x = None
    if isinstance(exponent, fx.Node) and op_name(exponent) == "sub":
        left, right = exponent.args
        peak = _reduced_over(right, {"max", "amax"}) if isinstance(right, fx.Node) else None
        if peak is not None and peak[0] is left and _same_dim(peak[1], dim, left):
            x = left
    if x is None:
        node.meta["attnopt_unstable_softmax"] = numerator  # the exp: later rules may respell its input
        return
    if not _same_dim(dim, dim, x) or shape_of(x) != shape_of(node):
        return
    _replace(graph, node, lambda: _call(graph, torch.softmax, x, dim), form="manual-softmax")


def _same_dim(a: int, b: int, node: fx.Node) -> bool:
    shape = shape_of(node)
    if shape is None:
        return False
    ndim = len(shape)
    return (a % ndim) == (b % ndim)


def _eval_dropout(graph: fx.Graph, node: fx.Node) -> None:
    """Dropout that does nothing goes; live dropout becomes F.dropout(x, p, True)."""
    if node.target is torch.nn.functional.dropout:
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    elif node.target is torch.dropout or (node.op == "call_method" and node.target == "dropout"):
        p, training = arg(node, 1, "p"), arg(node, 2, "train")
    else:
        return
    if not isinstance(p, (int, float)) or not isinstance(training, bool):
        return
    source = node.args[0]
    if training is False or p == 0:
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    elif node.target is not torch.nn.functional.dropout or len(node.args) != 3 or node.kwargs:
        _replace(graph, node, lambda: _call(graph, torch.nn.functional.dropout, source, float(p), True), form="dropout")
