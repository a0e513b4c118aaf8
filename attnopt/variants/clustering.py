"""Grouping tokens into fewer tokens: pooling, k-means and bipartite (ToMe-style) merging.

All functions work on x (…, N, d) with a bool `valid` (…, N) and give each valid token a group
in [0, n_groups) (invalid tokens get −1, so they never shape a group), with the groups' means
and sizes. `split_outliers` then gives the tokens worst served by their group groups of their
own. Everything is deterministic: no random init, ties broken by index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pooled_groups(valid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """1-D adaptive pooling over the valid tokens only: the r-th valid token of c goes to ⌊r·n/c⌋."""
    rank = valid.long().cumsum(-1) - 1
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(valid, rank * n_groups // count, -1)


def run_groups(n_tokens: int, n_groups: int, device: torch.device | None = None) -> torch.Tensor:
    """pooled_groups when every token is valid, as one (N,) index: token r goes to ⌊r·n/N⌋.

    The groups are then runs of consecutive tokens, ⌊N/n⌋ or ⌈N/n⌉ long.
    """
    return torch.arange(n_tokens, device=device) * n_groups // n_tokens


def counts_of(index: torch.Tensor, n_bins: int, dtype: torch.dtype) -> torch.Tensor:
    """How many times each of 0 … n_bins − 1 occurs in the 1-D `index` (all within range), as (n_bins,).

    torch.bincount's output size depends on the data (max(index) + 1 when that exceeds minlength),
    so Inductor cannot compile it (DynamicOutputShapeException); an index_add_ of ones into
    n_bins zeros has a fixed size and counts the same (exactly, below 2²⁴ per bin in fp32).
    """
    return torch.zeros(n_bins, dtype=dtype, device=index.device).index_add_(
        0, index, torch.ones((), dtype=dtype, device=index.device).expand(index.shape[0]))


def run_sums(x: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums (…, n, d) and sizes (n,) of the run_groups of x (…, N, d), every token valid.

    A reshape and a sum when n divides N; otherwise one index_add_ along the tokens (the runs
    then differ in length by one). Either is far cheaper than group_means' scatter over (…, N, d).
    """
    n_tokens, dim = x.shape[-2], x.shape[-1]
    if n_tokens % n_groups == 0:
        sums = x.reshape(*x.shape[:-2], n_groups, n_tokens // n_groups, dim).sum(-2)
        return sums, x.new_full((n_groups,), n_tokens // n_groups)
    groups = run_groups(n_tokens, n_groups, x.device)
    sums = x.new_zeros(*x.shape[:-2], n_groups, dim).index_add_(-2, groups, x)
    return sums, counts_of(groups, n_groups, x.dtype)


def pooled_runs_with_outliers(x: torch.Tensor, n_groups: int, n_outliers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """split_outliers(x, valid, g, group_means(x, g, n), n_outliers) for g = pooled_groups of all-valid tokens.

    The same agents and sizes (up to rounding: sums are taken in another order, and the outliers'
    share is subtracted from their group's sum instead of summing the group again), but the
    groups are contiguous runs, so no (…, N) index is built and no (…, N, d) gather or scatter
    runs: the run sums are a reshape-sum, each token's own centroid a broadcast.
    """
    n_tokens, dim = x.shape[-2], x.shape[-1]
    sums, run_sizes = run_sums(x, n_groups)
    centroids = sums / run_sizes.unsqueeze(-1)
    sizes = run_sizes.expand(*x.shape[:-2], n_groups)
    if n_outliers == 0:
        return centroids, sizes
    with torch.no_grad():  # the distances only pick the outliers; in place is then safe
        if n_tokens % n_groups == 0:
            runs = x.reshape(*x.shape[:-2], n_groups, n_tokens // n_groups, dim)
            distance = (runs - centroids.unsqueeze(-2)).square_().sum(-1).reshape(x.shape[:-1])
        else:
            own_centroid = centroids.index_select(-2, run_groups(n_tokens, n_groups, x.device))
            distance = (x - own_centroid).square_().sum(-1)
        outliers = distance.topk(n_outliers, dim=-1).indices
    outlier_tokens = x.gather(-2, outliers.unsqueeze(-1).expand(*outliers.shape, dim))
    outlier_groups = outliers * n_groups // n_tokens
    removed = torch.zeros_like(sums).scatter_add_(-2, outlier_groups.unsqueeze(-1).expand_as(outlier_tokens),
                                                  outlier_tokens)
    remaining = sizes - torch.zeros_like(sizes).scatter_add_(-1, outlier_groups, torch.ones_like(outliers, dtype=x.dtype))
    means = (sums - removed) / remaining.clamp_min(1).unsqueeze(-1)
    means = torch.where((remaining > 0).unsqueeze(-1), means, centroids)
    return torch.cat([means, outlier_tokens], dim=-2), torch.cat([remaining, torch.ones_like(outliers, dtype=x.dtype)], dim=-1)


def run_blocks(n_tokens: int, n_groups: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run_groups as blocks: token indices (n, L) of each run, L = ⌈N/n⌉, and which are real.

    Run r holds tokens ⌈r·N/n⌉ … ⌈(r+1)·N/n⌉ − 1; a shorter run is padded with index N (a zero
    row the caller appends) marked False. Everything follows from the shape alone.
    """
    length = -(-n_tokens // n_groups)
    starts = (torch.arange(n_groups + 1, device=device) * n_tokens + n_groups - 1) // n_groups
    index = starts[:-1, None] + torch.arange(length, device=device)
    real = index < starts[1:, None]
    return torch.where(real, index, n_tokens), real


def index_add_rows(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """target.index_add_(0, index, source): the rows of source added into target's rows `index`.

    With an int64 index, CPU index_add_ takes a scatter path that radix-sorts the index, fast on
    one thread but synchronising the threads several times (on a loaded machine, each sync can
    wait milliseconds for a descheduled thread); with more than one thread an int32 index takes
    the serial loop instead. Both add each target row's source rows in index order.
    """
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and torch.get_num_threads() > 1:
        index = index.int()
    return target.index_add_(0, index, source)


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}


def first_max(scores: torch.Tensor, rank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K − j for j the argmax over dim −2 of scores (U, K, T) (the first j where equal), (U, T),
    and the max (U, 1, T). scores must hold no −0 (it would lose a tie with +0); they are overwritten.

    An argmax over a short dim is slow on CPU (~2.5 ns an element); this is four vectorised
    passes: the max m, s − m (+0 exactly at a maximum, negative elsewhere, so its same-width
    integer view is 0 or negative), that view OR (K − j), and its max: K − j of the first
    maximum (meaningless where m is not finite). rank: `first_max_rank(K, scores.dtype, device)`.
    """
    top = scores.amax(-2, keepdim=True)
    bits = scores.sub_(top).view(_SAME_WIDTH_INT[scores.dtype])
    if rank is None:
        rank = first_max_rank(scores.shape[-2], scores.dtype, scores.device)
    return bits.bitwise_or_(rank).amax(-2), top


def first_max_rank(n_candidates: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(K, 1): K − j, in the integer type as wide as `dtype`, for `first_max`."""
    return torch.arange(n_candidates, 0, -1, dtype=_SAME_WIDTH_INT[dtype], device=device).unsqueeze(-1)


def run_kmeans_with_outliers(x: torch.Tensor, n_groups: int, iterations: int, window: int | None,
                             n_outliers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kmeans from the run_groups of all-valid x (…, N, d), then split_outliers: agents and sizes.

    Tokens are laid out in their initial runs as blocks of L slots (a view when n divides N;
    else one row gather, a shorter run's padding slot repeating its last token, kept out of
    every sum, count and distance), so a run's tokens share their candidate centroids: the
    `window` runs around their own (local k-means, a band: run g may join runs g − ⌊(W−1)/2⌋ …
    g + ⌈(W−1)/2⌉ that exist), or all n when window is None. The centroids of every row of x
    sit in one table, where a run's W candidates are W consecutive rows (a strided view, no
    copy); a candidate in another row of x, outside the runs or empty gets the bias −inf.
    Each of the fixed `iterations` is one batched matmul — the scores x·cᵀ − ‖c‖²/2 of each
    run's tokens against its candidates (N·W·d multiply-adds, the bias added inside it) —, an
    argmax in four vectorised passes over the scores (`first_max`), and one index_add_ of the
    tokens into their new centroids' sums (N·d adds, `index_add_rows`) with one of ones for the
    sizes: no (N, W) one-hot, no gather or scatter over (…, N, d), no loop over tokens or
    groups. Then the n_outliers tokens farthest from their final centroid leave their group and
    become agents of their own.
    A centroid that loses all its tokens keeps its place with size 0 (it may win tokens back).
    A token whose first scores are not finite (a NaN or an inf in it) stays in its initial run;
    a centroid that is not finite is a zero candidate, so the rows of x never mix.
    """
    lead, (n_tokens, dim) = x.shape[:-2], x.shape[-2:]
    n_rows = math.prod(lead)
    n_cells = n_rows * n_groups  # the centroids of every row of x
    blocks, real = run_blocks(n_tokens, n_groups, x.device)
    length = blocks.shape[-1]
    rows = x.reshape(n_rows * n_tokens, dim)
    padded = n_tokens % n_groups != 0
    if padded:  # a run's padding slot (its last) repeats the run's last token
        source = torch.where(real, blocks, blocks.roll(1, -1)).reshape(1, -1)
        starts = torch.arange(0, n_rows * n_tokens, n_tokens, device=x.device).unsqueeze(-1)
        slots = rows.index_select(0, (source + starts).reshape(-1))
    else:
        slots = rows
    band = window is not None and window < 2 * n_groups - 1
    if band:  # a unit (the slots sharing candidates) is a run; its candidate j is table row unit + j
        front = (window - 1) // 2
        n_units, n_candidates, offset = n_cells, window, front  # cell c at table row c + front
        unit_rows = torch.arange(n_cells, device=x.device)
        padding = (front, window - 1 - front)
    else:  # a unit is a row of x; its candidate j is table row (its first cell) + j
        n_units, n_candidates, offset = n_rows, n_groups, 0
        unit_rows = torch.arange(0, n_cells, n_groups, device=x.device)
    n_table = n_cells + n_candidates  # rows past the cells: padding, and last the padding slots' sink
    tokens = slots.view(n_units, -1, dim)
    # each slot's table row while in its initial run, and where it goes when it does not move
    initial_rows = torch.arange(offset, offset + n_cells, device=x.device).repeat_interleave(length)
    slot_rows = initial_rows = initial_rows.view(n_units, -1)
    if padded:
        real_slots = real.reshape(1, -1).expand(n_rows, -1).reshape(n_units, -1)
        fixed_rows = torch.where(real_slots, initial_rows, n_table - 1)
    else:
        real_slots, fixed_rows = None, initial_rows
    moves = real_slots  # the slots that may change run (None: all)

    def centroid_sums(slot_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums (n_cells, d) and sizes (n_cells,) of the cells at the slots' table rows."""
        index = slot_rows.reshape(-1)
        sums = index_add_rows(x.new_zeros(n_table, dim), index, slots)
        sizes = x.new_zeros(n_table).index_add_(0, index, x.new_ones(1).expand(index.shape[0]))  # a serial loop
        return sums[offset:offset + n_cells], sizes[offset:offset + n_cells]

    # the runs' sums: one batched product of each run's slots with its 0/1 weights
    real_weight = real.to(x.dtype)
    sums = torch.bmm(real_weight.unsqueeze(0).expand(n_rows, -1, -1).reshape(n_cells, 1, length),
                     slots.view(n_cells, length, dim)).view(n_cells, dim)
    sizes = real_weight.sum(-1).repeat(n_rows)
    centroids = sums / sizes.unsqueeze(-1)
    last_row = (unit_rows + n_candidates).unsqueeze(-1)  # a unit's row of candidate j: last_row − (K − j)
    rank = first_max_rank(n_candidates, x.dtype, x.device)
    for iteration in range(iterations):
        with torch.no_grad():  # the scores only pick each slot's centroid
            if band:  # the other rows' cells and the padding are barred by a size 0
                table = F.pad(centroids, (0, 0, *padding)).nan_to_num_(0.0, 0.0, 0.0)
                candidates = table.unfold(0, window, 1).transpose(-1, -2)  # (n_cells, W, d), a view
                norms = table.square().sum(-1).unfold(0, window, 1)
                weight = F.pad(sizes.view(n_rows, n_groups), padding).unfold(-1, window, 1)
            else:
                candidates = centroids.view(n_rows, n_groups, dim)
                norms = centroids.square().sum(-1)
                weight = sizes.view(n_rows, n_groups)
            # −‖c‖²/2, its zero +0 (so no score is −0, as first_max needs), −inf where barred
            bias = norms.mul(-0.5).add_(0.0).view(weight.shape).masked_fill_(weight <= 0, float("-inf"))
            bias = bias.view(n_units, n_candidates, 1)
            scores = torch.baddbmm(bias, candidates, tokens.transpose(-1, -2))  # (U, K, T): x·c − ‖c‖²/2
            key, top = first_max(scores, rank)
            if iteration == 0:  # a token with a score that is not finite stays where it is
                finite = torch.eq(top - top, 0).view(n_units, -1)
                moves = finite if moves is None else finite & moves
            slot_rows = torch.where(moves, last_row - key, fixed_rows)
        sums, sizes = centroid_sums(slot_rows)
        centroids = torch.where((sizes > 0).unsqueeze(-1), sums / sizes.clamp_min(1).unsqueeze(-1), centroids)
    if n_outliers == 0:
        return centroids.view(*lead, n_groups, dim), sizes.view(*lead, n_groups)
    with torch.no_grad():  # the distances only pick the outliers
        table = F.pad(centroids, (0, 0, offset, n_table - offset - n_cells))
        own = table.index_select(0, slot_rows.reshape(-1))
        distance = own.sub_(slots).square_().sum(-1).view(n_rows, n_groups * length)  # in place: one buffer
        if padded:
            distance.masked_fill_(~real.reshape(-1), -1.0)
        outliers = distance.topk(n_outliers, dim=-1).indices  # (rows, k) slots of each row
    slot = (outliers + torch.arange(0, slots.shape[0], n_groups * length, device=x.device).unsqueeze(-1)).reshape(-1)
    outlier_tokens = slots.index_select(0, slot)
    # a padding slot (only when fewer real tokens than outliers) counts for nothing: any cell
    outlier_cells = slot_rows.reshape(-1).index_select(0, slot).sub_(offset).clamp_(max=n_cells - 1)
    is_real = real.reshape(-1)[outliers.reshape(-1)].to(x.dtype)  # fewer real tokens than outliers: size 0
    if padded:
        outlier_tokens = outlier_tokens * is_real.unsqueeze(-1)
    removed = index_add_rows(torch.zeros_like(sums), outlier_cells, outlier_tokens)
    remaining = sizes - index_add_rows(torch.zeros_like(sizes), outlier_cells, is_real)
    means = (sums - removed) / remaining.clamp_min(1).unsqueeze(-1)
    means = torch.where((remaining > 0).unsqueeze(-1), means, centroids)
    agents = torch.cat([means.view(n_rows, n_groups, dim), outlier_tokens.view(n_rows, n_outliers, dim)], dim=-2)
    agent_sizes = torch.cat([remaining.view(n_rows, n_groups), is_real.view(n_rows, n_outliers)], dim=-1)
    return agents.view(*lead, n_groups + n_outliers, dim), agent_sizes.view(*lead, n_groups + n_outliers)


def grid_groups(valid: torch.Tensor, height: int, width: int, rows: int, cols: int) -> torch.Tensor:
    """2-D pooling of a row-major height × width grid into rows × cols cells (invalid tokens: −1)."""
    row = torch.arange(height, device=valid.device) * rows // height
    col = torch.arange(width, device=valid.device) * cols // width
    cell = (row[:, None] * cols + col[None, :]).reshape(-1)
    return torch.where(valid, cell, -1)


def group_means(x: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (…, n, d) and size (…, n) of each group; an empty group has mean 0 and size 0.

    One index_add_ of the token rows into (rows of …) × (n + 1) group rows, with a flat 1-D index,
    instead of a scatter_add_ through an index expanded over d (several times slower on CPU).
    """
    index = torch.where(groups < 0, n_groups, groups)  # invalid tokens go to a discarded extra group
    lead, dim = x.shape[:-2], x.shape[-1]
    n_rows = math.prod(lead)
    row_offsets = torch.arange(n_rows, device=x.device).view(*lead, 1) * (n_groups + 1)
    flat_index = (index + row_offsets).reshape(-1)
    sums = index_add_rows(x.new_zeros(n_rows * (n_groups + 1), dim), flat_index, x.reshape(-1, dim))
    sizes = counts_of(flat_index, n_rows * (n_groups + 1), x.dtype)
    sums = sums.view(*lead, n_groups + 1, dim)[..., :n_groups, :]
    sizes = sizes.view(*lead, n_groups + 1)[..., :n_groups]
    return sums / sizes.clamp_min(1).unsqueeze(-1), sizes


def barred_centroids(candidates: torch.Tensor, n_centroids: int) -> torch.Tensor:
    """(…, n, N) bool: True where centroid c is not among token t's candidates (…, N, W) (local k-means)."""
    allowed = torch.zeros(*candidates.shape[:-2], n_centroids, candidates.shape[-2], dtype=torch.bool,
                          device=candidates.device)
    return allowed.scatter_(-2, candidates.transpose(-1, -2), True).logical_not_()


def nearest_groups(x: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, barred: torch.Tensor | None = None,
                   fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest non-empty centroid (Euclidean) per token, among those not barred.

    One baddbmm of every token against every centroid, x·cᵀ − ‖c‖²/2 with −inf at empty
    centroids, laid out (n, N) so the first nearest is `first_max` over the centroids, vectorised
    over the tokens (an argmax over a short last dim is several times slower on CPU). Local
    k-means then bars the centroids outside each token's candidates (barred (…, n, N),
    `barred_centroids`) — gathering each token's W candidate centroids instead would write W
    times x's size (100+ MB a call at all-MiniLM-L6-v2's batch) for fewer multiply-adds. A token
    whose allowed centroids are all empty (or whose scores are not finite) takes fallback (…, N),
    its first candidate (without candidates: centroid 0).
    """
    n_tokens, n_centroids, dim = x.shape[-2], centroids.shape[-2], x.shape[-1]
    bias = centroids.pow(2).sum(-1).mul(-0.5).add_(0.0)  # +0, never −0 (first_max)
    bias = bias.masked_fill(sizes <= 0, float("-inf")).reshape(-1, n_centroids, 1)
    scores = torch.baddbmm(bias, centroids.reshape(-1, n_centroids, dim), x.reshape(-1, n_tokens, dim).transpose(-1, -2))
    if barred is not None:
        scores.masked_fill_(barred.reshape(scores.shape), float("-inf"))
    key, top = first_max(scores)
    # a token with no finite score (a NaN in it) joins centroid 0 without candidates, as argmax put it
    fallback = torch.zeros((), dtype=torch.long, device=x.device) if fallback is None else fallback.reshape(-1, n_tokens)
    return torch.where(torch.isfinite(top.squeeze(-2)), n_centroids - key.long(), fallback).view(x.shape[:-1])


def kmeans(x: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor, n_groups: int, iterations: int,
           candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from the initial `groups`: centroids (…, n, d), sizes (…, n), groups (…, N).

    candidates (…, N, W): the centroids each token may join (local k-means), its own first; None: all.
    A centroid that loses all its tokens keeps its place (it may win tokens back) with size 0.
    """
    barred = fallback = None
    if candidates is not None and iterations > 0:  # (as costmodel.kmeans prices it)
        barred, fallback = barred_centroids(candidates, n_groups), candidates[..., 0]
    centroids, sizes = group_means(x, groups, n_groups)
    for _ in range(iterations):
        groups = torch.where(valid, nearest_groups(x, centroids, sizes, barred, fallback), -1)
        new_centroids, sizes = group_means(x, groups, n_groups)
        centroids = torch.where((sizes > 0).unsqueeze(-1), new_centroids, centroids)
    return centroids, sizes, groups


def bipartite_merge(x: torch.Tensor, valid: torch.Tensor,
                    n_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge tokens down to n_groups by rounds of bipartite soft matching (as ToMe does).

    Each round splits the current tokens alternately into sets A and B, links every token of A
    to its most cosine-similar token of B, and merges the most similar links (at most |A| per
    round) into their B token as size-weighted means. Invalid tokens are size-0 members of A
    that are merged first, which drops them without moving anything. Returns means, sizes and
    each original token's group.
    """
    sums = x * valid.unsqueeze(-1)
    sizes = valid.to(x.dtype)
    slot = torch.arange(x.shape[-2], device=x.device).expand(valid.shape)  # each token's current token
    while sums.shape[-2] > n_groups:
        a_sums, b_sums = sums[..., ::2, :], sums[..., 1::2, :]
        a_sizes, b_sizes = sizes[..., ::2], sizes[..., 1::2]
        n_merged = min(sums.shape[-2] - n_groups, a_sums.shape[-2])
        similarity = F.normalize(a_sums, dim=-1) @ F.normalize(b_sums, dim=-1).transpose(-1, -2)
        similarity = similarity.masked_fill((b_sizes <= 0).unsqueeze(-2), float("-inf"))
        best_similarity, best_b = similarity.max(-1)
        best_similarity = best_similarity.masked_fill(a_sizes <= 0, float("inf"))
        order = best_similarity.argsort(dim=-1, descending=True, stable=True)
        merged, kept = order[..., :n_merged], order[..., n_merged:]
        target = best_b.gather(-1, merged)
        moved = a_sums.gather(-2, merged.unsqueeze(-1).expand(*merged.shape, x.shape[-1]))
        b_sums = b_sums.scatter_add(-2, target.unsqueeze(-1).expand_as(moved), moved)
        b_sizes = b_sizes.scatter_add(-1, target, a_sizes.gather(-1, merged))
        kept_sums = a_sums.gather(-2, kept.unsqueeze(-1).expand(*kept.shape, x.shape[-1]))
        slot = _renumbered(slot, kept, merged, target, b_sums.shape[-2])
        sums = torch.cat([kept_sums, b_sums], dim=-2)
        sizes = torch.cat([a_sizes.gather(-1, kept), b_sizes], dim=-1)
    return sums / sizes.clamp_min(1).unsqueeze(-1), sizes, torch.where(valid, slot, -1)


def _renumbered(slot: torch.Tensor, kept: torch.Tensor, merged: torch.Tensor, target: torch.Tensor,
                n_b: int) -> torch.Tensor:
    """Token indices after a merge round: kept A tokens first (in `kept` order), then the B tokens."""
    n_kept = kept.shape[-1]
    new_a = torch.empty_like(slot[..., : kept.shape[-1] + merged.shape[-1]])
    new_a.scatter_(-1, kept, torch.arange(n_kept, device=slot.device).expand_as(kept))
    new_a.scatter_(-1, merged, n_kept + target)
    new_b = (n_kept + torch.arange(n_b, device=slot.device)).expand(*slot.shape[:-1], n_b)
    mapping = torch.stack([new_a[..., :n_b], new_b], dim=-1).flatten(-2)
    if new_a.shape[-1] > n_b:  # an odd count: A holds the last token too
        mapping = torch.cat([mapping, new_a[..., n_b:]], dim=-1)
    return mapping.gather(-1, slot)


def split_outliers(x: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor, centroids: torch.Tensor,
                   n_outliers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the n_outliers valid tokens farthest from their group's centroid a group of their own.

    Returns means (…, n + n_outliers, d) and sizes: the groups recomputed without the outliers,
    then the outliers themselves (size 1, or 0 where there were fewer valid tokens than that).
    """
    n_groups = centroids.shape[-2]
    if n_outliers == 0:
        means, sizes = group_means(x, groups, n_groups)
        return torch.where((sizes > 0).unsqueeze(-1), means, centroids), sizes
    own_centroid = centroids.gather(-2, groups.clamp_min(0).unsqueeze(-1).expand_as(x))
    distance = (x - own_centroid).pow(2).sum(-1).masked_fill(groups < 0, -1.0)
    outliers = distance.topk(n_outliers, dim=-1).indices
    is_outlier = torch.zeros_like(valid).scatter(-1, outliers, True) & (groups >= 0)
    means, sizes = group_means(x, torch.where(is_outlier, -1, groups), n_groups)
    means = torch.where((sizes > 0).unsqueeze(-1), means, centroids)
    outlier_tokens = x.gather(-2, outliers.unsqueeze(-1).expand(*outliers.shape, x.shape[-1]))
    outlier_sizes = is_outlier.gather(-1, outliers).to(sizes.dtype)
    return torch.cat([means, outlier_tokens], dim=-2), torch.cat([sizes, outlier_sizes], dim=-1)
