"""Plain-PyTorch clustered attention: query clusters pick each query's keys, exact softmax over them.

Improved clustered attention (Vyas et al., 2020), training-free. The queries of a (batch, head)
are grouped into n clusters with centroids c_g; query i belongs to cluster g(i). Then:

1. Each centroid attends over every key: A_g = softmax(c_g·Kᵀ·scale + bias) (n × M).
2. Each cluster's `top_keys` keys T_g of largest A_g, and the mass m_g = Σ_{j∈T_g} A_gj they hold.
3. Query i reads T_{g(i)} exactly, with its own scores, and every other key through its centroid:

       out_i = m_g · softmax_{j∈T_g}(q_i·k_j·scale + bias_j) · V_{T_g}  +  Σ_{j∉T_g} A_gj v_j

   — its exact attention on the keys that matter most to its cluster, scaled to the share of the
   centroid's mass those keys hold, plus the centroid's attention on the rest. Row weights sum
   to m_g + (1 − m_g) = 1. The second term is A_g with its top keys zeroed, times V.

When T_g holds every key the centroid may attend (top_keys ≥ the number of visible keys), m_g = 1
and this is exact softmax attention, whatever the clusters. bias is an additive per-key mask
(0 / −inf for a boolean one); a row that sees no key gives 0, as torch's SDPA does.

Two spellings:
- `clustered_attention_reference`, what the site module runs: the per-query exact part is the
  `attnopt::chosen_keys_attention` op (kernels/chosen_keys.py);
- `clustered_attention_dense`, the full (B, H, N, M) weight matrix, for tests.
"""

from __future__ import annotations

import torch

from .chosen_keys import chosen_keys_attention, softmax_or_zero


def centroid_attention(centroids: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None, *, scale: float,
                       top_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each centroid's attention over the keys (…, n, M) in centroids' dtype, and its top_keys keys (…, n, t)."""
    logits = torch.matmul(centroids, k.transpose(-1, -2).to(centroids.dtype)) * scale
    if key_bias is not None:
        logits = logits + key_bias
    weights = softmax_or_zero(logits)
    return weights, weights.topk(top_keys, dim=-1, sorted=False).indices.sort(dim=-1).values


def clustered_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor,
                                  centroids: torch.Tensor, *, scale: float, top_keys: int,
                                  key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Clustered attention (module docstring) → (B, H, N, e) in q's dtype.

    q (B, H, N, d); k, v (B, H, M, ·), heads already matched to q's; groups (B, H, N) int64, each
    query's cluster in [0, n); centroids (B, H, n, d); key_bias broadcastable to (B, H, 1, M),
    additive, or None. top_keys ≤ M. Scores and weights in fp32 (fp64 for fp64 inputs).
    """
    dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    batch, n_heads, n_queries, _ = q.shape
    bias = None if key_bias is None else key_bias.to(compute).expand(batch, n_heads, 1, k.shape[2])
    weights, top = centroid_attention(centroids.to(compute), k, bias, scale=scale, top_keys=top_keys)
    mass = weights.gather(-1, top).sum(-1)  # (B, H, n): the share of each centroid's weight on its top keys
    rest = torch.matmul(weights.scatter(-1, top, 0.0), v)  # (B, H, n, e): its weighted sum of the other keys

    keys = cluster_rows(top.int(), groups)  # (B, H, N, t): each query's keys (int32: < M)
    exact = chosen_keys_attention(q, k, v, keys, bias, scale=scale)
    out = mass.gather(-1, groups).unsqueeze(-1) * exact + cluster_rows(rest, groups)
    return out.to(dtype)


def cluster_rows(per_cluster: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each query's row of its cluster: per_cluster (B, H, n, c), groups (B, H, N) → (B, H, N, c).

    `per_cluster.gather(2, groups expanded over c)` as one index_select of whole rows of the
    flattened (B·H·n, c) table: a row copy per query instead of an index read per element.
    """
    batch, n_heads, n_clusters, width = per_cluster.shape
    offsets = torch.arange(batch * n_heads, device=groups.device).view(batch, n_heads, 1) * n_clusters
    rows = (groups + offsets).reshape(-1)
    return per_cluster.reshape(-1, width).index_select(0, rows).view(*groups.shape, width)


def clustered_attention_dense(q: torch.Tensor, k: torch.Tensor, groups: torch.Tensor, centroids: torch.Tensor, *,
                              scale: float, top_keys: int, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The weights (B, H, N, M) in fp64 that clustered attention applies to v (same arguments)."""
    batch, n_heads, n_queries, _ = q.shape
    q, k, centroids = q.double(), k.double(), centroids.double()
    bias = torch.zeros(1, 1, 1, k.shape[2], dtype=torch.float64) if key_bias is None else key_bias.double()
    centroid_weights = softmax_or_zero(centroids @ k.transpose(-1, -2) * scale + bias)  # (B, H, n, M)
    top = centroid_weights.topk(top_keys, dim=-1).indices
    chosen = torch.zeros_like(centroid_weights, dtype=torch.bool).scatter_(-1, top, True)
    own = groups.unsqueeze(-1).expand(-1, -1, -1, k.shape[2])
    query_chosen = chosen.gather(2, own)  # (B, H, N, M): the keys each query reads exactly
    query_centroid = centroid_weights.gather(2, own)
    mass = (query_centroid * query_chosen).sum(-1, keepdim=True)
    scores = (q @ k.transpose(-1, -2) * scale + bias).masked_fill(~query_chosen, float("-inf"))
    return mass * softmax_or_zero(scores) + query_centroid * ~query_chosen
