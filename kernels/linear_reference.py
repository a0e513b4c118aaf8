"""Plain-PyTorch linear attention (kernelised, with sum or InLine normalisation): oracle and CPU path.

Written in its quadratic form, with the N×M weight matrix φ(q)φ(k)ᵀ spelled out and masked,
so that causality, key masks and both normalisations are evident; the Triton kernels compute the
same thing through the d×e state S = Σ φ(k)ᵀv instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .exact_reference import accumulation_dtype, repeat_kv_heads

FEATURE_MAPS = ("elu1", "relu", "focused", "identity")
NORMALIZATIONS = ("sum", "inline")


def apply_feature_map(x: torch.Tensor, name: str, power: float) -> torch.Tensor:
    """φ(x) over the last (head) dim, in fp32 for half inputs.

    elu1: elu(x) + 1; relu: max(x, 0); identity: x unchanged (features mapped by the caller);
    focused (FLatten): y = relu(x), φ = y**power · ‖y‖ / ‖y**power‖, and 0 where y is all zero.
    """
    x = x.to(accumulation_dtype(x.dtype))
    if name == "elu1":
        return F.elu(x) + 1
    if name == "relu":
        return torch.relu(x)
    if name == "identity":
        return x
    if name == "focused":
        y = torch.relu(x)
        y_pow = y**power
        norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        norm_pow = torch.linalg.vector_norm(y_pow, dim=-1, keepdim=True)
        ratio = torch.where(norm_pow > 0, norm_y / norm_pow.clamp_min(torch.finfo(x.dtype).tiny), 0)
        return y_pow * ratio
    raise ValueError(f"unknown feature_map {name!r}; expected one of {FEATURE_MAPS}")


def visible_keys(
    batch: int,
    n_queries: int,
    n_keys: int,
    causal: bool,
    key_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Bool (B or 1, 1, N, M): which keys each query sums over (causal j <= i, valid keys)."""
    visible = torch.ones(1, 1, n_queries, n_keys, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril()
    if key_mask is not None:
        visible = visible & key_mask.reshape(batch, 1, 1, n_keys)
    return visible


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    normalization: str = "sum",
    power: float = 3.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention in quadratic form; see attnopt.kernels.linear_attention for the contract."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    n_heads = q.shape[1]
    query_features = apply_feature_map(q, feature_map, power)
    key_features = repeat_kv_heads(apply_feature_map(k, feature_map, power), n_heads)
    values = repeat_kv_heads(v, n_heads).to(query_features.dtype)
    visible = visible_keys(q.shape[0], q.shape[2], k.shape[2], causal, key_mask, q.device)
    weights = torch.where(visible, query_features @ key_features.transpose(-1, -2), 0)
    if normalization == "sum":
        out = (weights @ values) / (weights.sum(-1, keepdim=True) + eps)
    else:
        n_visible = visible.sum(-1, keepdim=True).clamp_min(1).to(weights.dtype)
        mean = weights.sum(-1, keepdim=True) / n_visible
        injective = torch.where(visible, weights - mean + 1 / n_visible, 0)
        out = injective @ values
    return out.to(q.dtype)
