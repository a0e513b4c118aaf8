"""Plain-PyTorch forms of `nn.MultiheadAttention` and the fused encoder layer, with the
attention core left as a parameter.

Dynamo keeps `F.multi_head_attention_forward` and `torch._transformer_encoder_layer_fwd` (the
fast path of `nn.TransformerEncoderLayer`) as single calls, so the attention inside them is not
visible in the graph. These functions compute the same thing out of linear layers, layer norms
and one call of `attention(q, k, v, mask=..., scale=..., causal=..., dropout_p=...)`, so that
the core can be exact or any variant. Each site is still verified against the original call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .eager_paths import eager_takes_fast_path

from .masking import Masking, run_attention


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(L, B, E) → (B, H, L, E/H)."""
    length = x.shape[0]
    return x.reshape(length, batch, heads, -1).permute(1, 2, 0, 3)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A PyTorch-convention mask (bool True = not allowed, or float additive) as float."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _in_projection(query, key, value, weight, bias, separate: tuple | None):
    embed = query.shape[-1]
    if separate is not None:
        weights = separate
        biases = (None, None, None) if bias is None else bias.chunk(3)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
    if key is value and query is key:
        projected = F.linear(query, weight, bias)
        return tuple(projected.unflatten(-1, (3, embed)).unbind(-2))
    w_q, w_k, w_v = weight.chunk(3)
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def multi_head_attention_forward(attention: nn.Module, *, query, key, value, embed_dim_to_check, num_heads,
                                 in_proj_weight, in_proj_bias, dropout_p, out_proj_weight, out_proj_bias,
                                 training=True, key_padding_mask=None, attn_mask=None,
                                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                                 v_proj_weight=None, is_causal=False, need_weights=True, eager_fused_path=False,
                                 **_ignored: Any) -> tuple[torch.Tensor, None]:
    """`F.multi_head_attention_forward` with `need_weights` answered by None (weights unused).

    Rows whose every key is masked give 0 when torch takes its SDPA path (need_weights=False)
    and NaN when it computes the weights with a softmax (need_weights=True) or, for calls that
    eager runs through its fused kernel (`eager_fused_path`, see passes/eager_paths.py), there."""
    fused = eager_fused_path and eager_takes_fast_path(dict(
        query=query, key=key, value=value, num_heads=num_heads, in_proj_weight=in_proj_weight,
        in_proj_bias=in_proj_bias, out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias, training=training,
        use_separate_proj_weight=use_separate_proj_weight, bias_k=None, bias_v=None, add_zero_attn=False))
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    target_length, batch, embed = query.shape
    source_length = key.shape[0]
    separate = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else None
    q, k, v = _in_projection(query, key, value, in_proj_weight, in_proj_bias, separate)
    q, k, v = _heads(q, batch, num_heads), _heads(k, batch, num_heads), _heads(v, batch, num_heads)
    mask = _additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:  # (B·H, L, S)
        mask = mask.reshape(batch, num_heads, target_length, source_length)
    padding = _additive(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source_length)
        mask = padding if mask is None else mask + padding
    # with need_weights torch adds the mask to scores in q's dtype; without, SDPA adds it in fp32
    score_dtype = None if need_weights or fused else torch.promote_types(q.dtype, torch.float32)
    masking = Masking(mask=mask, score_dtype=score_dtype, zero_empty_rows=not (need_weights or fused))
    out = run_attention(attention, q, k, v, masking,
                        scale=1.0 / math.sqrt(q.shape[-1]), causal=False, dropout_p=dropout_p if training else 0.0)
    out = out.permute(2, 0, 1, 3).reshape(target_length * batch, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias).reshape(target_length, batch, embed)
    return (out.squeeze(1) if unbatched else out), None


def encoder_layer_forward(attention: nn.Module, *, src, embed_dim, num_heads, qkv_weight, qkv_bias,
                          proj_weight, proj_bias, use_gelu, norm_first, eps, norm_weight_1, norm_bias_1,
                          norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2,
                          mask=None, mask_type=None) -> torch.Tensor:
    """`torch._transformer_encoder_layer_fwd` (batch-first, eval) decomposed, with its masking:
    a float mask counts as bool (nonzero = masked), fully masked rows give NaN."""
    batch, length, _ = src.shape

    def self_attention(x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, qkv_weight, qkv_bias).unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
        # the fused kernel reads a float mask as bool: any nonzero entry masks its key
        additive = _additive(mask if mask is None or mask.dtype == torch.bool else mask != 0, x.dtype)
        if additive is not None:
            if mask_type == 1:  # key padding (B, S)
                additive = additive.reshape(batch, 1, 1, length)
        out = run_attention(attention, q, k, v, Masking(mask=additive), scale=1.0 / math.sqrt(q.shape[-1]),
                            causal=False, dropout_p=0.0)
        return F.linear(out.transpose(1, 2).reshape(batch, length, embed_dim), proj_weight, proj_bias)

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
        return F.linear(hidden, ffn_weight_2, ffn_bias_2)

    def norm(x: torch.Tensor, weight, bias) -> torch.Tensor:
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    x = src
    if norm_first:
        x = x + self_attention(norm(x, norm_weight_1, norm_bias_1))
        x = x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    else:
        x = norm(x + self_attention(x), norm_weight_1, norm_bias_1)
        x = norm(x + feed_forward(x), norm_weight_2, norm_bias_2)
    return x
