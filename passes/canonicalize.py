"""Rewrite equivalent spellings of the attention building blocks to one form each.

After this pass, detection matches meaning, not spelling:

    @ / matmul / Tensor.matmul / bmm / mm / einsum (two operands) → torch.matmul
    baddbmm(input, b1, b2, beta, alpha)                        → alpha·(b1 @ b2) + beta·input
    x / c   (c a number, 0-dim tensor or (..., 1, 1) tensor)    → x · (1/c)
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
import operator
import string
from typing import Any, Callable

import torch
import torch.fx as fx

from .fx_utils import (
    ALIASING_OPS, arg, body_module, copy_meta, has_side_effects, is_scalar, mutated_by, op_name, propagate_body_meta,
    searched_body, shape_of, tensor_meta, dtype_of,
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
    _functionalise(graph)
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
    plan = _einsum_plan(equation)
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


def _einsum_plan(equation: str) -> tuple[list[int], list[int], list[int]] | None:
    """Permutations that turn `x,y->out` into `(batch,i,c) @ (batch,c,j)` → out, or None."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    if inputs.count(",") != 1:
        return None
    xs, ys = inputs.split(",")
    if any(len(set(s)) != len(s) for s in (xs, ys, out)) or not set(xs + ys + out) <= set(string.ascii_letters):
        return None
    batch = [c for c in xs if c in ys and c in out]
    contracted = [c for c in xs if c in ys and c not in out]
    x_free = [c for c in xs if c not in ys]
    y_free = [c for c in ys if c not in xs]
    if len(contracted) != 1 or len(x_free) != 1 or len(y_free) != 1:
        return None
    if set(out) != set(batch + x_free + y_free):
        return None
    x_order = [xs.index(c) for c in batch + x_free + contracted]
    y_order = [ys.index(c) for c in batch + contracted + y_free]
    produced = batch + x_free + y_free
    out_order = [produced.index(c) for c in out]
    return x_order, y_order, out_order


def _baddbmm(graph: fx.Graph, node: fx.Node) -> None:
    if op_name(node) != "baddbmm":
        return
    base, b1, b2 = node.args[:3]
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
    if not isinstance(x, fx.Node) or not (is_scalar(divisor) or _per_head_tensor(divisor)):
        return
    if isinstance(divisor, (int, float)):
        if divisor == 0:
            return
        _replace(graph, node, lambda: _call(graph, torch.mul, x, 1.0 / divisor), form="div")
    else:
        _replace(graph, node, lambda: _call(graph, torch.mul, x, _call(graph, torch.reciprocal, divisor)), form="div")


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
    if op_name(node) != "softmax" or node.target is torch.softmax:
        return
    x = node.args[0]
    dim = arg(node, 1, "dim")
    dtype = node.kwargs.get("dtype")
    if len(node.args) > 3 and isinstance(node.args[3], torch.dtype):
        dtype = node.args[3]
    if not isinstance(dim, int):
        return

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
    shifted, dim = node.args[0], arg(node, 1, "dim")
    if not isinstance(dim, int):
        return
    if op_name(shifted) != "sub" or len(shifted.args) != 2 or shifted.kwargs:
        return
    x, peak = shifted.args
    while isinstance(peak, fx.Node) and op_name(peak) == "detach":
        peak = peak.args[0]
    reduced = _reduced_over(peak, {"max", "amax"}) if isinstance(peak, fx.Node) else None
    if reduced is None or reduced[0] is not x or not _same_dim(reduced[1], dim, x) or shape_of(x) != shape_of(shifted):
        return
    if dtype_of(shifted) not in (torch.float32, torch.float64):  # half rounds x - max(x) where softmax does not
        return
    node.replace_input_with(shifted, x)


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
