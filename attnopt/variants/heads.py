"""Per-head decisions: some heads of a site keep exact softmax, the others take a variant.

Approximations fail on the heads whose attention is sharp; the others may be faithful. A
`HeadSplit` names the key/value heads kept exact (whole GQA groups: a query head reads kv head
h // (H // Hkv), so a kv head and the query heads reading it go together) and the variant config
the rest take. `HeadSplitAttention` runs the exact heads through attnopt's exact op and the rest
through the variant's module (built for those heads only), one call per group, and puts the
heads back in their order. attnopt/candidates.py derives these candidates from a variant's
measured per-head error, and prices the two calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from attnopt.kernels import exact_attention

from .site import SiteInfo


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """`config` on every kv head but `exact_kv_heads`, which keep exact softmax."""

    config: Any
    exact_kv_heads: tuple[int, ...]

    def query_heads(self, site: SiteInfo) -> tuple[int, ...]:
        """The query heads kept exact: every query head reading one of the exact kv heads."""
        group = site.H // site.Hkv
        return tuple(h for kv in self.exact_kv_heads for h in range(kv * group, (kv + 1) * group))


def split_sites(split: HeadSplit, site: SiteInfo) -> tuple[SiteInfo, SiteInfo]:
    """(the exact heads' site, the variant's site): the same site with fewer heads."""
    group = site.H // site.Hkv
    kept = len(split.exact_kv_heads)
    exact = dataclasses.replace(site, H=kept * group, Hkv=kept)
    rest = dataclasses.replace(site, H=(site.Hkv - kept) * group, Hkv=site.Hkv - kept)
    return exact, rest


def head_indices(split: HeadSplit, site: SiteInfo) -> dict[str, torch.Tensor]:
    """Index tensors of the exact and variant heads, query side and key/value side."""
    exact_q = split.query_heads(site)
    exact_kv = split.exact_kv_heads
    rest_q = tuple(h for h in range(site.H) if h not in exact_q)
    rest_kv = tuple(h for h in range(site.Hkv) if h not in exact_kv)
    order = torch.tensor(exact_q + rest_q)
    return {"exact_q": torch.tensor(exact_q), "exact_kv": torch.tensor(exact_kv), "rest_q": torch.tensor(rest_q),
            "rest_kv": torch.tensor(rest_kv), "inverse": torch.argsort(order)}


def select_heads(tensor: torch.Tensor | None, heads: torch.Tensor, count: int) -> torch.Tensor | None:
    """`tensor`'s heads (dim 1) at `heads` when it has `count` of them; a broadcast one (1 head,
    or fewer than 4 dims) as it is."""
    if tensor is None or tensor.dim() < 4 or tensor.shape[1] != count:
        return tensor
    return tensor.index_select(1, heads.to(tensor.device))


class HeadSplitAttention(nn.Module):
    """Exact softmax on some heads, `attention` (a variant's site module for the others) on the rest.

    Same forward as every site module: canonical q (B, H, N, d), k and v (B, Hkv, M, ·), a plain
    bool/additive mask; returns (B, H, N, e) with every head in its place.
    """

    def __init__(self, attention: nn.Module, split: HeadSplit, site: SiteInfo):
        super().__init__()
        self.attention = attention
        self.split = split
        self.heads, self.kv_heads = site.H, site.Hkv
        for name, index in head_indices(split, site).items():
            self.register_buffer(f"_{name}", index, persistent=False)

    def calibration_parameters(self) -> list[nn.Parameter]:
        """The variant's parameters: the exact heads have none to fit."""
        choose = getattr(self.attention, "calibration_parameters", None)
        return list(choose()) if choose is not None else []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        H = self.heads
        exact = exact_attention(q.index_select(1, self._exact_q), k.index_select(1, self._exact_kv),
                                v.index_select(1, self._exact_kv), select_heads(mask, self._exact_q, H),
                                scale=scale, causal=causal, dropout_p=dropout_p)
        rest = self.attention(q.index_select(1, self._rest_q), k.index_select(1, self._rest_kv),
                              v.index_select(1, self._rest_kv), mask=select_heads(mask, self._rest_q, H),
                              scale=scale, causal=causal, dropout_p=dropout_p)
        return torch.cat([exact, rest.to(exact.dtype)], dim=1).index_select(1, self._inverse)

    def extra_repr(self) -> str:
        return f"exact kv heads {list(self.split.exact_kv_heads)} of {self.kv_heads}"


def per_head_errors(output: torch.Tensor, reference: torch.Tensor, kv_heads: int) -> list[float]:
    """Each kv group's share of the squared error ‖output − reference‖² (over the rows where the
    reference is finite), as a fraction of ‖reference‖²: the groups whose loss most lowers the error."""
    output, reference = output.float(), reference.float()
    finite = reference.isfinite().all(-1, keepdim=True)
    difference = torch.where(finite, output - reference, 0)
    total = torch.where(finite, reference, 0).square().sum().clamp_min(1e-30)
    batch, heads = output.shape[:2]
    per_group = difference.square().reshape(batch, kv_heads, heads // kv_heads, -1).sum(dim=(0, 2, 3))
    return (per_group / total).tolist()
