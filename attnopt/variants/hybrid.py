"""Hybrid attention: exact softmax over sink tokens and a local window, linear attention over the rest.

For query i with exact set S_i = sinks ∪ window(i) and linear set L_i = the other visible keys,

    out_i = (Σ_{S_i} e^{s_ij} v_j + α Σ_{L_i} φ(q_i)·φ(k_j) v_j) / (Σ_{S_i} e^{s_ij} + α Σ_{L_i} φ(q_i)·φ(k_j))

under one normaliser (LoLCATs' sliding window + linear attention, here without training): the
linear kernel stands in for e^{s_ij} term for term and α (`mix`) weighs it. Stabilised by
multiplying every term by e^{-c_i}, c_i = max(m_i, log(α Σ_{L_i} φ·φ)) with m_i the row max over
S_i — the linear terms are scaled by α·e^{-c_i}, consistently with the exact ones, so the result
is the unshifted formula; see attnopt/kernels/hybrid_reference.py for the math, the window's
shape (1-D by position, or the patch neighbourhood of a token grid) and the state form.

The window is by position, so queries and keys must be one sequence: cross-attention (N ≠ M) is
refused. Causal: the window looks back only and the linear part holds the keys j ≤ i − window.
A key-padding mask drops keys from both parts; a mask that differs per query is refused.
When the window and the sinks cover every key, this is exact softmax attention.
"""

from __future__ import annotations

import dataclasses

import torch
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
from attnopt.kernels.hybrid_reference import Tiling, hybrid_attention_reference, tiling

from .linear import FEATURE_MAPS as LINEAR_FEATURE_MAPS
from .masks import as_4d, causal_key_mask, key_validity, per_key_mask
from .reasons import dropout_reason, first_reason, per_query_mask_reason
from .registry import Example, VariantSpec, register_variant
from .site import SiteInfo, TokenGrid, infer_grid
from .two_stage import require_int, require_real

NAME = "hybrid"

FEATURE_MAPS = {name: LINEAR_FEATURE_MAPS[name] for name in ("elu1", "relu", "focused")}
"""Feature map φ of the linear part → (element ops, multiply-adds) per feature, as linear attention's."""


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Exact attention over `sinks` + a `window` of neighbours, linear attention over the other keys.

    sinks: the first keys every query reads exactly (e.g. [CLS]); window: the neighbours each query
        reads exactly, by position (causal: looking back), or the ⌊√window⌋-row patch neighbourhood
        on a token grid (the site's, or with infer_grid the square one N spells).
    feature_map: φ of the linear part ("elu1", "relu", "focused" with `power`), applied to
        √scale·q and √scale·k; mix: α, the weight of the linear terms against the exact e^{s}.
    """

    sinks: int = 1
    window: int = 64
    feature_map: str = "elu1"
    mix: float = 1.0
    power: float = 3.0
    infer_grid: bool = False

    def __post_init__(self) -> None:
        require_int("sinks", self.sinks, 0)
        require_int("window", self.window, 1)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {self.feature_map!r}; expected one of {tuple(FEATURE_MAPS)}")
        require_real("mix", self.mix, 0, low_closed=True)
        require_real("power", self.power, 0)

    def grid_for(self, n_tokens: int, site_info: SiteInfo, causal: bool) -> TokenGrid | None:
        """The token grid the window lies on for a call with n_tokens tokens (None: 1-D by position)."""
        if causal:
            return None
        if site_info.grid is not None and site_info.grid.n_tokens == n_tokens:
            return site_info.grid
        return infer_grid(n_tokens) if self.infer_grid else None

    def tiling(self, n_tokens: int, site_info: SiteInfo, causal: bool) -> Tiling:
        """How a call with n_tokens tokens is tiled (kernels/hybrid_reference.py): what its work depends on."""
        grid = self.grid_for(n_tokens, site_info, causal)
        return tiling(n_tokens, self.window, None if grid is None else (grid.height, grid.width, grid.has_class_token),
                      causal)


class HybridAttention(nn.Module):
    """One site's hybrid attention; forward takes the canonical (q, k, v, mask) layout.

    `mix` (α) is learnable: α = base_mix · exp(mix_log_scale), with the parameter mix_log_scale
    at 0 to start (so α is exactly the config's mix) and α positive whatever it is trained to. A
    mix of 0 (the window and sinks alone) stays 0. Setting `module.mix = value` sets the base and
    resets the scale.
    """

    def __init__(self, config: HybridConfig, site_info: SiteInfo):
        super().__init__()
        self.config = config
        self.site_info = site_info
        self.base_mix = float(config.mix)
        self.mix_log_scale = nn.Parameter(torch.zeros(()))

    @property
    def mix(self) -> torch.Tensor | float:
        """α: a 0-d tensor (differentiable in mix_log_scale), or 0.0 when the base mix is 0."""
        if self.base_mix == 0:
            return 0.0
        return self.base_mix * self.mix_log_scale.double().exp()  # fp64: exactly the base at init, any input dtype

    @mix.setter
    def mix(self, value: float) -> None:
        require_real("mix", value, 0, low_closed=True)
        self.base_mix = float(value)
        with torch.no_grad():
            self.mix_log_scale.zero_()

    def calibration_parameters(self) -> list[nn.Parameter]:
        """What a calibration (attnopt.calibration) fits: the mixing weight (none when it is 0)."""
        return [] if self.base_mix == 0 else [self.mix_log_scale]

    def key_mask(self, mask: torch.Tensor | None, causal: bool, batch: int, n_keys: int) -> torch.Tensor | None:
        """Bool (B, M) of the keys every query may read, or None; raises ValueError for anything
        but key padding (and causality)."""
        if mask is None:
            return None
        rows = causal_key_mask(mask, "hybrid attention") if causal and as_4d(mask).shape[2] > 1 else per_key_mask(mask)
        validity = key_validity(rows)[:, :, 0, :]
        if not torch.compiler.is_compiling():
            if not torch.equal(validity, validity[:, :1].expand_as(validity)):
                raise ValueError("the key mask differs between heads; hybrid attention masks keys per batch row only")
            if rows.is_floating_point() and rows[:, :, 0, :].masked_fill(~validity, 0).count_nonzero() > 0:
                raise ValueError("the additive key mask has values other than 0 and -inf; "
                                 "hybrid attention can only drop keys")
        return validity[:, 0].expand(batch, n_keys)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("hybrid attention cannot apply attention dropout")
        n_tokens = q.shape[2]
        if k.shape[2] != n_tokens:
            raise ValueError(f"hybrid attention's window is by position and needs N == M, got N={n_tokens}, "
                             f"M={k.shape[2]}")
        grid = self.config.grid_for(n_tokens, self.site_info, causal)
        return hybrid_attention_reference(
            q, k, v, scale=scale, sinks=self.config.sinks, window=self.config.window,
            grid=None if grid is None else (grid.height, grid.width, grid.has_class_token),
            feature_map=self.config.feature_map, power=self.config.power, mix=self.mix, causal=causal,
            key_mask=self.key_mask(mask, causal, q.shape[0], n_tokens))


def _refusal(config: HybridConfig, site_info: SiteInfo) -> str | None:
    cross = None
    if not site_info.is_self_attention or site_info.N != site_info.M:
        cross = ("the site is cross-attention, and hybrid attention's window is by position, which queries "
                 "and keys of different sequences do not share.")
    return first_reason(cross, per_query_mask_reason(site_info, NAME), dropout_reason(site_info, NAME))


def _build(config: HybridConfig, site_info: SiteInfo, example: Example | None) -> nn.Module:
    return HybridAttention(config, site_info)


def hybrid_cost(tile: int = 32, band: int = 96, padding: int = 0, sinks: costmodel.Expr = 1,
                feature_map: str = "elu1", n_global: int = 0, gathered: bool = False,
                causal: bool = False) -> costmodel.CostFormula:
    """Hybrid attention computed in tiles of `tile` queries, each scored against a band of `band` keys
    that holds their windows (attnopt/kernels/hybrid_reference.py, `tiling`): N − n_global windowed
    queries and `padding` more slots, to whole tiles; `sinks` sink keys for every query; `n_global`
    rows (a class token) that read all keys; bands `gathered` (a grid) or strided views (1-D).

    Multiply-adds (FLOPs are twice them, as FlopCounterMode counts the module): per tile slot,
    band + sinks keys cost 2d + e each (scores, linear terms, weights·V). band ≥ window: the tile's
    windows together (1-D: tile + w − 1 keys, and up to w/2 more where the tile is shorter than
    w/2 + 1, whose band holds the windows shifted at the ends; a grid: the rows and columns its
    windows reach). The linear part is d·e + d per slot (φ(q) against the states), M·d·e for
    Σφ(k)ᵀv (causal: the tiles' prefix states, all keys but the last tile's); a global row is
    M·(d+e). Bytes: each score block is written by its matmul, then read or rewritten by the
    passes after it (17 reads and writes in all); the bands of K, φ(K) and V are padded copies
    (1-D, read as strided bands) or gathered (every band's keys).
    """
    feature_ops, feature_macs = costmodel.lookup(FEATURE_MAPS, feature_map, "feature map")
    slots = N - n_global + padding  # per head: the tiles' query slots
    rows, keys = B * H * slots, B * Hkv * M
    exact = rows * (band + sinks)  # scores, and as many linear terms
    summed = B * Hkv * (slots - tile) if causal else keys  # the keys the linear states sum
    states = B * Hkv * (slots / tile if causal else 1) * d * (e + 1)  # Σφ(k)ᵀv, Σφ(k): causal, per tile
    band_keys = B * Hkv * (slots / tile * band if gathered else slots)  # gathered, or padded (1-D)
    global_scores = B * H * n_global * M
    return costmodel.CostFormula(
        flops=2 * (exact * (2 * d + e) + rows * (d * e + d) + summed * d * e + global_scores * (d + e)
                   + (rows + keys) * d * feature_macs),
        elementwise_ops=(feature_ops * (rows + keys) * d + keys * d  # φ, Σφ(k)
                         + 8 * exact  # mask (two), max, shift, exp, sums (two), subtract the linear terms
                         + rows * (d + e) + (states if causal else 0)  # scale φ(q) and the output; prefix sums
                         + 3 * global_scores),  # global softmax
        bytes_moved=dtype_bytes * (
            B * H * N * (d + e) + keys * (d + e)  # Q, K, V, O
            + 2 * feature_ops * (rows + keys) * d + 2 * states  # each pass of φ reads and writes; the states
            + 2 * band_keys * (2 * d + e)  # the bands of K, φ(K) and V, written and read
            + 17 * exact  # score blocks: written, masked, max, shift, exp, summed, weighed, read by the matmul
            + rows * (2 * d + 5 * e)  # φ(q) scaled in place; the output accumulated, scaled
            + 2 * global_scores
        ),
        kernel_calls=120,  # matmuls, passes, the tiles' index tensors (about 120 on CPU); the planner counts them
    )


def _cost_params(config: HybridConfig, site_info: SiteInfo) -> dict:
    """The tiles of a call at the site's N (their padding taken as it is there, at any N)."""
    plan = config.tiling(site_info.N, site_info, site_info.causal)
    grid = config.grid_for(site_info.N, site_info, site_info.causal)
    n_global = int(grid is not None and grid.has_class_token)
    padding = plan.n_tiles * plan.tile_size - (site_info.N - n_global)
    return {"tile": plan.tile_size, "band": plan.band_size, "padding": padding, "sinks": min(config.sinks, site_info.N),
            "feature_map": config.feature_map, "n_global": n_global, "gathered": plan.offset is None,
            "causal": site_info.causal}


CANDIDATE_WINDOWS = (16, 64)
CANDIDATE_SINKS = (0, 1)
CANDIDATE_SLIDING_WINDOWS = (16, 32, 64)
"""Windows of the window-and-sink-alone candidates (mix 0) at causal sites: cheap to try (no
linear part to fit), and the sweet spot of a causal model's locality is often between 16 and 64."""


def _candidates(site_info: SiteInfo) -> list[HybridConfig]:
    """Windows of 16 and 64 tokens, without and with one sink, where window + sinks < N/2 (else none);
    none at cross-attention sites, where the window means nothing. At causal sites also the window
    and one sink alone (mix 0: a sliding-window softmax, how causal language models are commonly
    made local), which keeps a small byte-level LM within 2.5 % of its perplexity where the elu+1
    far-key term costs it 10–15 % (bench/RESULTS.md, the causal LM table)."""
    if not site_info.is_self_attention or site_info.N != site_info.M:
        return []
    configs = [HybridConfig(sinks=sinks, window=window) for window in CANDIDATE_WINDOWS for sinks in CANDIDATE_SINKS
               if window + sinks < site_info.N / 2]
    if site_info.causal:
        configs += [HybridConfig(sinks=1, window=window, mix=0.0) for window in CANDIDATE_SLIDING_WINDOWS
                    if window + 1 < site_info.N / 2]
    return configs


register_variant(VariantSpec(
    name=NAME, config_type=HybridConfig, refusal=_refusal, build=_build, cost=hybrid_cost, cost_params=_cost_params,
    candidates=_candidates, shown=("sinks", "window"), heads_independent=True))
