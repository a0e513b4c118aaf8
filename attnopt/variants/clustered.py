"""Clustered attention: each query reads the keys its cluster attends to most, exactly.

The queries of a call are grouped by k-means into n clusters. Each cluster's centroid attends over
all keys; the `top_keys` keys it weighs most are read exactly by every query of the cluster, with
the query's own scores, and the remaining keys through the centroid's weights (improved clustered
attention, Vyas et al. 2020; the math is in attnopt/kernels/clustered_reference.py). Cost
∝ n·M (the centroids) + N·top_keys (the exact part) + N·n (the clustering), against N·M.

Unlike agent attention, whose queries read summaries of the keys, every query here keeps its own
scores on the keys that carry most of its cluster's mass, so sharp heads (a query that attends to
a few content tokens far from it) stay faithful: on all-MiniLM-L6-v2 it keeps a far higher
embedding cosine than the agent at the same FLOPs (bench/RESULTS.md). Training-free, nothing to fit.

Non-causal only (a centroid mixes queries at different positions); a key-padding or per-key
additive mask is applied to both parts; a mask that differs per query is refused.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
from torch import nn

from attnopt import costmodel
from attnopt.costmodel import B, H, Hkv, M, N, d, dtype_bytes, e
from attnopt.kernels.clustered_reference import clustered_attention_reference

from .clustering import group_means, kmeans, nearest_groups, pooled_groups
from .masks import per_key_mask, valid_queries
from .reasons import causal_reason, dropout_reason, first_reason, per_query_mask_reason
from .registry import Example, VariantSpec, register_variant
from .site import SiteInfo
from .two_stage import require_int

NAME = "clustered"


@dataclasses.dataclass(frozen=True)
class ClusteredConfig:
    """Clustered attention with `clusters` query clusters, each reading its `top_keys` keys exactly.

    clusters: k-means clusters of the queries per (batch, head) (at most N);
    top_keys: keys per cluster read exactly (at most M; all of them: exact attention);
    kmeans_iterations: Lloyd iterations from 1-D pooled runs of the valid queries; every query
        then joins its nearest centroid (one more assignment pass), which is re-averaged.
    Defaults measured on all-MiniLM-L6-v2 through `rewrite` (bench/RESULTS.md): 0.993 mean
    embedding cosine at 2.67× fewer attention FLOPs, retrieval recall@1 equal to the original's.
    """

    clusters: int = 32
    top_keys: int = 64
    kmeans_iterations: int = 1

    def __post_init__(self) -> None:
        require_int("clusters", self.clusters, 1)
        require_int("top_keys", self.top_keys, 1)
        require_int("kmeans_iterations", self.kmeans_iterations, 0)

    def sizes_at(self, n_queries: int, n_keys: int) -> tuple[int, int]:
        """(clusters, top_keys) of a call with n_queries queries and n_keys keys."""
        return min(self.clusters, n_queries), min(self.top_keys, n_keys)


class ClusteredAttention(nn.Module):
    """One site's clustered attention; forward takes the canonical (q, k, v, mask) layout."""

    def __init__(self, config: ClusteredConfig, site_info: SiteInfo):
        super().__init__()
        self.config = config
        self.site_info = site_info

    def calibration_parameters(self) -> list[nn.Parameter]:
        """Nothing to fit: the clusters and key choices are recomputed from every call's own queries."""
        return []

    def clusters(self, q: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's cluster (B, H, N) and the centroids (B, H, n, d) in fp32 (fp64 for fp64 queries).

        k-means over the valid queries (a padded query shapes no centroid), initialised by pooling
        runs of them; then every query, padded ones too, joins its nearest non-empty centroid, and
        each centroid becomes the mean of the valid queries it holds.
        """
        batch, n_heads, n_queries, _ = q.shape
        n_clusters, _ = self.config.sizes_at(n_queries, n_queries)
        queries = q.to(torch.promote_types(q.dtype, torch.float32))
        valid = valid_queries(key_mask, batch, n_heads, n_queries, self.site_info.is_self_attention, q.device)
        initial = pooled_groups(valid, n_clusters)
        centroids, sizes, _ = kmeans(queries, valid, initial, n_clusters, self.config.kmeans_iterations)
        groups = nearest_groups(queries, centroids, sizes)
        # each centroid the mean of the valid queries it now holds (one it lost them all keeps its place)
        means, sizes = group_means(queries, torch.where(valid, groups, -1), n_clusters)
        return groups, torch.where((sizes > 0).unsqueeze(-1), means, centroids)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        if causal or dropout_p > 0:
            raise ValueError("clustered attention cannot run a causal site or attention dropout")
        key_mask = per_key_mask(mask)
        groups, centroids = self.clusters(q, key_mask)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each query head reads its kv head
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        bias = None  # the per-key mask as an additive bias (−inf: masked), added to both parts' scores
        if key_mask is not None:
            bias = (key_mask.float() if key_mask.is_floating_point()
                    else torch.zeros(key_mask.shape, device=q.device).masked_fill(~key_mask, float("-inf")))
        _, top_keys = self.config.sizes_at(q.shape[2], k.shape[2])
        return clustered_attention_reference(q, k, v, groups, centroids, scale=scale, top_keys=top_keys, key_bias=bias)


def _refusal(config: ClusteredConfig, site_info: SiteInfo) -> str | None:
    return first_reason(causal_reason(site_info, NAME, "keys chosen by centroids"),
                        per_query_mask_reason(site_info, NAME), dropout_reason(site_info, NAME))


def _build(config: ClusteredConfig, site_info: SiteInfo, example: Example | None) -> nn.Module:
    return ClusteredAttention(config, site_info)


def clustered_cost(clusters: costmodel.Expr = 32, top_keys: costmodel.Expr = 64, kmeans_iterations: int = 1,
                   grouped: bool = False) -> costmodel.CostFormula:
    """Clustered attention: k-means of the queries, the centroids' attention, each query's exact part.

    Multiply-adds (FLOPs are twice them, as FlopCounterMode counts the module): the clustering is
    pooling, `kmeans_iterations` Lloyd iterations and one final assignment (N·n·d each) with its
    re-averaging; the centroids score all keys and weigh V with their top keys zeroed
    (n·M·(d+e)); each query scores its t keys and weighs their values (N·t·(d+e),
    `attnopt::chosen_keys_attention`).
    Element ops, as measured on CPU (bench/RESULTS.md, the clustered rows): the centroid
    softmax (6 per score) and its top-k (3·log₂t per score: a partial sort, ~8 ns a score); the
    chosen keys' sampled and sparse products, which run far below dense matmul speed (one op
    per 3 multiply-adds on top of their FLOPs), and 8 per chosen key (the key indices, bias,
    softmax). Bytes: Q, K, V, O; the centroid scores (8 passes over n·M); the chosen pairs'
    indices and values (4 passes over N·t). `grouped`: K and V are first repeated to H heads.
    """
    n_clusters, n_top = clusters, top_keys
    centroid_scores = B * H * n_clusters * M
    chosen = B * H * N * n_top
    assignment = costmodel.CostFormula(flops=2 * B * H * N * n_clusters * d, elementwise_ops=2 * B * H * N * n_clusters,
                                       bytes_moved=dtype_bytes * B * H * N * (d + 3 * n_clusters), kernel_calls=5)
    clustering = (costmodel.pooling(n_clusters) + costmodel.kmeans(n_clusters, kmeans_iterations, None) + assignment
                  + costmodel.pooling(n_clusters))  # the centroids re-averaged over their final members
    repeated = B * H * M * (d + e) if grouped else 0
    attention = costmodel.CostFormula(
        flops=2 * (centroid_scores * (d + e) + chosen * (d + e)),
        elementwise_ops=(centroid_scores * (6 + 3 * sympy.log(n_top, 2))  # softmax, top-k
                         + chosen * (d + e) / 3 + 8 * chosen  # the sparse products; indices, bias, softmax
                         + 3 * B * H * N * e),  # mass × exact + rest
        bytes_moved=dtype_bytes * (
            B * H * N * (d + e) + B * Hkv * M * (d + e) + 2 * repeated
            + 8 * centroid_scores + 4 * chosen * 3
            + 3 * B * H * N * e
        ),
        kernel_calls=40,
    )
    return clustering + attention


def _cost_params(config: ClusteredConfig, site_info: SiteInfo) -> dict:
    n_clusters, n_top = config.sizes_at(site_info.N, site_info.M)
    return {"clusters": n_clusters, "top_keys": n_top, "kmeans_iterations": config.kmeans_iterations,
            "grouped": site_info.Hkv != site_info.H}


CANDIDATE_SHAPES = ((16, 64), (32, 64), (32, 96), (64, 32))
"""(clusters, top_keys) `optimize` tries by default, where both are under half of N and M."""


def _candidates(site_info: SiteInfo) -> list[ClusteredConfig]:
    """Each of CANDIDATE_SHAPES with clusters < N/2 and top_keys < M/2 (else it saves little)."""
    return [ClusteredConfig(clusters=clusters, top_keys=top) for clusters, top in CANDIDATE_SHAPES
            if clusters < site_info.N / 2 and top < site_info.M / 2]


register_variant(VariantSpec(
    name=NAME, config_type=ClusteredConfig, refusal=_refusal, build=_build, cost=clustered_cost,
    cost_params=_cost_params, candidates=_candidates, shown=("clusters", "top_keys"), heads_independent=True))
