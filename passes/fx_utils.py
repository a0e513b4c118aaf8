"""Small helpers every pass needs: what a node computes, its shape, where it came from.

Dynamo graphs spell one operation several ways (`operator.matmul`, `torch.matmul`, the method
`"matmul"`); `op_name` folds those into one lower-case name so the passes can dispatch on a
table instead of a ladder of `if`s.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

_OPERATOR_NAMES = {
    operator.matmul: "matmul", operator.imatmul: "matmul",
    operator.mul: "mul", operator.imul: "mul_",
    operator.truediv: "div", operator.itruediv: "div_",
    operator.add: "add", operator.iadd: "add_",
    operator.sub: "sub", operator.isub: "sub_",
    operator.getitem: "getitem", operator.invert: "bitwise_not", operator.neg: "neg",
}

# Functions whose name alone says what they do, wherever they live.
_FUNCTION_NAMES = {
    torch.nn.functional.softmax: "softmax",
    torch.nn.functional.dropout: "dropout",
    torch.nn.functional.scaled_dot_product_attention: "scaled_dot_product_attention",
    torch.nn.functional.multi_head_attention_forward: "multi_head_attention_forward",
}


def op_name(node: fx.Node) -> str | None:
    """A spelling-independent name for what `node` computes, or None for non-calls."""
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    target = node.target
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    if target in _FUNCTION_NAMES:
        return _FUNCTION_NAMES[target]
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return name.split(".")[0]
    return name


def meta_value(node: Any) -> Any:
    """The fake (or example) value recorded for `node`, if any."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def tensor_meta(node: Any) -> torch.Tensor | None:
    value = meta_value(node)
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    value = tensor_meta(node)
    return tuple(int(s) for s in value.shape) if value is not None else None


def dtype_of(node: Any) -> torch.dtype | None:
    value = tensor_meta(node)
    return value.dtype if value is not None else None


def is_scalar(value: Any) -> bool:
    """A Python number, or a 0-dim tensor node: something that scales without broadcasting."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    meta = tensor_meta(value)
    return meta is not None and meta.dim() == 0


def number_valued(value: Any) -> bool:
    """A graph node whose value is a Python number, not a tensor: a scale computed from sizes in
    a graph dynamo traced with symbolic ones (`math.sqrt(x.size(-1))` is `_sym_sqrt(size)`).
    It is a value of each call, read by whoever needs it at run time — never frozen."""
    value = meta_value(value) if isinstance(value, fx.Node) else None
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument `name` (position `index`) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph (edges from producer to consumer) for ancestry questions."""
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        for source in node.all_input_nodes:
            dag.add_edge(source, node)
    return dag


def nodes_between(dag: nx.DiGraph, inputs: list[Any], output: fx.Node) -> list[fx.Node]:
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


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module the node was traced from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    path = re.sub(r"^L\['self'\]\.?|^L\['[^']*'\]\.?", "", str(path))
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


_WRAPPER_FILES = ("torch/nn/attention/flex_attention.py",)
"""torch functions that only wrap the op a site is found at (flex_attention calls its higher-order
op): a site's source is the line that called them."""


def source_line(node: fx.Node) -> str:
    """`file:line` of the user code that produced the node (the innermost frame, wrappers in
    `_WRAPPER_FILES` skipped)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    frames = [f for f in frames if not f[0].replace("\\", "/").endswith(_WRAPPER_FILES)] or frames
    if not frames:
        return ""
    file, line = frames[-1]
    return f"{file}:{line}"


def copy_meta(source: fx.Node, target: fx.Node) -> None:
    """Carry the provenance (module, source line) of `source` onto a node we inserted."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "attnopt_form"):
        if key in source.meta and key not in target.meta:
            target.meta[key] = source.meta[key]


# Higher-order ops whose first argument is a subgraph that they call once, on the remaining
# positional arguments, with nothing changed around it (torch.utils.checkpoint, dynamo's `wrap`).
# Their bodies are canonicalized, searched and rewritten like the graph around them. The bodies
# of other higher-order ops (cond, while_loop, map, autocast or grad-mode wrappers, ...) are left
# alone.
SEARCHED_HIGHER_ORDER_OPS = frozenset({"tag_activation_checkpoint", "wrap"})

# Higher-order ops that are attention themselves: a matcher reads the call as a site, its
# subgraphs (flex attention's score_mod and mask_mod) as parts of it (passes/match_flex.py).
MATCHED_HIGHER_ORDER_OPS = frozenset({"flex_attention"})


def higher_order_name(node: fx.Node) -> str | None:
    """The name of the higher-order op a node calls (e.g. "tag_activation_checkpoint"), or None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    return node.target.name()


def searched_body(node: fx.Node) -> fx.Node | None:
    """The `get_attr` node of the subgraph that `node` calls, when it is a higher-order op whose
    body attnopt searches (SEARCHED_HIGHER_ORDER_OPS); else None."""
    if higher_order_name(node) not in SEARCHED_HIGHER_ORDER_OPS or not node.args:
        return None
    body = node.args[0]
    if not isinstance(body, fx.Node) or body.op != "get_attr":
        return None
    owner = node.graph.owning_module
    module = _resolve(owner, body.target) if owner is not None else None
    return body if isinstance(module, fx.GraphModule) else None


def body_module(root: torch.nn.Module, body: fx.Node) -> fx.GraphModule:
    """The GraphModule a `get_attr` node of `root`'s graph refers to."""
    return _resolve(root, body.target)


def _resolve(root: Any, target: str) -> Any:
    value = root
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def propagate_body_meta(call: fx.Node, body: fx.GraphModule) -> bool:
    """Fill `meta["val"]` of the body's nodes with fake tensors of the shapes the higher-order op
    `call` passes to it (its operands' `val`, else the body placeholders' own example values).
    Returns False when the body could not be run on fake inputs (its meta is then left as is)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = list(call.args[1:])
    if len(operands) != len(placeholders):
        return False
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = []
    try:
        with mode:
            for operand, placeholder in zip(operands, placeholders):
                value = meta_value(operand) if isinstance(operand, fx.Node) else operand
                if isinstance(operand, fx.Node) and not isinstance(value, torch.Tensor):
                    value = meta_value(placeholder)
                if isinstance(value, torch.Tensor):
                    value = torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype,
                                                device=value.device, requires_grad=value.requires_grad)
                inputs.append(value)
        FakeTensorProp(body, mode).propagate_dont_convert_inputs(*inputs)
    except Exception:  # a body that fake tensors cannot run: keep dynamo's example values
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Mutation and aliasing: in-place ops are semantics, never something a pass may drop or ignore.

# Ops whose result may share storage with their first argument (a write to one is seen by the other).
ALIASING_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "mT", "T", "H", "mH", "swapaxes",
    "swapdims", "movedim", "moveaxis", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten",
    "narrow", "select", "split", "chunk", "unbind", "getitem", "detach", "to", "type", "type_as", "float",
    "half", "bfloat16", "double", "contiguous", "as_strided", "diagonal", "real", "imag", "unfold", "alias",
    "view_as_real", "view_as_complex", "split_with_sizes", "tensor_split", "hsplit", "vsplit", "data",
})

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}
_NOT_MUTATIONS = {"requires_grad_", "retain_grad", "share_memory_", "record_stream"}


def mutated_by(node: fx.Node) -> fx.Node | None:
    """The graph value `node` writes to in place (`x.add_(...)`, `x += y`, `x[i] = v`,
    `torch.relu_(x)`, `F.relu(x, inplace=True)`, `out=` arguments), or None."""
    if node.op not in ("call_method", "call_function"):
        return None
    first = node.args[0] if node.args else None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return first if isinstance(first, fx.Node) else None
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return None  # operator.and_ / or_ are `&` / `|`, not in-place
    if node.kwargs.get("inplace") is True:
        return first if isinstance(first, fx.Node) else None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.OpOverload):
        if not node.target._schema.is_mutable:
            return None
        name = node.target._schema.name.split("::")[-1]
    if isinstance(name, str) and name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATIONS:
        return first if isinstance(first, fx.Node) else None
    return None


STATEFUL_CALLS = frozenset({
    "_vmap_increment_nesting", "_vmap_decrement_nesting", "lazy_load_decompositions",
    "_grad_increment_nesting", "_grad_decrement_nesting", "_jvp_increment_nesting", "_jvp_decrement_nesting",
    "_wrap_for_grad", "_unwrap_for_grad", "set_fwd_grad_enabled", "_set_grad_enabled",
})
"""Calls dynamo records for their effect on interpreter state (functorch's vmap/grad nesting
levels around an inlined `torch.vmap`, grad mode): their results are unused, yet dropping one
leaves the batched tensors between them without their level."""


def has_side_effects(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep `node`: torch's own rule, every in-place write,
    and the state changes of `STATEFUL_CALLS`."""
    if node.is_impure() or mutated_by(node) is not None:
        return True
    return node.op == "call_function" and getattr(node.target, "__name__", None) in STATEFUL_CALLS


def lifted_module_state(node: fx.Node) -> bool:
    """Whether a graph input is a module's parameter or buffer that dynamo lifted to an input
    (its source reads `._parameters[...]` / `._buffers[...]`, or its example is a Parameter)."""
    if node.op != "placeholder":
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "") if source is not None else ""
    name = str(name() if callable(name) else name)
    return "._parameters[" in name or "._buffers[" in name or isinstance(node.meta.get("example_value"),
                                                                        torch.nn.Parameter)


def alias_root(node: Any) -> Any:
    """The value whose storage `node` may share: followed up through view-like ops and in-place
    results (an in-place op returns its own target)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        target = mutated_by(node)
        if target is not None and node.target is not operator.setitem:
            node = target
        elif op_name(node) in ALIASING_OPS and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            break
        seen += 1
    return node
