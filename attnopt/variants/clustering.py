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
    return sums, torch.bincount(groups, minlength=n_groups).to(x.dtype)


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


def run_kmeans_with_outliers(x: torch.Tensor, n_groups: int, iterations: int, window: int | None,
                             n_outliers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kmeans from the run_groups of all-valid x (…, N, d), then split_outliers: agents and sizes.

    Tokens are laid out in their initial runs as blocks (n, L, d) per row of x (a reshape when n
    divides N, else one row gather in which a shorter run's padding slot repeats a token and is
    kept out of every sum, count and distance), so a run's tokens share their candidate
    centroids: the `window` runs around their own (local k-means, a band: run g may join runs
    g − ⌊(W−1)/2⌋ … g + ⌈(W−1)/2⌉ that exist), or all n when window is None. The centroids of
    all rows of x sit in one table; a run's W candidates are W consecutive table rows (a strided
    view, no copy), the rows of other runs of x and of empty centroids barred by a −inf bias.
    Each of the fixed `iterations` is one batched matmul (the scores x·cᵀ − ‖c‖²/2 of each run's
    tokens against its candidates, N·W·d multiply-adds, the bias added inside it), an argmax,
    and one index_add_ of the tokens into their new centroids' sums (N·d adds) with a bincount
    for the sizes: no (N, W) one-hot, no gather or scatter over (…, N, d), no loop over tokens
    or groups. Then the n_outliers tokens farthest from their final centroid leave their group
    and become agents of their own.
    A centroid that loses all its tokens keeps its place with size 0 (it may win tokens back).
    """
    lead, (n_tokens, dim) = x.shape[:-2], x.shape[-2:]
    n_rows = math.prod(lead)
    n_cells = n_rows * n_groups  # centroids of every row of x, one table
    blocks, real = run_blocks(n_tokens, n_groups, x.device)
    length = blocks.shape[-1]
    rows = x.reshape(n_rows * n_tokens, dim)
    padded = n_tokens % n_groups != 0
    if padded:  # the padding slot of a shorter run reads some token; `real` keeps it out below
        source = blocks.clamp_max(n_tokens - 1).reshape(1, -1)
        source = source + torch.arange(0, n_rows * n_tokens, n_tokens, device=x.device).unsqueeze(-1)
        slots = rows.index_select(0, source.reshape(-1))
    else:
        slots = rows
    band = window is not None and window < 2 * n_groups - 1
    # a unit is what shares candidates: a run (band) or a whole row (every centroid of it)
    n_units = n_cells if band else n_rows
    tokens = slots.view(n_units, -1, dim)
    cell = torch.arange(n_cells, device=x.device)
    own_cell = cell.unsqueeze(-1).expand(n_cells, length).reshape(n_units, -1)  # each slot's initial run
    real_slots = real.reshape(1, -1).expand(n_rows, -1).reshape(n_units, -1) if padded else None

    def centroid_sums(slot_cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums (n_cells, d) and sizes (n_cells,) of the slots' cells; padding slots go to a discarded row."""
        if padded:
            slot_cells = torch.where(real_slots, slot_cells, n_cells)
        index = slot_cells.reshape(-1)
        sums = x.new_zeros(n_cells + 1, dim).index_add_(0, index, slots)
        sizes = torch.bincount(index, minlength=n_cells + 1)[:n_cells].to(x.dtype)
        return sums[:n_cells], sizes

    sums, sizes = centroid_sums(own_cell)
    centroids = sums / sizes.unsqueeze(-1)
    groups = own_cell
    if band:
        front = (window - 1) // 2
        local = cell.remainder(n_groups).unsqueeze(-1) - front + torch.arange(window, device=x.device)
        in_range = (local >= 0) & (local < n_groups)  # (n_cells, W): candidate j of run g is run g − front + j
        first = cell - front  # the cell of each run's candidate 0
        padding = (front, window - 1 - front)
    else:
        first = torch.arange(0, n_cells, n_groups, device=x.device)
    for _ in range(iterations):
        if band:  # run g's candidates: rows g … g + W − 1 of the padded table, (n_cells, d, W) views
            table = F.pad(centroids, (0, 0, *padding))
            candidates = table.unfold(0, window, 1)
            norms = table.square().sum(-1).unfold(0, window, 1)
            usable = in_range & (F.pad(sizes, padding).unfold(0, window, 1) > 0)
        else:
            candidates = centroids.view(n_rows, n_groups, dim).transpose(-1, -2)
            norms = centroids.square().sum(-1).view(n_rows, n_groups)
            usable = (sizes > 0).view(n_rows, n_groups)
        bias = (-0.5 * norms).masked_fill(~usable, float("-inf"))
        chosen = torch.baddbmm(bias.unsqueeze(-2), tokens, candidates).argmax(-1)  # (units, slots)
        groups = chosen.add_(first.unsqueeze(-1))
        if band:  # only a NaN score could pick a candidate outside the table
            groups.clamp_(0, n_cells - 1)
        sums, sizes = centroid_sums(groups)
        centroids = torch.where((sizes > 0).unsqueeze(-1), sums / sizes.clamp_min(1).unsqueeze(-1), centroids)
    if n_outliers == 0:
        return centroids.view(*lead, n_groups, dim), sizes.view(*lead, n_groups)
    with torch.no_grad():  # the distances only pick the outliers
        own = centroids.index_select(0, groups.reshape(-1))
        distance = own.sub_(slots).square_().sum(-1).view(n_rows, n_groups * length)  # in place: one buffer
        if padded:
            distance.masked_fill_(~real.reshape(-1), -1.0)
        outliers = distance.topk(n_outliers, dim=-1).indices  # (rows, k) slots
    slot = (outliers + torch.arange(0, n_rows * n_groups * length, n_groups * length,
                                    device=x.device).unsqueeze(-1)).reshape(-1)
    outlier_tokens = slots.index_select(0, slot)
    outlier_groups = groups.reshape(-1).index_select(0, slot)
    is_real = real.reshape(-1)[outliers.reshape(-1)].to(x.dtype)  # fewer real tokens than outliers: size 0
    if padded:
        outlier_tokens = outlier_tokens * is_real.unsqueeze(-1)
    removed = torch.zeros_like(sums).index_add_(0, outlier_groups, outlier_tokens)
    remaining = sizes - torch.zeros_like(sizes).index_add_(0, outlier_groups, is_real)
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
    sums = x.new_zeros(n_rows * (n_groups + 1), dim).index_add_(0, flat_index, x.reshape(-1, dim))
    sizes = torch.bincount(flat_index, minlength=n_rows * (n_groups + 1)).to(x.dtype)
    sums = sums.view(*lead, n_groups + 1, dim)[..., :n_groups, :]
    sizes = sizes.view(*lead, n_groups + 1)[..., :n_groups]
    return sums / sizes.clamp_min(1).unsqueeze(-1), sizes


def nearest_groups(x: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor,
                   candidates: torch.Tensor | None) -> torch.Tensor:
    """Index of the nearest non-empty centroid (Euclidean) per token, among its candidates if given.

    candidates (…, N, W): the centroid indices each token may join (local k-means); None: all.
    """
    if candidates is None:
        scores = x @ centroids.transpose(-1, -2) - 0.5 * centroids.pow(2).sum(-1).unsqueeze(-2)
        return scores.masked_fill((sizes <= 0).unsqueeze(-2), float("-inf")).argmax(-1)
    n_tokens, window = candidates.shape[-2:]
    flat = candidates.reshape(*candidates.shape[:-2], n_tokens * window)
    chosen = centroids.gather(-2, flat.unsqueeze(-1).expand(*flat.shape, centroids.shape[-1]))
    chosen = chosen.reshape(*candidates.shape, centroids.shape[-1])
    scores = (x.unsqueeze(-2) * chosen).sum(-1) - 0.5 * chosen.pow(2).sum(-1)
    scores = scores.masked_fill(sizes.gather(-1, flat).reshape(candidates.shape) <= 0, float("-inf"))
    return candidates.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)


def kmeans(x: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor, n_groups: int, iterations: int,
           candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from the initial `groups`: centroids (…, n, d), sizes (…, n), groups (…, N).

    A centroid that loses all its tokens keeps its place (it may win tokens back) with size 0.
    """
    centroids, sizes = group_means(x, groups, n_groups)
    for _ in range(iterations):
        groups = torch.where(valid, nearest_groups(x, centroids, sizes, candidates), -1)
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
