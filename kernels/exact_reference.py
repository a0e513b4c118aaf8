"""Plain-PyTorch exact attention: the oracle for the Triton kernel and the CPU path.

Written densely (the full N×M score matrix) so it is obviously right; every generated kernel and
the autograd of the op are checked against (or derived from) this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Expand (B, Hkv, M, ·) to (B, n_heads, M, ·): query head h reads kv head h // (n_heads // Hkv)."""
    group = n_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the references compute in: fp32 for half inputs, the input's own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def masked_scores(
    scores: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Apply a bool (True = may attend) or additive mask, and top-left causality, to scores."""
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    if causal:
        n_queries, n_keys = scores.shape[-2:]
        visible = torch.ones(n_queries, n_keys, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def softmax_attention_fp32(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v computed and returned in at least fp32 (shared by exact and agent)."""
    dtype = accumulation_dtype(q.dtype)
    k = repeat_kv_heads(k, q.shape[1]).to(dtype)
    v = repeat_kv_heads(v, q.shape[1]).to(dtype)
    scores = (q.to(dtype) @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(masked_scores(scores, mask, causal), dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    return probs @ v


def exact_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v in q's dtype, fp32 inside for half inputs; see exact_attention."""
    out = softmax_attention_fp32(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p)
    return out.to(q.dtype)
