"""Linear attention: φ(q)(φ(k)ᵀv) / φ(q)·Σφ(k) (or InLine's normalisation), cost ∝ N + M.

Where the softmax scale goes: softmax(q·k·s) is read as softmax((√s·q)·(√s·k)), so φ is applied
to √s·q and √s·k. For the homogeneous maps (relu, focused) the scale then cancels in the sum
normalisation; for elu+1, InLine and learned maps it sets where on φ's curve the inputs fall,
just as it sets the softmax's temperature.

The fixed maps run inside the kernel op, which also applies √s (its feature_scale) as it maps
q and k, so no scaled copy of either is made. `feature_map="learned"` puts an nn.Module φ in
front of the op (called with feature_map="identity"): per kv head, φ(x) = elu(x W + b) + 1 with
W = I and b = 0 at the start, i.e. exactly elu+1 until someone calibrates it. Replace `feature_module` with
any module mapping (B, Hkv, ·, d) to non-negative (B, Hkv, ·, r) features to try another φ.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attnopt import costmodel
from attnopt.costmodel import (  # the cost formula's shape symbols
    B,
    H,
    Hkv,
    M,
    N,
    d,
    dtype_bytes,
    e,
)
from attnopt.kernels import linear_attention

from .masks import as_4d, causal_key_mask, key_validity, per_key_mask
from .reasons import dropout_reason, first_reason, per_query_mask_reason
from .registry import Example, VariantSpec, register_variant
from .site import SiteInfo
from .two_stage import require_real

NAME = "linear"

FEATURE_MAPS: dict[str, tuple[int, costmodel.Expr]] = {
    "elu1": (2, 0),
    "relu": (1, 0),
    "focused": (6, 0),
    "learned": (2, d),
}
"""Feature map φ → its cost per feature: (element ops, multiply-adds). elu then +1; focused = relu,
power, two norms and a rescale; learned = a d×d matmul (LearnedFeatureMap) then elu+1. All but
"learned" run inside the kernel op."""

NORMALIZATIONS: dict[str, Callable[[costmodel.Expr, costmodel.Expr], costmodel.Expr]] = {
    "sum": lambda queries, keys: queries * d + keys * d,
    "inline": lambda queries, keys: (queries + keys) * (d + e),
}
"""Normalisation → its multiply-adds given the query and key rows: "sum" divides by φ(q)·Σφ(k)
(the key sum counted as M·d, as the kernel's FLOP formula does); "inline" (InLine) adds Σv and a
mean correction per output row."""


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Kernelised linear attention.

    feature_map: "elu1", "relu", "focused" (FLatten, with `power`) or "learned" (see module doc).
    normalization: "sum" (divide by φ(q)·Σφ(k)) or "inline" (InLine: weights shifted to sum to 1).
    """

    feature_map: str = "elu1"
    normalization: str = "sum"
    power: float = 3.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {self.feature_map!r}; expected one of {tuple(FEATURE_MAPS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected one of {tuple(NORMALIZATIONS)}")
        require_real("power", self.power, 0)
        require_real("eps", self.eps, 0)


class LearnedFeatureMap(nn.Module):
    """φ(x) = elu(x W_g + b_g) + 1 per kv head g; W = I, b = 0 at init, so it starts as elu+1."""

    def __init__(self, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(n_kv_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(n_kv_heads, 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Hkv·G, T, d) → features (B, Hkv·G, T, d): query head h uses kv head h // G."""
        batch, n_heads, n_tokens, head_dim = x.shape
        group = n_heads // self.weight.shape[0]
        grouped = x.float().reshape(batch, self.weight.shape[0], group * n_tokens, head_dim)
        features = F.elu(grouped @ self.weight + self.bias) + 1
        return features.reshape(batch, n_heads, n_tokens, -1)


def _check_only_drops_keys(rows: torch.Tensor, validity: torch.Tensor) -> None:
    """Raise unless the per-key mask only drops keys (no other additive values), alike for all heads."""
    if not torch.equal(validity, validity[:, :1].expand_as(validity)):
        raise ValueError("the key mask differs between heads; linear attention masks keys per batch row only")
    if rows.is_floating_point() and rows[:, :, 0, :].masked_fill(~validity, 0).count_nonzero() > 0:
        raise ValueError("the additive key mask has values other than 0 and -inf; linear attention can only drop keys")


class LinearAttention(nn.Module):
    """One site's linear attention; forward takes the canonical (q, k, v, mask) layout."""

    def __init__(self, config: LinearConfig, site_info: SiteInfo):
        super().__init__()
        self.config = config
        self.site_info = site_info
        self.feature_module = LearnedFeatureMap(site_info.Hkv, site_info.d) if config.feature_map == "learned" else None

    def key_mask(self, mask: torch.Tensor | None, causal: bool, batch: int, n_keys: int) -> torch.Tensor | None:
        """Bool (B, M) of the keys every query may read (the op's key_mask), or None. A mask that
        broadcasts over the keys (a scalar bias, (B, 1, 1, 1)) applies to every key."""
        if mask is None:
            return None
        rows = causal_key_mask(mask, "linear attention") if causal and as_4d(mask).shape[2] > 1 else per_key_mask(mask)
        validity = key_validity(rows)[:, :, 0, :]
        if not torch.compiler.is_compiling():
            _check_only_drops_keys(rows, validity)
        return validity[:, 0].expand(batch, n_keys)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("linear attention cannot apply attention dropout")
        options = dict(normalization=self.config.normalization, causal=causal,
                       key_mask=self.key_mask(mask, causal, q.shape[0], k.shape[2]), eps=self.config.eps)
        root_scale = math.sqrt(scale)
        if self.feature_module is None:  # the op scales the q and k tiles where it maps them: no scaled copies
            return linear_attention(q, k, v, feature_map=self.config.feature_map, power=self.config.power,
                                    feature_scale=root_scale, **options)
        query_features = self.feature_module(q * root_scale).to(q.dtype)
        key_features = self.feature_module(k * root_scale).to(k.dtype)
        return linear_attention(query_features, key_features, v, feature_map="identity", **options)

    def calibration_parameters(self) -> list[nn.Parameter]:
        """What a calibration (attnopt.calibration) fits: the learned feature map's W and b (none
        for the fixed maps)."""
        return [] if self.feature_module is None else list(self.feature_module.parameters())


def _refusal(config: LinearConfig, site_info: SiteInfo) -> str | None:
    causal_cross = None
    if site_info.causal and site_info.N != site_info.M:
        causal_cross = "the site is causal with N ≠ M, which linear attention's running sums cannot align."
    return first_reason(causal_cross, per_query_mask_reason(site_info, NAME), dropout_reason(site_info, NAME))


def _build(config: LinearConfig, site_info: SiteInfo, example: Example | None) -> nn.Module:
    return LinearAttention(config, site_info)


def linear_cost(feature_map: str = "elu1", normalization: str = "sum") -> costmodel.CostFormula:
    """Linear attention φ(Q)(φ(K)ᵀV) normalised by φ(Q)·Σφ(K), through the d×e state per kv head.

    Counted as attnopt.kernels' FLOP formula counts the op, plus a learned φ's matmul in front of it.
    """
    feature_ops, feature_macs = costmodel.lookup(FEATURE_MAPS, feature_map, "feature map")
    queries, keys = B * H * N, B * Hkv * M
    normaliser_macs = costmodel.lookup(NORMALIZATIONS, normalization, "normalization")(queries, keys)
    return costmodel.CostFormula(
        flops=2 * ((keys + queries) * d * e + normaliser_macs + (queries + keys) * d * feature_macs),
        elementwise_ops=feature_ops * (queries + keys) * d + queries * e,  # φ, then the division
        bytes_moved=dtype_bytes * (
            2 * (queries + keys) * d  # feature maps read Q, K and write φ(Q), φ(K)
            + 2 * keys * d + keys * e + B * Hkv * d * (e + 1)  # state and key sum read φ(K), V
            + 2 * queries * d + queries * (1 + 3 * e)  # output and normaliser read φ(Q); division
        ),
        kernel_calls=9,  # φ(Q), φ(K) two each (map, +1); state, key sum, output, normaliser, divide
    )


def _cost_params(config: LinearConfig, site_info: SiteInfo) -> dict:
    return {"feature_map": config.feature_map, "normalization": config.normalization}


def _candidates(site_info: SiteInfo, calibrated: bool = False) -> list[LinearConfig]:
    """The fixed maps; with calibration data (`calibrated`), also the learned map, which only
    calibration makes better than elu+1 (it starts as elu+1)."""
    names = ("focused", "elu1", "relu") + (("learned",) if calibrated else ())
    return [LinearConfig(feature_map=name) for name in names]


register_variant(VariantSpec(
    name=NAME, config_type=LinearConfig, refusal=_refusal, build=_build, cost=linear_cost, cost_params=_cost_params,
    candidates=_candidates, shown=("feature_map",), heads_independent=True))
