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
  the sums hold (subtracted in the same weighted pass as the exact terms, never an N×M matrix).
  The exact part runs in tiles (`Tiling`): T queries at a time against the one band of L keys
  that holds all their windows, one dense T×L block of scores and one of linear terms per tile
  from batched matmuls, the keys outside each query's window masked by index arithmetic. 1-D
  bands (T + w − 1 keys, up to 3w/2 for tiles under w/2 + 1, whose bands hold the windows shifted
  at the ends) are one strided view of the keys; grid bands (the rows and columns a tile's windows
  reach) are gathered. Sinks are one dense N×s block. Causal sums are exclusive prefix states of
  the tiles: query i reads the keys before its tile's first query, and since T ≤ window those
  keys minus its window are exactly j ≤ i − window. Cost: (L + s)·(2d + e) multiply-adds per
  windowed query (padded to whole tiles) for the exact and subtracted terms, where the window
  alone would be (w + s)·(2d + e); d·e + d for the linear part, M·d·e for the states.
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
    """The windowed queries cut into tiles, and the band of keys that holds each tile's windows.

    The queries lie on a height × width grid (1-D: 1 × N) and a window is rows × cols of it. A
    tile is tile_rows × tile_cols queries (each axis padded to whole tiles; what the padding
    computes is dropped), its band band_rows × band_cols keys: one dense (tile × band) block of
    scores. Along an axis a window starts at most one cell after the one before it, so the windows
    of t consecutive cells lie within t + rows − 1 cells, shifted ends included.

    1-D (offset set): tile b's band is the band_cols keys from b·T − offset on (T = tile_cols),
    every band as long and T further on, so the bands are one strided view of the keys padded at
    both ends (the padding, and keys of neighbouring heads, fall outside every window). Causal:
    the T + w − 1 keys ending at the tile's last query. Not causal, the band also holds the
    shifted windows at the ends: `late` more keys before it for the last tile's (which start up
    to ⌈w/2⌉ − (queries in the last tile) keys before b·T − ⌊w/2⌋), `early` more after it for
    the first tile's (which end at w, up to ⌊w/2⌋ + 1 − T keys after its band's T + w − 1).
    Grid (offset None): each band clamped inside the grid, and gathered.
    """

    height: int
    width: int
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int
    band_rows: int
    band_cols: int
    causal: bool
    offset: int | None

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


TILE_RANGE = (16, 32)
"""Queries per tile of a 1-D window: w/2 within this range (at most N; causal, at most w). Up to
w/2 + 1 queries per tile, a band holds 3w/2 keys whatever the tile (the shifted windows at the
ends need it), so the tile grows to w/2 for larger matmuls; at least 16 keeps them efficient."""

GATHER_WEIGHT = 32
"""What gathering one key of a grid band costs, in scores: a grid tiling minimises
tiles · band · (tile + GATHER_WEIGHT), gathered keys against score work (measured on one thread,
d = e = 64, five to seven tile shapes on a 32×32 grid, window 64, and a 14×14 one, windows 16 and
64: it put the fastest first each time and ranked the others about as their timings did)."""


def tiling(n_tokens: int, window: int, grid: Grid | None = None, causal: bool = False) -> Tiling:
    """How a call's windowed queries are tiled; grid as `_check` returns it (None: a 1-D window)."""
    rows, cols = window_size(window, n_tokens, grid)
    if grid is not None:
        height, width, _ = grid
        tile_rows, tile_cols = _grid_tile(height, width, rows, cols)
        return Tiling(height, width, rows, cols, tile_rows, tile_cols, min(tile_rows + rows - 1, height),
                      min(tile_cols + cols - 1, width), False, None)
    tile = min(max(cols // 2, TILE_RANGE[0]), TILE_RANGE[1], cols if causal else n_tokens)
    if causal:
        return Tiling(1, n_tokens, 1, cols, 1, tile, 1, tile + cols - 1, True, cols - 1)
    last = n_tokens - (-(-n_tokens // tile) - 1) * tile  # queries in the last tile
    late, early = max(0, -(-cols // 2) - last), max(0, cols // 2 + 1 - tile)
    return Tiling(1, n_tokens, 1, cols, 1, tile, 1, tile + cols - 1 + late + early, False, cols // 2 + late)


def _grid_tile(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """(tile_rows, tile_cols) for rows × cols windows on a height × width grid: least
    tiles · band · (tile + GATHER_WEIGHT), ties to the wider, then the lower tile."""

    def cost(tile_rows: int, tile_cols: int) -> tuple[int, int, int]:
        n_tiles = -(-height // tile_rows) * -(-width // tile_cols)
        band = min(tile_rows + rows - 1, height) * min(tile_cols + cols - 1, width)
        return n_tiles * band * (tile_rows * tile_cols + GATHER_WEIGHT), -tile_cols, tile_rows

    def lengths(n: int) -> list[int]:  # the tile lengths that cut n cells into some number of tiles with least padding
        return sorted({-(-n // parts) for parts in range(1, n + 1)})

    best = None  # loops, not min(key=): torch.compile traces this
    for tile_rows in lengths(height):
        for tile_cols in lengths(width):
            if best is None or cost(tile_rows, tile_cols) < cost(*best):
                best = tile_rows, tile_cols
    return best


class _TileIndex(NamedTuple):
    """Index tensors of a tiling: the query in each tile slot (tiles, T), the key in each band slot
    (tiles, L; 1-D: outside 0..N−1 where the band passes the ends), whether a slot's key is in a
    slot's window (tiles, T, L; sink keys out), and each tile's first query (causal: its prefix
    sums hold the keys before it)."""

    queries: torch.Tensor
    keys: torch.Tensor
    window: torch.Tensor
    first: torch.Tensor


def _axis(n: int, window: int, tile: int, band: int, causal: bool, offset: int | None,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of a tiling: each tile's cells (tiles, tile), its band's cells (tiles, band), and whether
    each band cell is in each cell's window (tiles, tile, band)."""
    first = torch.arange(0, n, tile, device=device)
    cells = (first[:, None] + torch.arange(tile, device=device)).clamp_max(n - 1)
    if causal:  # the window cells ending at the cell
        start = cells - (window - 1)
    else:  # the window cells around the cell, shifted at the ends
        start = (cells - window // 2).clamp(0, n - window)
    band_start = first - offset if offset is not None else (first - window // 2).clamp(0, n - band)
    band_cells = band_start[:, None] + torch.arange(band, device=device)
    inside = (band_cells[:, None, :] >= start[:, :, None]) & (band_cells[:, None, :] < start[:, :, None] + window)
    return cells, band_cells, inside


def _tile_index(plan: Tiling, n_global: int, n_sinks: int, device: torch.device) -> _TileIndex:
    """The tiling's index tensors, the grid's two axes combined; keys after `n_global` class tokens."""
    rows, row_band, row_inside = _axis(plan.height, plan.rows, plan.tile_rows, plan.band_rows, plan.causal,
                                       None if plan.offset is None else 0, device)
    cols, col_band, col_inside = _axis(plan.width, plan.cols, plan.tile_cols, plan.band_cols, plan.causal,
                                       plan.offset, device)
    queries = (rows[:, None, :, None] * plan.width + cols[None, :, None, :]).reshape(plan.n_tiles, plan.tile_size)
    keys = (row_band[:, None, :, None] * plan.width + col_band[None, :, None, :]).reshape(
        plan.n_tiles, plan.band_size) + n_global
    window = (row_inside[:, None, :, None, :, None] & col_inside[None, :, None, :, None, :]).reshape(
        plan.n_tiles, plan.tile_size, plan.band_size) & (keys >= n_sinks)[:, None, :]
    return _TileIndex(queries, keys, window, queries[:, 0])


def _slots(plan: Tiling, device: torch.device) -> torch.Tensor:
    """Where each query (in its order) sits in the tiles laid end to end (T slots per tile)."""
    tiles_down, tiles_across = -(-plan.height // plan.tile_rows), -(-plan.width // plan.tile_cols)
    slots = torch.arange(plan.n_tiles * plan.tile_size, device=device).view(
        tiles_down, tiles_across, plan.tile_rows, plan.tile_cols).transpose(1, 2)  # by padded grid row and column
    slots = slots.reshape(tiles_down * plan.tile_rows, tiles_across * plan.tile_cols)
    return slots[:plan.height, :plan.width].flatten()


def _bands(x: torch.Tensor, plan: Tiling, keys: torch.Tensor) -> torch.Tensor:
    """Each tile's band of keys, transposed: (B, Hkv, N, c) → (B·Hkv·tiles, c, L).

    1-D: a strided view (no copy of the bands) of the keys laid out T·tiles apart per head, after
    `offset` zeros; a grid: gathered (keys (tiles, L) in 0..N−1).
    """
    batch, heads, n_tokens, width = x.shape
    n_tiles, tile, band = plan.n_tiles, plan.tile_cols, plan.band_size
    if plan.offset is None:
        return x.index_select(2, keys.flatten()).view(batch * heads * n_tiles, band, width).mT
    period = n_tiles * tile  # (cat, not pad: pad writes its whole output twice, zeros then the copy)
    if period > n_tokens:
        x = torch.cat([x, x.new_zeros(batch, heads, period - n_tokens, width)], dim=2)
    end = batch * heads * period - tile + band  # where the last band ends, after the offset
    flat = torch.cat([x.new_zeros(plan.offset, width), x.reshape(batch * heads * period, width),
                      x.new_zeros(max(0, end - plan.offset - batch * heads * period), width)])
    return flat.unfold(0, band, tile)[:batch * heads * n_tiles]


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
    mix: float | torch.Tensor = 1.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hybrid attention in state form; q (B, H, N, d), k (B, Hkv, N, d), v (B, Hkv, N, e) → (B, H, N, e).

    key_mask: bool (B, N), True where the key may be attended. grid applies when its token count
    is N and the call is not causal (else the window is 1-D). Computes in fp32 for half inputs
    and returns q's dtype. See the module docstring for the math, the tiles and the stabilisation.
    Without autograd (and not traced) the score blocks are reused in place.
    """
    grid = _check(q, k, v, sinks, window, grid, causal)
    out_dtype, dtype = q.dtype, accumulation_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, n_heads, n_tokens, _ = q.shape
    n_kv_heads, group, e = k.shape[1], n_heads // k.shape[1], v.shape[3]
    n_global = int(grid is not None and grid[2])  # a class token reads every key exactly
    n_rows = n_tokens - n_global
    n_sinks = min(sinks, n_tokens)
    valid = None if key_mask is None else key_mask.reshape(batch, n_tokens).to(torch.bool)
    in_place = not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, mix)))
    plan = tiling(n_tokens, window, grid, causal)
    index = _tile_index(plan, n_global, n_sinks, q.device)
    n_tiles, tile, band = plan.n_tiles, plan.tile_size, plan.band_size
    heads, rows = batch * n_kv_heads, group * tile  # per kv head and tile: its G query heads' T queries

    def tiled(x: torch.Tensor) -> torch.Tensor:  # (B, H, R, d) → (B·Hkv·tiles, G·T, d); head h: kv head h // G
        x = x.reshape(batch, n_kv_heads, group, n_rows, x.shape[-1])
        if not plan.in_order:
            x = x.index_select(3, index.queries.flatten())
        elif n_tiles * tile != n_rows:
            x = torch.nn.functional.pad(x, (0, 0, 0, n_tiles * tile - n_rows))
        x = x.reshape(batch, n_kv_heads, group, n_tiles, tile, x.shape[-1]).transpose(2, 3)
        return x.reshape(heads * n_tiles, rows, x.shape[-1]).contiguous()

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B·Hkv·tiles, G·T, ·) → (B, Hkv, tiles, G, T, ·)
        return x.view(batch, n_kv_heads, n_tiles, group, tile, x.shape[-1])

    def per_slot(x: torch.Tensor) -> torch.Tensor:  # (B or 1, tiles, T, ·) → broadcastable to blocks
        return x.reshape(x.shape[0], 1, n_tiles, 1, tile, x.shape[-1])

    root = math.sqrt(scale)
    key_features = apply_feature_map(k, feature_map, power, root)
    if valid is not None:  # where, not ·: a masked key's inf or NaN features stay out
        key_features = (key_features.masked_fill_(~valid[:, None, :, None], 0) if in_place
                        else torch.where(valid[:, None, :, None], key_features, 0))
    queries = tiled(q[:, :, n_global:])
    query_features = apply_feature_map(queries, feature_map, power, root)
    nothing = queries.new_zeros(()).expand(1, 1, 1)  # what the scaled products add to (baddbmm, beta 0)

    # the exact keys of each query: its window within its tile's band (sink keys taken out of it), then the sinks
    member = index.window[None]
    if valid is not None:
        member = member & valid[:, index.keys.clamp(0, n_tokens - 1)][:, :, None, :]
    summed = member if not causal else member & (index.keys < index.first[:, None])[:, None, :]
    scores = blocks(torch.baddbmm(nothing, queries, _bands(k, plan, index.keys), beta=0, alpha=scale)).masked_fill_(
        per_slot(~member), -math.inf)  # in place: a matmul keeps no output for its backward
    linear = blocks(torch.bmm(query_features, _bands(key_features, plan, index.keys))).masked_fill_(
        per_slot(~summed), 0)
    row_max, linear_sum = scores.amax(-1, keepdim=True), linear.sum(-1, keepdim=True)
    n_exact_summed = per_slot(summed.sum(-1, keepdim=True))
    if n_sinks:
        sink_keys = torch.arange(n_sinks, device=q.device)
        sink_member = (sink_keys <= index.queries[:, :, None])[None] if causal else sink_keys.new_ones(
            1, n_tiles, tile, n_sinks, dtype=torch.bool)
        if valid is not None:
            sink_member = sink_member & valid[:, None, None, :n_sinks]
        sink_summed = sink_member if not causal else sink_member & (sink_keys < index.first[:, None, None])

        def per_sink(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, n, d) → (B·Hkv, d, sinks)
            return x[:, :, :n_sinks].reshape(heads, n_sinks, x.shape[-1]).mT

        sink_scores = blocks(torch.baddbmm(nothing, queries.view(heads, n_tiles * rows, -1), per_sink(k), beta=0,
                                           alpha=scale).view(
            heads * n_tiles, rows, n_sinks)).masked_fill_(per_slot(~sink_member), -math.inf)
        sink_linear = blocks(torch.bmm(query_features.view(heads, n_tiles * rows, -1), per_sink(key_features)).view(
            heads * n_tiles, rows, n_sinks)).masked_fill_(per_slot(~sink_summed), 0)
        row_max = torch.maximum(row_max, sink_scores.amax(-1, keepdim=True))
        linear_sum = linear_sum + sink_linear.sum(-1, keepdim=True)
        n_exact_summed = n_exact_summed + per_slot(sink_summed.sum(-1, keepdim=True))

    # the linear part: φ(q) against the sums over every valid key, or causal the keys before the query's tile
    if causal:
        state, key_sum = _prefix_states(key_features, v, tile, n_tiles)  # (B·Hkv·tiles, d, e), (…, d, 1)
        n_summed = (index.first.to(dtype)[None] if valid is None else torch.nn.functional.pad(
            valid.to(dtype).cumsum(-1), (1, 0))[:, index.first])  # valid keys before each tile
        by_state = (heads * n_tiles, rows)
    else:
        state, key_sum = key_features.mT @ v, key_features.sum(-2, keepdim=True).mT
        state, key_sum = state.reshape(heads, *state.shape[2:]), key_sum.reshape(heads, *key_sum.shape[2:])
        n_summed = (torch.full((1, 1), float(n_tokens), device=q.device) if valid is None
                    else valid.to(dtype).sum(-1, keepdim=True))
        by_state = (heads, n_tiles * rows)
    denominator_all = blocks(torch.bmm(query_features.view(*by_state, -1), key_sum).view(heads * n_tiles, rows, 1))
    n_summed = n_summed.reshape(-1, 1, n_summed.shape[-1], 1, 1, 1)

    # one normaliser: shift by c = max(m, log(α·Σ_L φ·φ)), the linear terms scaled by α·e^{-c}
    n_linear = n_summed - n_exact_summed  # keys in the linear part, counted exactly
    linear_denominator = (denominator_all - linear_sum).clamp_min(0)
    has_linear = (n_linear > 0) & (linear_denominator >= torch.finfo(dtype).tiny) & (mix > 0)
    linear_denominator = torch.where(has_linear, linear_denominator, 0)
    log_linear = torch.where(has_linear, (mix * torch.where(has_linear, linear_denominator, 1)).log(), -math.inf)
    shift = torch.maximum(row_max, log_linear)  # (no log of 0 in the graph: its gradient would be NaN)
    shift = torch.where(shift.isfinite(), shift, 0)  # a row with nothing visible: 0 / 0 below, set to 0
    linear_scale = torch.where(has_linear, mix * (-shift).exp(), 0)
    exact = scores.sub_(shift).exp_() if in_place else (scores - shift).exp()
    denominator = exact.sum(-1, keepdim=True) + linear_scale * linear_denominator
    # the exact terms, less the linear terms the sums hold of them
    weights = (exact.addcmul_(linear, linear_scale, value=-1) if in_place
               else torch.addcmul(exact, linear, linear_scale, value=-1))

    def accumulate(total: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        # total + first @ second, without autograd into total (out=, which FlopCounterMode counts, as not baddbmm_)
        return torch.baddbmm(total, first, second, out=total if in_place else None)

    numerator = torch.bmm(weights.view(heads * n_tiles, rows, band), _bands(v, plan, index.keys).mT)
    scaled_features = blocks(query_features).mul_(linear_scale) if in_place else blocks(query_features) * linear_scale
    numerator = accumulate(numerator.view(*by_state, e), scaled_features.view(*by_state, -1), state)
    if n_sinks:
        sink_exact = (sink_scores - shift).exp()
        denominator = denominator + sink_exact.sum(-1, keepdim=True)
        sink_weights = torch.addcmul(sink_exact, sink_linear, linear_scale, value=-1)
        numerator = accumulate(numerator.view(heads, n_tiles * rows, e), sink_weights.view(
            heads, n_tiles * rows, n_sinks), v[:, :, :n_sinks].reshape(heads, n_sinks, e))
    reciprocal = torch.where(denominator > 0, 1 / denominator.clamp_min(torch.finfo(dtype).tiny), 0)
    out = blocks(numerator.view(heads * n_tiles, rows, e))
    out = out.mul_(reciprocal) if in_place else out * reciprocal

    out = out.transpose(2, 3).reshape(batch, n_kv_heads, group, n_tiles * tile, e)  # back in query order
    out = out[:, :, :, :n_rows] if plan.in_order else out.index_select(3, _slots(plan, q.device))
    if n_global:
        out = torch.cat([_global_rows(q[:, :, :n_global], k, v, valid, scale).reshape(
            batch, n_kv_heads, group, n_global, e), out], dim=3)
    return out.reshape(batch, n_heads, n_tokens, e).to(out_dtype)


def _prefix_states(key_features: torch.Tensor, v: torch.Tensor, tile: int,
                   n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{j < first} φ(k_j)ᵀ v_j and Σ_{j < first} φ(k_j) for each tile's first query `first`:
    (B·Hkv·tiles, d, e) and (B·Hkv·tiles, d, 1), exclusive prefix sums over the key chunks of the
    tiles before it, so the states cost (tiles − 1)·T·d·e multiply-adds (the last tile's keys are
    never summed). The sums run over the innermost dim (cumsum over an outer one is several times
    slower on CPU)."""
    batch, n_kv_heads, _, d = key_features.shape
    e, summed = v.shape[-1], (n_tiles - 1) * tile
    chunks = key_features[:, :, :summed].reshape(batch, n_kv_heads, n_tiles - 1, tile, d)
    states = chunks.mT @ v[:, :, :summed].reshape(batch, n_kv_heads, n_tiles - 1, tile, e)  # (B, Hkv, tiles−1, d, e)
    sums = chunks.sum(-2)  # (B, Hkv, tiles − 1, d)

    def before(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, tiles − 1, ·) → (B·Hkv·tiles, ·): 0, running sums
        return torch.nn.functional.pad(x.mT, (1, 0)).cumsum(-1).mT.reshape(batch * n_kv_heads * n_tiles, -1)

    return before(states.flatten(3)).view(-1, d, e), before(sums).view(-1, d, 1)


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
