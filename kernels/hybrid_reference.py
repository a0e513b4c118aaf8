"""Plain-PyTorch hybrid attention: exact softmax over sinks and a local window, linear attention elsewhere.

For query i, with S_i = sinks ∪ window(i) (its exact set) and L_i the visible keys outside S_i:

    out_i = (Σ_{j∈S_i} e^{s_ij} v_j + α Σ_{j∈L_i} φ(q_i)·φ(k_j) v_j)
            / (Σ_{j∈S_i} e^{s_ij}     + α Σ_{j∈L_i} φ(q_i)·φ(k_j)),          s_ij = q_i·k_j·scale

One normaliser: the linear kernel φ(q)·φ(k) stands in for e^{s} itself, term for term, so the two
parts are weighed on one absolute scale and α (`mix`) is the one knob between them. φ is applied
to √scale·q and √scale·k, as linear attention does (attnopt/variants/linear.py). For stability
every term is multiplied by e^{-c_i} (which cancels): the exact terms become e^{s_ij − c_i} and
the linear ones α·e^{-c_i}·φ(q_i)·φ(k_j). The dense form takes c_i = m_i, the row max over S_i,
as the formula is usually written; the state form takes c_i = max(m_i, log(α Σ_{L_i} φ·φ)), so
that neither part can overflow (both are at most 1 after the shift) and the denominator is at
least 1 — e^{-m_i} alone overflows when every exact score of a row is very negative.

Which keys are where (N = M: the window is by position):
- sinks: the first `sinks` keys, for every query (causal: those at or before it);
- window, 1-D: the `window` keys nearest the query, the run shifted at the sequence's ends so it
  always holds min(window, N) keys (as neighbourhood attention does); causal: the `window` keys
  ending at the query (fewer at the start);
- window on a token grid (height, width, has_class_token), non-causal only: the rows × cols patch
  neighbourhood, rows = min(⌊√window⌋, height), cols = min(window // rows, width), shifted at the
  grid's edges; a class token is not on the grid, so it reads every key exactly (a global row);
- the linear part: every other visible key (causal: j ≤ i); a key that is masked (key_mask False)
  is in neither part.
A row that sees no key gives 0.

Two spellings of it:
- `hybrid_attention_reference`, the state form (the module's CPU path): the linear part is φ(q)
  against the sums Σφ(k)ᵀv and Σφ(k) over all keys, minus the linear terms of the exact keys that
  the sums hold (subtracted in the same weighted pass as the exact terms, never an N×M matrix);
  the exact part gathers each query's window (N·w·d). Causal sums are exclusive prefix states of
  chunks of T = window tokens: query i reads the chunks before its own, all keys j < ⌊i/T⌋·T, and
  since T ≤ window those keys minus its window are exactly j ≤ i − window. Cost: N·(w+s)·(2d+e)
  multiply-adds for the exact and subtracted terms, (N+M)·d·e + N·d for the linear part.
- `hybrid_attention_quadratic`, the test oracle: the full N×M weight matrix (`hybrid_weights`)
  written out from the definitions above, in float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from .exact_reference import accumulation_dtype, repeat_kv_heads
from .linear_reference import apply_feature_map

Grid = tuple[int, int, bool]
"""(height, width, has_class_token): tokens laid out row-major on a grid, after one class token if any."""


def window_size(window: int, n_tokens: int, grid: Grid | None = None) -> tuple[int, int]:
    """(rows, cols) of the window actually used: (1, min(window, N)) in 1-D, rows × cols on a grid."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if grid is None:
        return 1, min(window, n_tokens)
    height, width, _ = grid
    rows = min(math.isqrt(window), height)
    return rows, min(window // rows, width)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The windowed queries cut into tiles, and the one band of keys that holds each tile's windows.

    The queries lie on a height × width grid (1-D: 1 × N) and a window is rows × cols of it. A
    tile is tile_rows × tile_cols queries, the last tile of each axis padded with repeats of the
    axis's last query. Along an axis a window starts at most one cell after the one before it
    (shifted ends included), so the windows of t consecutive cells lie within t + rows − 1 cells:
    each tile reads one band_rows × band_cols block of keys (causal, 1-D: the t + cols − 1 keys
    ending at its last query), computed as one dense (tile × band) block of scores.
    """

    height: int
    width: int
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int
    causal: bool

    @property
    def band_rows(self) -> int:
        return min(self.tile_rows + self.rows - 1, self.height)

    @property
    def band_cols(self) -> int:
        return min(self.tile_cols + self.cols - 1, self.width)

    @property
    def n_tiles(self) -> int:
        return -(-self.height // self.tile_rows) * -(-self.width // self.tile_cols)

    @property
    def tile_size(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def band_size(self) -> int:
        return self.band_rows * self.band_cols

    @property
    def in_order(self) -> bool:
        """Whether the tiles, one after another, hold the queries in order (any padding at the end)."""
        return self.tile_cols == self.width or (self.tile_rows == 1 and (self.height == 1
                                                                         or self.width % self.tile_cols == 0))


def tiling(n_tokens: int, window: int, grid: Grid | None = None, causal: bool = False) -> Tiling:
    """How a call's windowed queries are tiled (grid: as `_check` returns it, None for 1-D windows).

    1-D: tiles of T = min(TILE, the window) queries, so that each query's scores cover T + w − 1
    keys (at most 2w − 1; causal prefix chunks are the tiles, and must not be longer than the
    window). A grid: TILE_ROWS × TILE_COLS patches (within the grid).
    """
    rows, cols = window_size(window, n_tokens, grid)
    if grid is None:
        return Tiling(1, n_tokens, 1, cols, 1, min(TILE, cols) if causal else min(TILE, n_tokens), causal)
    height, width, _ = grid
    return Tiling(height, width, rows, cols, min(TILE_ROWS, height), min(TILE_COLS, width), causal)


TILE = 32
TILE_ROWS, TILE_COLS = 4, 8


class _TileIndex(NamedTuple):
    """Index tensors of a tiling: which query fills each tile slot (n_tiles, T) and which key each band
    slot holds (n_tiles, L); whether a slot's key is in a slot's window (n_tiles, T, L), sink keys out; causal:
    each tile's first query (its prefix sums hold the keys before it) and each slot's query position."""

    queries: torch.Tensor
    keys: torch.Tensor
    window: torch.Tensor
    first: torch.Tensor | None
    positions: torch.Tensor | None


def _axis(n: int, window: int, tile: int, band: int, causal: bool,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of a tiling: each tile's cells (tiles, tile), its band's cells (tiles, band), and whether
    each band cell is in each cell's window (tiles, tile, band)."""
    first = torch.arange(0, n, tile, device=device)
    cells = (first[:, None] + torch.arange(tile, device=device)).clamp_max(n - 1)
    if causal:  # the window cells ending at the cell
        start = cells - (window - 1)
        band_start = (first - (window - 1)).clamp(0, n - band)
    else:  # the window cells around the cell, shifted at the ends
        start = (cells - window // 2).clamp(0, n - window)
        band_start = (first - window // 2).clamp(0, n - band)
    band_cells = band_start[:, None] + torch.arange(band, device=device)
    inside = (band_cells[:, None, :] >= start[:, :, None]) & (band_cells[:, None, :] < start[:, :, None] + window)
    return cells, band_cells, inside


def _tile_index(plan: Tiling, n_global: int, n_sinks: int, device: torch.device) -> _TileIndex:
    rows, row_band, row_inside = _axis(plan.height, plan.rows, plan.tile_rows, plan.band_rows, plan.causal, device)
    cols, col_band, col_inside = _axis(plan.width, plan.cols, plan.tile_cols, plan.band_cols, plan.causal, device)
    queries = (rows[:, None, :, None] * plan.width + cols[None, :, None, :]).reshape(plan.n_tiles, plan.tile_size)
    keys = (row_band[:, None, :, None] * plan.width + col_band[None, :, None, :]).reshape(
        plan.n_tiles, plan.band_size) + n_global
    window = (row_inside[:, None, :, None, :, None] & col_inside[None, :, None, :, None, :]).reshape(
        plan.n_tiles, plan.tile_size, plan.band_size) & (keys >= n_sinks)[:, None, :]
    if not plan.causal:
        return _TileIndex(queries, keys, window, None, None)
    return _TileIndex(queries, keys, window, queries[:, 0], queries)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: int, window: int, grid: Grid | None,
           causal: bool) -> Grid | None:
    n_heads, n_kv_heads, n_tokens = q.shape[1], k.shape[1], q.shape[2]
    if k.shape[2] != n_tokens or v.shape[2] != n_tokens:
        raise ValueError(f"hybrid attention needs as many keys as queries (its window is by position), got "
                         f"N={n_tokens} queries and M={k.shape[2]} keys")
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} kv heads")
    if sinks < 0 or window < 1:
        raise ValueError(f"hybrid attention needs sinks ≥ 0 and window ≥ 1, got {sinks} and {window}")
    if grid is not None and (causal or grid[0] * grid[1] + int(grid[2]) != n_tokens):
        return None  # causal windows look back in sequence order; a grid of other tokens does not apply
    return grid


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sinks: int,
    window: int,
    grid: Grid | None = None,
    feature_map: str = "elu1",
    power: float = 3.0,
    mix: float = 1.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hybrid attention in state form; q (B, H, N, d), k (B, Hkv, N, d), v (B, Hkv, N, e) → (B, H, N, e).

    key_mask: bool (B, N), True where the key may be attended. grid applies when its token count
    is N and the call is not causal (else the window is 1-D). Computes in fp32 for half inputs
    and returns q's dtype. See the module docstring for the math, the tiles and the stabilisation.
    """
    grid = _check(q, k, v, sinks, window, grid, causal)
    out_dtype, dtype = q.dtype, accumulation_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, n_heads, n_tokens, d = q.shape
    n_kv_heads, group, e = k.shape[1], n_heads // k.shape[1], v.shape[3]
    n_global = int(grid is not None and grid[2])  # a class token reads every key exactly
    n_rows = n_tokens - n_global
    n_sinks = min(sinks, n_tokens)
    valid = None if key_mask is None else key_mask.reshape(batch, n_tokens).to(torch.bool)
    plan = tiling(n_tokens, window, grid, causal)
    index = _tile_index(plan, n_global, n_sinks, q.device)
    n_tiles, tile, band = plan.n_tiles, plan.tile_size, plan.band_size
    padded = not plan.in_order or n_tiles * tile != n_rows

    def tiled(x: torch.Tensor) -> torch.Tensor:  # (B, H, R, ·) → (B, Hkv, tiles, G·T, ·); head h reads kv head h // G
        x = x.reshape(batch, n_kv_heads, group, n_rows, x.shape[-1])
        if padded:
            x = x.index_select(3, index.queries.flatten())
        x = x.reshape(batch, n_kv_heads, group, n_tiles, tile, x.shape[-1]).transpose(2, 3)
        return x.reshape(batch, n_kv_heads, n_tiles, group * tile, x.shape[-1])

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, tiles, G·T, ·) → (B, Hkv, tiles, G, T, ·)
        return x.view(batch, n_kv_heads, n_tiles, group, tile, x.shape[-1])

    def rows_of(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, tiles, G·T, ·) → (B, Hkv, tiles·G·T, ·)
        return x.reshape(batch, n_kv_heads, n_tiles * group * tile, x.shape[-1])

    def banded(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, N, ·) → each tile's band of keys (B, Hkv, tiles, L, ·)
        return x.index_select(2, index.keys.flatten()).view(batch, n_kv_heads, n_tiles, band, x.shape[-1])

    def per_slot(x: torch.Tensor) -> torch.Tensor:  # (B or 1, tiles, T, ·) → broadcastable to (B, Hkv, tiles, G, T, ·)
        return x.reshape(x.shape[0], 1, n_tiles, 1, tile, x.shape[-1])

    root = math.sqrt(scale)
    key_features = apply_feature_map(k, feature_map, power, root)
    if valid is not None:  # where, not ·: a masked key's inf or NaN features stay out
        key_features = torch.where(valid[:, None, :, None], key_features, 0)
    queries = tiled(q[:, :, n_global:])
    query_features = apply_feature_map(queries, feature_map, power, root)
    queries = queries * scale

    # the linear part over every key the sums hold: all valid keys, or causal the keys before the query's tile
    if causal:
        numerator_all, denominator_all = _causal_prefix(query_features, key_features, v, tile)
        if valid is None:
            n_summed = index.first.to(dtype).reshape(1, 1, n_tiles, 1, 1, 1)
        else:
            counts = torch.nn.functional.pad(valid.to(dtype).cumsum(-1), (1, 0))  # valid keys before each index
            n_summed = counts[:, index.first].reshape(batch, 1, n_tiles, 1, 1, 1)
    else:
        state, key_sum = key_features.mT @ v, key_features.sum(-2, keepdim=True).mT
        numerator_all = blocks((rows_of(query_features) @ state).view(batch, n_kv_heads, n_tiles, group * tile, e))
        denominator_all = blocks((rows_of(query_features) @ key_sum).view(batch, n_kv_heads, n_tiles, group * tile, 1))
        n_summed = (torch.full((1, 1, 1, 1, 1, 1), float(n_tokens), device=q.device) if valid is None
                    else valid.to(dtype).sum(-1).reshape(batch, 1, 1, 1, 1, 1))

    # the exact keys of each query: its window within its tile's band (sink keys taken out of it), then the sinks
    member = index.window if valid is None else index.window & valid[:, index.keys][:, :, None, :]
    summed = member if not causal else member & (index.keys < index.first[:, None])[:, None, :]
    member, summed = per_slot(member.reshape(-1, n_tiles, tile, band)), per_slot(summed.reshape(-1, n_tiles, tile, band))
    scores = blocks(queries @ banded(k).mT).masked_fill_(~member, -math.inf)  # in place: matmul keeps no output
    linear = blocks(query_features @ banded(key_features).mT).masked_fill_(~summed, 0)
    row_max, linear_sum, n_exact_summed = scores.amax(-1, keepdim=True), linear.sum(-1, keepdim=True), summed.sum(-1, keepdim=True)
    if n_sinks:
        sink_keys = torch.arange(n_sinks, device=q.device)
        sink_member = (torch.ones(1, n_tiles, tile, n_sinks, dtype=torch.bool, device=q.device) if not causal
                       else (sink_keys <= index.positions[:, :, None])[None])
        if valid is not None:
            sink_member = sink_member & valid[:, None, None, :n_sinks]
        sink_summed = sink_member if not causal else sink_member & (sink_keys < index.first[:, None, None])
        sink_member, sink_summed = per_slot(sink_member), per_slot(sink_summed)
        sink_scores = blocks((rows_of(queries) @ k[:, :, :n_sinks].mT).view(
            batch, n_kv_heads, n_tiles, group * tile, n_sinks)).masked_fill_(~sink_member, -math.inf)
        sink_linear = blocks((rows_of(query_features) @ key_features[:, :, :n_sinks].mT).view(
            batch, n_kv_heads, n_tiles, group * tile, n_sinks)).masked_fill_(~sink_summed, 0)
        row_max = torch.maximum(row_max, sink_scores.amax(-1, keepdim=True))
        linear_sum = linear_sum + sink_linear.sum(-1, keepdim=True)
        n_exact_summed = n_exact_summed + sink_summed.sum(-1, keepdim=True)

    # one normaliser: shift by c = max(m, log(α·Σ_L φ·φ)), the linear terms scaled by α·e^{-c}
    n_linear = n_summed - n_exact_summed  # keys in the linear part, counted exactly
    linear_denominator = (denominator_all - linear_sum).clamp_min(0)
    has_linear = (n_linear > 0) & (linear_denominator >= torch.finfo(dtype).tiny) & (mix > 0)
    linear_denominator = torch.where(has_linear, linear_denominator, 0)
    shift = torch.maximum(row_max, (mix * linear_denominator).log())
    shift = torch.where(shift.isfinite(), shift, 0)  # a row with nothing visible: 0 / 0 below, set to 0
    linear_scale = torch.where(has_linear, mix * (-shift).exp(), 0)
    exact = (scores - shift).exp()
    weights = torch.addcmul(exact, linear, linear_scale, value=-1)  # less the linear terms the sums hold of them
    numerator = linear_scale * numerator_all + blocks(
        weights.view(batch, n_kv_heads, n_tiles, group * tile, band) @ banded(v))
    denominator = exact.sum(-1, keepdim=True) + linear_scale * linear_denominator
    if n_sinks:
        sink_exact = (sink_scores - shift).exp()
        sink_weights = torch.addcmul(sink_exact, sink_linear, linear_scale, value=-1)
        numerator = numerator + blocks((rows_of(sink_weights.reshape(
            batch, n_kv_heads, n_tiles, group * tile, n_sinks)) @ v[:, :, :n_sinks]).view(
            batch, n_kv_heads, n_tiles, group * tile, e))
        denominator = denominator + sink_exact.sum(-1, keepdim=True)
    out = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(dtype).tiny), 0)

    out = out.transpose(2, 3).reshape(batch, n_kv_heads, group, n_tiles * tile, e)  # back in query order
    out = out[:, :, :, :n_rows] if plan.in_order else out.index_select(3, _slots(plan, q.device))
    if n_global:
        out = torch.cat([_global_rows(q[:, :, :n_global], k, v, valid, scale).reshape(
            batch, n_kv_heads, group, n_global, e), out], dim=3)
    return out.reshape(batch, n_heads, n_tokens, e).to(out_dtype)


def _causal_prefix(query_features: torch.Tensor, key_features: torch.Tensor, v: torch.Tensor,
                   tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{j < first} φ(q_i)·φ(k_j) v_j and the same without v_j, `first` the first query of i's tile: (B, Hkv,
    tiles, G, T, e) and (B, Hkv, tiles, G, T, 1) from query features (B, Hkv, tiles, G·T, d).

    The state before tile t sums the key chunks of the tiles before it (exclusive prefix sums),
    so the states cost (tiles − 1)·T·d·e multiply-adds: the last tile's keys are never summed.
    """
    batch, n_kv_heads, n_tiles, rows, d = query_features.shape
    e, summed = v.shape[-1], (n_tiles - 1) * tile
    chunks = key_features[:, :, :summed].reshape(batch, n_kv_heads, n_tiles - 1, tile, d)
    states = chunks.mT @ v[:, :, :summed].reshape(batch, n_kv_heads, n_tiles - 1, tile, e)  # (B, Hkv, tiles−1, d, e)
    sums = chunks.sum(-2).unsqueeze(-1)  # (B, Hkv, tiles − 1, d, 1)
    before = torch.cat([states.new_zeros(batch, n_kv_heads, 1, d, e), states.cumsum(2)], dim=2)
    sums_before = torch.cat([sums.new_zeros(batch, n_kv_heads, 1, d, 1), sums.cumsum(2)], dim=2)
    shape = (batch, n_kv_heads, n_tiles, rows // tile, tile)
    return (query_features @ before).view(*shape, e), (query_features @ sums_before).view(*shape, 1)


def _slots(plan: Tiling, device: torch.device) -> torch.Tensor:
    """Where each query (in its order) sits in the tiles laid end to end (within one head's G·… rows: T per tile)."""
    position = torch.arange(plan.height * plan.width, device=device)
    row, col = position // plan.width, position % plan.width
    tiles_across = -(-plan.width // plan.tile_cols)
    tile = (row // plan.tile_rows) * tiles_across + col // plan.tile_cols
    return tile * plan.tile_size + (row % plan.tile_rows) * plan.tile_cols + col % plan.tile_cols


def _global_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """Exact softmax attention of a few queries (B, H, n, d) over every valid key; 0 where none is valid."""
    grouped = q.reshape(q.shape[0], k.shape[1], -1, q.shape[-1])
    scores = (grouped @ k.mT) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    maximum = scores.amax(-1, keepdim=True)
    weights = (scores - torch.where(maximum.isfinite(), maximum, 0)).exp()
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, (weights @ v) / total.clamp_min(torch.finfo(q.dtype).tiny), 0)


def hybrid_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    sinks: int,
    window: int,
    grid: Grid | None = None,
    feature_map: str = "elu1",
    power: float = 3.0,
    mix: float = 1.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense (B, H, N, N) float64 weights of hybrid attention, written out from the definitions.

    Rows sum to 1 (0 for a row that sees no key). c_i = m_i, the row max over the exact set, as
    the formula is usually written (float64 keeps e^{-m_i} finite at test scales).
    """
    grid = _check(q, k, k, sinks, window, grid, causal)
    batch, n_heads, n_tokens, _ = q.shape
    q, k = q.double(), repeat_kv_heads(k, n_heads).double()
    i = torch.arange(n_tokens, device=q.device)[:, None]
    j = torch.arange(n_tokens, device=q.device)[None, :]
    visible = torch.ones(batch, 1, n_tokens, n_tokens, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        visible = visible & key_mask.reshape(batch, 1, 1, n_tokens).to(torch.bool)
    if causal:
        visible = visible & (j <= i)
    if causal:
        near = (j <= i) & (j > i - window)
    elif grid is None:
        width = min(window, n_tokens)
        start = (i - width // 2).clamp(0, n_tokens - width)
        near = (j >= start) & (j < start + width)
    else:
        height, grid_width, has_class_token = grid
        first = int(has_class_token)
        rows = min(math.isqrt(window), height)
        cols = min(window // rows, grid_width)
        query_row, query_col = (i - first) // grid_width, (i - first) % grid_width
        key_row, key_col = (j - first) // grid_width, (j - first) % grid_width
        row0 = (query_row - rows // 2).clamp(0, height - rows)
        col0 = (query_col - cols // 2).clamp(0, grid_width - cols)
        near = ((key_row >= row0) & (key_row < row0 + rows) & (key_col >= col0) & (key_col < col0 + cols)
                & (j >= first))
        near = near | (i < first)  # the class token reads every key exactly
    exact_set = visible & ((j < sinks) | near)
    linear_set = visible & ~exact_set
    scores = (q @ k.mT) * scale
    root = math.sqrt(scale)
    linear = (apply_feature_map(q * root, feature_map, power)
              @ apply_feature_map(k * root, feature_map, power).mT)
    row_max = torch.where(exact_set, scores, -math.inf).amax(-1, keepdim=True)
    row_max = torch.where(row_max.isfinite(), row_max, 0)
    weights = (torch.where(exact_set, (scores - row_max).exp(), 0)
               + mix * (-row_max).exp() * torch.where(linear_set, linear, 0))
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total, 0)


def hybrid_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:
    """Hybrid attention as its dense N×N weights applied to v (the oracle), float64; options as hybrid_weights."""
    weights = hybrid_weights(q, k, **options)
    return weights @ repeat_kv_heads(v, q.shape[1]).double()
