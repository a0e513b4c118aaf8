"""Plain-PyTorch exact attention: the oracle for the Triton kernel and the CPU path.

Written densely (the full N×M score matrix) so it is obviously right; every generated kernel and
the autograd of the op are checked against (or derived from) this function. It reproduces torch's
own masking on every edge: fills that replace scores, float masks added in torch's promoted dtype
(so a half model's rounding of `scores + finfo.min` is kept), and fully masked rows as either
torch.softmax (NaN) or SDPA (0) gives them. Two score transforms of modern models are part of the
function: logit softcapping (Gemma 2: `c·tanh(s / c)` on the scaled scores, before the masks) and
attention sinks (gpt-oss: one learned logit per row joins the softmax's normaliser, its column
dropped afterwards).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def repeat_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Expand (B, Hkv, M, ·) to (B, n_heads, M, ·): query head h reads kv head h // (n_heads // Hkv)."""
    group = n_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the references compute in: fp32 for half inputs, the input's own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def mask_sum_dtype(
    q_dtype: torch.dtype, mask: torch.Tensor | None, score_dtype: torch.dtype | None
) -> torch.dtype | None:
    """Dtype a float mask is added to the scores in, as torch promotes `scores + mask` with scores
    held in score_dtype (else q's dtype); None without a float mask."""
    if mask is None or mask.dtype == torch.bool:
        return None
    return torch.promote_types(score_dtype or q_dtype, mask.dtype)


def exact_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
    fill_mask: torch.Tensor | None = None,
    fill_value: float = -math.inf,
    score_dtype: torch.dtype | None = None,
    zero_empty_rows: bool = False,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(where(fill_mask, fill_value, cap(q kᵀ·scale)) + mask) v in q's dtype; see exact_attention.

    Scores are computed in at least fp32; cap(s) = softcap·tanh(s / softcap) (identity for None);
    a float mask is added in mask_sum_dtype (the scores rounded to it first), and the softmax runs
    in that dtype promoted to at least fp32 (and to the sinks' dtype). With sinks (broadcastable
    to (B, H, N, 1)) the softmax runs over [scores, sink] and the sink's column is dropped, so
    a row whose every key is masked gives 0 (the sink takes all the weight) unless its sink is
    -inf too.
    """
    dtype = accumulation_dtype(q.dtype)
    scores = (q.to(dtype) @ repeat_kv_heads(k, q.shape[1]).to(dtype).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if fill_mask is not None:
        scores = torch.where(fill_mask, fill_value, scores)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    elif mask is not None:
        sum_dtype = mask_sum_dtype(q.dtype, mask, score_dtype)
        scores = (scores.to(sum_dtype) + mask.to(sum_dtype)).to(torch.promote_types(sum_dtype, dtype))
    if causal:
        n_queries, n_keys = scores.shape[-2:]
        visible = torch.ones(n_queries, n_keys, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, -math.inf)
    if sinks is not None:
        combined_dtype = torch.promote_types(scores.dtype, sinks.dtype)
        sink_column = sinks.to(combined_dtype).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores.to(combined_dtype), sink_column], dim=-1)
    if zero_empty_rows:
        # SDPA's rule: a row with no visible key gives 0; softmax runs on zeros there so that
        # neither the output nor any gradient sees the NaN of an all -inf softmax
        empty = scores.isneginf().all(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    return (probs @ repeat_kv_heads(v, q.shape[1]).to(probs.dtype)).to(q.dtype)
