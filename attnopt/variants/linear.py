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

import torch
import torch.nn.functional as F
from torch import nn

from attnopt.kernels import linear_attention

from .masks import as_4d, key_validity, per_key_mask
from .reasons import dropout_reason, first_reason, per_query_mask_reason
from .registry import Example, register_variant
from .site import SiteInfo
from .two_stage import require_real

FIXED_FEATURE_MAPS = ("elu1", "relu", "focused")


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
        if self.feature_map not in FIXED_FEATURE_MAPS + ("learned",):
            expected = FIXED_FEATURE_MAPS + ("learned",)
            raise ValueError(f"unknown feature_map {self.feature_map!r}; expected one of {expected}")
        if self.normalization not in ("sum", "inline"):
            raise ValueError(f"unknown normalization {self.normalization!r}; expected 'sum' or 'inline'")
        require_real("power", self.power, 0)
        require_real("eps", self.eps, 0)

    def cost_params(self, site_info: SiteInfo) -> dict:
        """Parameters for attnopt.costmodel's "linear" formula (a learned map costs like elu1 plus its matmul)."""
        return {"feature_map": "elu1" if self.feature_map == "learned" else self.feature_map}


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


def _causal_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """The key mask (B, 1, 1, M) of a causal mask stored per query (a tril, possibly with padding).

    Raises ValueError unless the mask is exactly "j ≤ i and key j valid".
    """
    validity = key_validity(as_4d(mask))
    last_row = validity[:, :, -1:, :]
    n_queries, n_keys = validity.shape[-2:]
    causal = torch.ones(n_queries, n_keys, dtype=torch.bool, device=mask.device).tril()
    if not torch.compiler.is_compiling() and not torch.equal(validity, (causal & last_row).expand_as(validity)):
        raise ValueError("the causal site's mask is more than causality and key padding; "
                         "linear attention cannot follow it")
    return last_row


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

    def key_mask(self, mask: torch.Tensor | None, causal: bool, batch: int) -> torch.Tensor | None:
        """Bool (B, M) of the keys every query may read (the op's key_mask), or None."""
        if mask is None:
            return None
        rows = _causal_key_mask(mask) if causal and as_4d(mask).shape[2] > 1 else per_key_mask(mask)
        validity = key_validity(rows)[:, :, 0, :]
        if not torch.compiler.is_compiling():
            _check_only_drops_keys(rows, validity)
        return validity[:, 0].expand(batch, -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("linear attention cannot apply attention dropout")
        options = dict(normalization=self.config.normalization, causal=causal,
                       key_mask=self.key_mask(mask, causal, q.shape[0]), eps=self.config.eps)
        root_scale = math.sqrt(scale)
        if self.feature_module is None:  # the op scales the q and k tiles where it maps them: no scaled copies
            return linear_attention(q, k, v, feature_map=self.config.feature_map, power=self.config.power,
                                    feature_scale=root_scale, **options)
        query_features = self.feature_module(q * root_scale).to(q.dtype)
        key_features = self.feature_module(k * root_scale).to(k.dtype)
        return linear_attention(query_features, key_features, v, feature_map="identity", **options)


def _refusal(config: LinearConfig, site_info: SiteInfo) -> str | None:
    causal_cross = None
    if site_info.causal and site_info.N != site_info.M:
        causal_cross = "the site is causal with N ≠ M, which linear attention's running sums cannot align."
    return first_reason(causal_cross, per_query_mask_reason(site_info, "linear"), dropout_reason(site_info, "linear"))


def _build(config: LinearConfig, site_info: SiteInfo, example: Example | None) -> nn.Module:
    return LinearAttention(config, site_info)


register_variant("linear", LinearConfig, refusal=_refusal, build=_build)
