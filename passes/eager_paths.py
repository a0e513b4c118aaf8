"""Make a captured graph do what the eager model does where dynamo traces another code path.

Users compare a rewritten model with their eager model, and attnopt checks every rewrite
against the captured graph — so the captured graph must mean what eager means. One known
divergence in torch 2.13: `nn.MultiheadAttention.forward` in eval mode, without autograd, runs
the fused `torch._native_multi_head_attention` eagerly, but dynamo always traces the Python path
(`F.multi_head_attention_forward`). The two agree except on rows whose every key is masked:
the fused kernel gives NaN, the Python path 0 (with need_weights=False). `restore_eager_paths`
replaces each such call by `eager_multi_head_attention_forward`, which gives eager's answer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import dtype_of, op_name

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def mha_call_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every argument of an `F.multi_head_attention_forward` call by name, defaults filled in
    (bound with the real function's signature, so keyword calls read the same)."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def restore_eager_paths(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace, in place, the MHA calls eager could run through its fused path (see module doc)."""
    for node in list(gm.graph.nodes):
        if op_name(node) != "multi_head_attention_forward" or node.target is eager_multi_head_attention_forward:
            continue
        try:
            arguments = mha_call_arguments(node.args, node.kwargs)
        except TypeError:
            continue
        query = arguments["query"]
        batch_first = isinstance(query, fx.Node) and op_name(query) == "transpose" and set(query.args[1:]) == {0, 1}
        masks = [arguments[name] for name in ("key_padding_mask", "attn_mask") if arguments[name] is not None]
        float_masks = any(not _made_from_bool(mask) for mask in masks)
        if not batch_first or float_masks:
            continue  # eager never takes the fused path for this call
        node.target = eager_multi_head_attention_forward
    gm.recompile()
    return gm


def _made_from_bool(mask: Any) -> bool:
    """A float mask that `F._canonical_mask` made from a bool one (zeros filled with -inf where
    True): the user passed a bool mask, which eager's fused path accepts."""
    return (isinstance(mask, fx.Node) and op_name(mask) in ("masked_fill", "masked_fill_")
            and dtype_of(mask.args[1]) == torch.bool and op_name(mask.args[0]) in ("zeros", "zeros_like"))


def eager_takes_fast_path(arguments: dict[str, Any]) -> bool:
    """Whether eager `nn.MultiheadAttention.forward`, batch-first and given bool masks, would run
    the fused kernel for a call with these `F.multi_head_attention_forward` arguments (torch 2.13's
    conditions)."""
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    bias = arguments["in_proj_bias"]
    tensors = (query, arguments["in_proj_weight"], bias, arguments["out_proj_weight"], arguments["out_proj_bias"])
    return (torch.backends.mha.get_fastpath_enabled() and not arguments["training"] and query.dim() == 3
            and query is key and key is value and arguments["num_heads"] % 2 == 0
            and not arguments["use_separate_proj_weight"] and arguments["in_proj_weight"] is not None
            and bias is not None and bias.dtype == query.dtype and arguments["bias_k"] is None
            and arguments["bias_v"] is None and not arguments["add_zero_attn"] and not torch.is_autocast_enabled()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)))


def fully_masked_rows(arguments: dict[str, Any]) -> torch.Tensor | None:
    """Bool (N, B): the query rows of some head whose every key is masked (float masks, -inf)."""
    query = arguments["query"]
    target_length, batch = query.shape[0], query.shape[1]
    heads = arguments["num_heads"]
    blocked = None
    padding, attn_mask = arguments["key_padding_mask"], arguments["attn_mask"]
    if padding is not None:
        blocked = (padding == float("-inf")).reshape(batch, 1, 1, -1)
    if attn_mask is not None:
        mask = attn_mask == float("-inf")
        mask = mask.reshape(batch, heads, target_length, -1) if mask.dim() == 3 else mask.reshape(1, 1, target_length, -1)
        blocked = mask if blocked is None else blocked | mask
    if blocked is None:
        return None
    return blocked.all(-1).any(1).transpose(0, 1)  # (B, H, N) → (N, B)


def eager_multi_head_attention_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`F.multi_head_attention_forward` with eager's answer where eager runs the fused kernel:
    NaN on query rows with every key masked."""
    out, weights = F.multi_head_attention_forward(*args, **kwargs)
    arguments = mha_call_arguments(args, kwargs)
    if not eager_takes_fast_path(arguments):
        return out, weights
    dead = fully_masked_rows(arguments)
    if dead is None:
        return out, weights
    return torch.where(dead.unsqueeze(-1), out.new_full((), float("nan")), out), weights
