"""Library calls that are attention: `F.scaled_dot_product_attention`, `F.multi_head_attention_forward`
(nn.MultiheadAttention) and the fused `torch._transformer_encoder_layer_fwd` (nn.TransformerEncoderLayer's
fast path). Arguments are bound with the real functions' signatures, so keyword calls read the same.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from .eager_paths import eager_multi_head_attention_forward, mha_call_arguments
from .fx_utils import dtype_of, nodes_between, op_name, shape_of
from .mask_terms import MaskTerm, is_causal
from .site_ir import Input, LibraryRecipe, SdpaRecipe, SiteMatch, index_of, memory_order, partial_shape, refuse
from .walk import peel_repeat


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention`'s signature (a builtin: Python cannot read it)."""


def _encoder_layer_signature(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                             norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1,
                             ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """`torch._transformer_encoder_layer_fwd`'s signature (a builtin)."""


def call_arguments(signature: Any, node: fx.Node) -> dict[str, Any] | None:
    """Every argument of a call node by name, defaults filled in; None when they do not bind."""
    try:
        bound = inspect.signature(signature).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _unreadable(node: fx.Node, kind: str) -> SiteMatch:
    match = SiteMatch(kind=kind, anchor=node, output=node, form=kind, inputs=[], internal=[node], recipe=None, shape={})
    return refuse(match, "its arguments do not bind to the function's signature, so attnopt cannot read them.")


def match_sdpa(node: fx.Node, dag: nx.DiGraph) -> SiteMatch:
    args = call_arguments(_sdpa_signature, node)
    if args is None:
        return _unreadable(node, "sdpa")
    q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
    dropout = float(args["dropout_p"] or 0.0)
    causal = bool(args["is_causal"])
    scale = args["scale"]
    enable_gqa = bool(args["enable_gqa"])
    q_shape = shape_of(q)
    match = SiteMatch(kind="sdpa", anchor=node, output=node, form="sdpa", inputs=[], internal=[node],
                      recipe=None, shape=partial_shape(q, None, v), causal=causal, dropout=dropout)
    if q_shape is None or shape_of(k) is None:
        return refuse(match, "the query or key has no known shape.")
    k_shape = shape_of(k)
    match.shape.update({"M": k_shape[-2]})
    if scale is None:
        scale = 1.0 / math.sqrt(q_shape[-1])
    if not isinstance(scale, (int, float)):
        return refuse(match, "the scale argument is not a number known when the graph is compiled.")
    match.scale = float(scale)
    grouped = enable_gqa
    key_input, value_input = k, v
    kv_heads = k_shape[-3] if enable_gqa and len(k_shape) >= 3 else None
    if not enable_gqa:
        _, k_peeled = peel_repeat(k)
        _, v_peeled = peel_repeat(v)
        if k_peeled is not None and v_peeled is not None and shape_of(k_peeled)[1] == shape_of(v_peeled)[1]:
            key_input, value_input, grouped = k_peeled, v_peeled, True
            kv_heads = shape_of(k_peeled)[1]
    if grouped and len(q_shape) != 4:
        return refuse(match, "grouped-query attention is supported for 4-D (B, H, N, d) inputs only.")
    match.inputs = [q, key_input, value_input] + ([mask] if isinstance(mask, fx.Node) else [])
    match.internal = nodes_between(dag, match.inputs, node)
    match.shape = partial_shape(q, None, v, kv_heads=kv_heads)
    match.shape["M"] = k_shape[-2]
    match.recipe = SdpaRecipe(scale=float(scale), causal=causal, dropout_p=dropout, grouped=grouped,
                              out_dtype=dtype_of(node), out_order=memory_order(node))
    if isinstance(mask, fx.Node):
        mask_shape = shape_of(mask) or ()
        per_key = len(mask_shape) < 2 or mask_shape[-2] == 1
        boolean = dtype_of(mask) == torch.bool
        match.mask = "key_padding" if per_key else ("boolean" if boolean else "additive")
        term = MaskTerm("keep", mask, float("-inf")) if boolean else MaskTerm("add", mask)
        if not per_key and is_causal([term], (q_shape[-2], k_shape[-2]), dag):
            match.mask, match.causal = "causal", True
    elif causal:
        match.mask = "causal"
    return match


def mha_arguments(node: fx.Node) -> dict[str, Any]:
    """All arguments of an `F.multi_head_attention_forward` call node, by name."""
    return mha_call_arguments(node.args, node.kwargs)

def argument_recipe(args: dict[str, Any]) -> tuple[list[fx.Node], tuple[tuple[str, Any], ...]]:
    """Split named call arguments into graph inputs and (name, `Input` or constant) pairs."""
    inputs: list[fx.Node] = []
    operands = tuple((name, Input(index_of(inputs, value)) if isinstance(value, fx.Node) else value)
                     for name, value in args.items())
    return inputs, operands

def match_mha(node: fx.Node, dag: nx.DiGraph) -> SiteMatch:
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
                      recipe=LibraryRecipe("mha", spec, node.target is eager_multi_head_attention_forward),
                      shape=shape, causal=bool(args["is_causal"]) and mask_node is not None,
                      mask=mask, dropout=dropout, scale=1.0 / math.sqrt(embed // heads),
                      mask_inputs=[n for n in (mask_node, padding) if isinstance(n, fx.Node)])
    weights_used = [u for u in node.users if op_name(u) == "getitem" and u.args[1] == 1 and u.users]
    if weights_used:
        return refuse(match, "nn.MultiheadAttention's attention weights are used, so the site cannot be replaced.")
    if any(u for u in node.users if op_name(u) != "getitem"):
        return refuse(match, "the (output, weights) tuple of nn.MultiheadAttention is used as a whole.")
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if args[name] is not None:
            return refuse(match, f"nn.MultiheadAttention with `{name}` is not supported.")
    if args["add_zero_attn"]:
        return refuse(match, "nn.MultiheadAttention with add_zero_attn is not supported.")
    if not isinstance(heads, int) or not isinstance(embed, int):
        return refuse(match, "the head count or embedding size is not a constant.")
    return match

def match_encoder_layer(node: fx.Node, dag: nx.DiGraph) -> SiteMatch:
    args = call_arguments(_encoder_layer_signature, node)
    if args is None:
        return _unreadable(node, "encoder-layer")
    src_shape = shape_of(args["src"]) or (1, 0, 0)
    heads, embed = args["num_heads"], args["embed_dim"]
    shape = {"B": src_shape[0], "H": heads, "Hkv": heads, "N": src_shape[-2], "M": src_shape[-2],
             "d": embed // heads, "e": embed // heads}
    mask = None
    if args["mask"] is not None:
        mask = "key_padding" if args["mask_type"] == 1 else "additive"
    inputs, spec = argument_recipe(args)
    match = SiteMatch(kind="encoder-layer", anchor=node, output=node, form="encoder-layer",
                      inputs=inputs, internal=[node], recipe=LibraryRecipe("encoder-layer", spec), shape=shape,
                      mask=mask, scale=1.0 / math.sqrt(embed // heads),
                      mask_inputs=[args["mask"]] if isinstance(args["mask"], fx.Node) else [])
    if len(src_shape) != 3:
        return refuse(match, "the fused encoder layer is supported for batched (B, N, E) inputs only.")
    return match
