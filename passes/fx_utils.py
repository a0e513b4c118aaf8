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


def source_line(node: fx.Node) -> str:
    """`file:line` of the user code that produced the node (the innermost frame)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return ""
    file, line = frames[-1]
    return f"{file}:{line}"


def copy_meta(source: fx.Node, target: fx.Node) -> None:
    """Carry the provenance (module, source line) of `source` onto a node we inserted."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "attnopt_form"):
        if key in source.meta and key not in target.meta:
            target.meta[key] = source.meta[key]
