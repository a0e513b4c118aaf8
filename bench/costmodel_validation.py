"""Does attnopt.costmodel rank attention calls the way the CPU does? Predicted vs measured seconds.

A grid of calls (H = 6, B = 1, fp32, torch.set_num_threads(2)) over N, d and token counts n:
softmax (torch SDPA, costed as fused "exact"), agent (agent_attention with agents pooled from q,
costed as "agent" with selection="pool"), mediator (agent_attention with fixed tokens) and linear
(linear_attention, elu+1) and clustered (the site module: k-means of q, the centroids' attention,
each query's chosen keys). The device profile is measured in the same run, so predictions and
timings see the same machine state. Prints every call and the Spearman rank correlation of
predicted against measured seconds, overall (target ≥ 0.9), within each variant and over all
the other variants (which shows the variant that spoils the ranking), and how far off each variant is.

    python bench/costmodel_validation.py                        # full grid (several minutes)
    python bench/costmodel_validation.py --lengths 256 1024 --head-dims 64 --seconds 0.3

linear_attention runs the d×e-state algorithm on CPU, as the model costs it; --linear-max-length
(default: no limit) leaves it out above a length.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from attnopt import costmodel
from attnopt.kernels import agent_attention, linear_attention
from attnopt.variants import ClusteredConfig, SiteInfo, build_site_module, spec_named
from site_speed import pooled_agents
from timing import interleaved_best_seconds

HEADS, THREADS = 6, 2
CLUSTERED_SHAPES = ((32, 32), (64, 32), (32, 64))
"""(clusters, top_keys) of the clustered calls: the site module (k-means, centroids, chosen keys)."""

Call = tuple[str, dict[str, Any], Callable[[], torch.Tensor]]
"""(variant as its spec names it, its cost formula's params, the call to time)."""


def calls_at(length: int, head_dim: int, token_counts: list[int], with_linear: bool) -> list[Call]:
    """Every variant's call at one (N, d), over the same q, k, v."""
    generator = torch.Generator().manual_seed(length * head_dim)
    q, k, v = (torch.randn(1, HEADS, length, head_dim, generator=generator) for _ in range(3))
    scale = head_dim**-0.5
    calls: list[Call] = [("exact", {}, lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))]
    for n_tokens in token_counts:
        if n_tokens < length:
            mediators = torch.randn(1, HEADS, n_tokens, head_dim, generator=generator)
            calls += [
                ("agent", {"n_agents": n_tokens, "selection": "pool"},
                 lambda n_tokens=n_tokens: agent_attention(q, k, v, pooled_agents(q, n_tokens), scale=scale, agent_scale=scale)),
                ("mediator", {"n_mediators": n_tokens},
                 lambda mediators=mediators: agent_attention(q, k, v, mediators, scale=scale, agent_scale=scale)),
            ]
    if with_linear:
        calls.append(("linear", {"feature_map": "elu1"}, lambda: linear_attention(q, k, v, feature_map="elu1")))
    site = SiteInfo(B=1, H=HEADS, Hkv=HEADS, N=length, M=length, d=head_dim, e=head_dim)
    for clusters, top_keys in CLUSTERED_SHAPES:
        if 2 * max(clusters, top_keys) < length:
            module = build_site_module(ClusteredConfig(clusters=clusters, top_keys=top_keys), site)
            calls.append(("clustered", {"clusters": clusters, "top_keys": top_keys, "kmeans_iterations": 1},
                          lambda module=module: module(q, k, v, scale=scale)))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--token-counts", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per (N, d) (at least 3 rounds)")
    parser.add_argument("--linear-max-length", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    profile = costmodel.measure_device(torch.device("cpu"))
    console = Console(width=160)
    console.print(f"device profile ({THREADS} threads, measured now): {profile}")

    table = Table(title=f"cost model vs CPU ({THREADS} threads, torch {torch.__version__}): B=1, H={HEADS}, fp32")
    for column in ("variant", "params", "N", "d", "predicted ms", "measured ms", "measured / predicted"):
        table.add_column(column, justify="right")
    rows: list[tuple[str, float, float]] = []
    with torch.inference_mode():
        for length, head_dim in itertools.product(args.lengths, args.head_dims):
            with_linear = args.linear_max_length is None or length <= args.linear_max_length
            calls = calls_at(length, head_dim, args.token_counts, with_linear)
            measured = interleaved_best_seconds({str(i): call for i, (_, _, call) in enumerate(calls)}, args.seconds)
            shape = {"B": 1, "H": HEADS, "N": length, "d": head_dim}
            for index, (variant, params, _) in enumerate(calls):
                predicted = costmodel.estimate_seconds(spec_named(variant).cost(**params), shape, profile)
                seconds = measured[str(index)]
                rows.append((variant, predicted, seconds))
                shown = ", ".join(f"{key}={value}" for key, value in params.items())
                table.add_row(variant, shown, str(length), str(head_dim), f"{predicted * 1e3:.3f}",
                              f"{seconds * 1e3:.3f}", f"{seconds / predicted:.2f}")
    console.print(table)

    def correlation(selected: list[tuple[str, float, float]]) -> float:
        return spearmanr([row[1] for row in selected], [row[2] for row in selected]).statistic

    overall = correlation(rows)
    console.print(f"Spearman rank correlation, predicted vs measured, all {len(rows)} calls: {overall:.3f} "
                  + ("(target ≥ 0.9 met)" if overall >= 0.9 else "(target ≥ 0.9 NOT met)"))
    for variant in sorted({row[0] for row in rows}):
        own = [row for row in rows if row[0] == variant]
        others = [row for row in rows if row[0] != variant]
        ratios = sorted(row[2] / row[1] for row in own)
        console.print(f"  {variant} ({len(own)} calls): within {correlation(own):.3f}, all others {correlation(others):.3f}; "
                      f"measured / predicted median {ratios[len(ratios) // 2]:.2f} (range {ratios[0]:.2f}–{ratios[-1]:.2f})")

if __name__ == "__main__":
    main()
