"""Shape checks shared by the ops, so a bad call fails with a clear message (also under fake tensors)."""

from __future__ import annotations

import torch


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, H, N, d), k (B, Hkv, M, d), v (B, Hkv, M, e) with H divisible by Hkv."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, n_heads, _, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"q and k head dims differ: {head_dim} vs {k.shape[3]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    if n_heads % k.shape[1] != 0:
        raise ValueError(f"query heads {n_heads} not a multiple of kv heads {k.shape[1]}")


def check_mask(mask: torch.Tensor | None, target: tuple[int, ...]) -> None:
    """mask must be bool or floating and broadcastable to `target`."""
    if mask is None:
        return
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be bool or floating, got {mask.dtype}")
    if mask.dim() > len(target) or any(
        size not in (1, want) for size, want in zip(reversed(mask.shape), reversed(target))
    ):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {target}")
