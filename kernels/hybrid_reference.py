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

import math

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


def window_indices(n_tokens: int, window: int, *, causal: bool, grid: Grid | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each windowed query's window: key indices (R, w) and whether each slot is a real key (R, w).

    R is N, or the patches of a grid with a class token (its row 0 is global). Causal windows
    before the sequence's start hold slots < 0; they are clamped to 0 and marked out.
    """
    rows, cols = window_size(window, n_tokens, grid)
    if grid is None:
        position = torch.arange(n_tokens, device=device)[:, None]
        offsets = torch.arange(cols, device=device)
        if causal:
            index = position - (cols - 1) + offsets
            return index.clamp_min(0), index >= 0
        start = (position - cols // 2).clamp(0, n_tokens - cols)
        index = start + offsets
        return index, torch.ones_like(index, dtype=torch.bool)
    height, width, has_class_token = grid
    patch = torch.arange(height * width, device=device)
    row0 = (patch // width - rows // 2).clamp(0, height - rows)[:, None, None]
    col0 = (patch % width - cols // 2).clamp(0, width - cols)[:, None, None]
    index = (row0 + torch.arange(rows, device=device)[:, None]) * width + col0 + torch.arange(cols, device=device)
    index = index.reshape(height * width, rows * cols) + int(has_class_token)
    return index, torch.ones_like(index, dtype=torch.bool)


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
    and returns q's dtype. See the module docstring for the math and the stabilisation.
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
    root = math.sqrt(scale)

    key_features = apply_feature_map(k, feature_map, power, root)
    if valid is not None:  # where, not ·: a masked key's inf or NaN features stay out
        key_features = torch.where(valid[:, None, :, None], key_features, 0)
    rows_q = q[:, :, n_global:]
    query_features = apply_feature_map(rows_q, feature_map, power, root)

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (B, H, R, ·) → (B, Hkv, G·R, ·): head h reads kv head h // G
        return x.reshape(batch, n_kv_heads, group * n_rows, x.shape[-1])

    def split_groups(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, G·R, ·) → (B, Hkv, G, R, ·)
        return x.reshape(batch, n_kv_heads, group, n_rows, x.shape[-1])

    position = torch.arange(n_global, n_tokens, device=q.device)  # each windowed query's position
    index, inside = window_indices(n_tokens, window, causal=causal, grid=grid, device=q.device)
    chunk = index.shape[1]  # causal prefix chunks are window-long (see the module docstring)

    # the linear part over every key the sums hold: all valid keys, or causal those before the query's chunk
    if causal:
        numerator_all, denominator_all = _causal_prefix(query_features, key_features, v, chunk, grouped, split_groups)
        summed_before = (position // chunk) * chunk  # query i's sums hold the keys j < summed_before[i]
        if valid is None:
            n_summed = summed_before.to(dtype).reshape(1, 1, 1, n_rows, 1)
        else:
            counts = torch.nn.functional.pad(valid.to(dtype).cumsum(-1), (1, 0))  # valid keys before each index
            n_summed = counts[:, summed_before].reshape(batch, 1, 1, n_rows, 1)
    else:
        state, key_sum = key_features.mT @ v, key_features.sum(-2, keepdim=True)
        numerator_all = split_groups(grouped(query_features) @ state)
        denominator_all = split_groups(grouped(query_features) @ key_sum.mT)
        summed_before = None
        n_summed = (torch.full((1, 1, 1, 1, 1), float(n_tokens), device=q.device) if valid is None
                    else valid.to(dtype).sum(-1).reshape(batch, 1, 1, 1, 1))

    # the exact keys of each query: sinks, then its window (sink keys taken out of it)
    rows_q5, features5 = split_groups(grouped(rows_q)), split_groups(grouped(query_features))
    sink_keys = torch.arange(n_sinks, device=q.device)
    member = torch.cat([sink_keys.expand(n_rows, n_sinks) <= position[:, None] if causal else
                        torch.ones(n_rows, n_sinks, dtype=torch.bool, device=q.device),
                        inside & (index >= n_sinks)], dim=-1)  # (R, s + w)
    keys = torch.cat([sink_keys.expand(n_rows, n_sinks), index], dim=-1)
    if valid is not None:
        member = member & valid[:, keys]  # (B, R, s + w)
    summed = member if summed_before is None else member & (keys < summed_before[:, None])
    member, summed = (x.reshape(-1, 1, 1, n_rows, n_sinks + chunk) for x in (member, summed))

    window_k, window_features, window_v = k[:, :, index], key_features[:, :, index], v[:, :, index]  # (B, Hkv, R, w, ·)
    scores = torch.cat([split_groups(grouped(rows_q) @ k[:, :, :n_sinks].mT),
                        torch.einsum("bkgrd,bkrwd->bkgrw", rows_q5, window_k)], dim=-1) * scale
    linear = torch.cat([split_groups(grouped(query_features) @ key_features[:, :, :n_sinks].mT),
                        torch.einsum("bkgrd,bkrwd->bkgrw", features5, window_features)], dim=-1)
    scores = scores.masked_fill(~member, -math.inf)
    linear = torch.where(summed, linear, 0)

    # one normaliser: shift by c = max(m, log(α·Σ_L φ·φ)), the linear terms scaled by α·e^{-c}
    n_linear = n_summed - summed.sum(-1, keepdim=True)  # keys in the linear part, counted exactly
    linear_denominator = (denominator_all - linear.sum(-1, keepdim=True)).clamp_min(0)
    has_linear = (n_linear > 0) & (linear_denominator >= torch.finfo(dtype).tiny) & (mix > 0)
    linear_denominator = torch.where(has_linear, linear_denominator, 0)
    shift = torch.maximum(scores.amax(-1, keepdim=True), (mix * linear_denominator).log())
    shift = torch.where(shift.isfinite(), shift, 0)  # a row with nothing visible: 0 / 0 below, set to 0
    exact = (scores - shift).exp()
    linear_scale = torch.where(has_linear, mix * (-shift).exp(), 0)
    weights = exact - linear_scale * linear  # the exact terms, less the linear terms the sums hold of them
    numerator = (linear_scale * numerator_all
                 + split_groups(weights[..., :n_sinks].reshape(batch, n_kv_heads, group * n_rows, n_sinks)
                                @ v[:, :, :n_sinks])
                 + torch.einsum("bkgrw,bkrwe->bkgre", weights[..., n_sinks:], window_v))
    denominator = exact.sum(-1, keepdim=True) + linear_scale * linear_denominator
    out = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(dtype).tiny), 0)

    if n_global:
        out = torch.cat([_global_rows(q[:, :, :n_global], k, v, valid, scale).reshape(
            batch, n_kv_heads, group, n_global, e), out], dim=3)
    return out.reshape(batch, n_heads, n_tokens, e).to(out_dtype)


def _causal_prefix(query_features, key_features, v, chunk, grouped, split_groups):
    """Σ_{j < ⌊i/T⌋·T} φ(q_i)·φ(k_j) v_j and the same without v_j, T = chunk: exclusive prefix states of
    the chunks before each query's own, (B, Hkv, G, N, e) and (B, Hkv, G, N, 1).

    The full chunks run batched and the last N mod T keys as one more (shorter) chunk, so the
    states cost exactly N·d·e multiply-adds, and nothing is padded.
    """
    n_tokens = key_features.shape[2]
    n_full = n_tokens // chunk
    split = n_full * chunk

    def chunked(x: torch.Tensor) -> torch.Tensor:  # (…, split, ·) → (…, chunks, T, ·)
        return x[..., :split, :].reshape(*x.shape[:-2], n_full, chunk, x.shape[-1])

    states = [chunked(key_features).mT @ chunked(v)]  # (B, Hkv, chunks, d, e)
    sums = [chunked(key_features).sum(-2, keepdim=True)]  # (B, Hkv, chunks, 1, d)
    if split < n_tokens:
        states.append((key_features[..., split:, :].mT @ v[..., split:, :]).unsqueeze(2))
        sums.append(key_features[..., split:, :].sum(-2, keepdim=True).unsqueeze(2))
    states, sums = torch.cat(states, dim=2), torch.cat(sums, dim=2)
    before = torch.cat([torch.zeros_like(states[:, :, :1]), states[:, :, :-1].cumsum(2)], dim=2)[:, :, None]
    sums_before = torch.cat([torch.zeros_like(sums[:, :, :1]), sums[:, :, :-1].cumsum(2)], dim=2)[:, :, None]

    features = split_groups(grouped(query_features))  # (B, Hkv, G, N, d)
    numerators = [(chunked(features) @ before[:, :, :, :n_full]).flatten(3, 4)]
    denominators = [(chunked(features) @ sums_before[:, :, :, :n_full].mT).flatten(3, 4)]
    if split < n_tokens:
        numerators.append(features[..., split:, :] @ before[:, :, :, n_full])
        denominators.append(features[..., split:, :] @ sums_before[:, :, :, n_full].mT)
    return torch.cat(numerators, dim=3), torch.cat(denominators, dim=3)


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
