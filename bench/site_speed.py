"""One attention site on CPU: torch SDPA against agent (64 agents) and linear (elu+1) attention.

Timed, with H = 6, d = 64, B = 1, fp32 and torch.set_num_threads(2):
- "module": what users get, the attnopt.variants site module — AgentConfig(agent_count=64,
  selection="pool") with its defaults otherwise (agent bias, V shortcut, outliers: 5 % of N, so
  from N = 1260 on 63 of the 64 agents are single-query outliers), LinearConfig() (elu+1);
- "op": the bare kernel op it calls — agent_attention with agents pooled from q
  (1-D adaptive average pooling, timed too), linear_attention(feature_map="elu1").
- "public": what `attnopt.rewrite(model, "agent" | "linear", args=...)` gives with default configs
  (AgentConfig(): 64 agents; LinearConfig()) for a model that calls F.scaled_dot_product_attention;
  the rewrite is done once, outside the timing, which times forward calls only; and the same for
  "clustered" (ClusteredConfig(): 32 query clusters, 64 keys each);
- "agent public, pool 48": the same public path with the cheapest agent config that keeps the
  default's stage bias, shortcut and outliers — `rewrite(model, "agent", selection="pool",
  agent_count=48)` —, which shows how much of the default's time is its k-means selection (on
  all-MiniLM-L6-v2 it costs fidelity: 0.9235 mean cosine against the default's 0.9587).
The gap between module and op is the module's own overhead; between public and module, the
per-site runtime wrapper's (passes/site_call.py, passes/masking.py). Every ratio is SDPA's time over the
variant's, measured in the same run: the candidates take turns, round after round, each repeated
for a quarter second per turn, and each keeps its fastest call. The FLOP limit is
SDPA's FLOPs over the variant's (attnopt.costmodel), the ratio a perfect implementation reaches.

    python bench/site_speed.py                                # N = 1024, 4096, 16384
    python bench/site_speed.py --lengths 1024 4096 --seconds 2  # quicker, for debugging
    python bench/site_speed.py --lengths 4096 16384 --seconds 1  # 16384: SDPA ~1-2 s a call, few repeats

Linear attention runs in state form on CPU (O(N·d·e), no N×M matrix), so it is timed at every
length; --linear-max-length N skips it above N (quicker runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnopt  # noqa: E402
from attnopt import costmodel  # noqa: E402
from attnopt.kernels import agent_attention, linear_attention  # noqa: E402
from attnopt.variants import AgentConfig, LinearConfig, SiteInfo, build_site_module, spec_named  # noqa: E402
from timing import interleaved_best_seconds  # noqa: E402

HEADS, HEAD_DIM, N_AGENTS, THREADS = 6, 64, 64, 2
TARGETS = {("agent module", 4096): 25.0, ("agent module", 16384): 100.0, ("linear module", 4096): 30.0,
           ("agent public", 4096): 25.0, ("agent public", 16384): 100.0, ("linear public", 4096): 30.0,
           ("linear public", 16384): 120.0}
"""(candidate, N) → the speed-up over SDPA it must reach."""


def pooled_agents(q: torch.Tensor, n_agents: int) -> torch.Tensor:
    """(B, H, n, d): the means of n runs of consecutive queries (1-D adaptive average pooling)."""
    batch, heads, length, dim = q.shape
    flat = q.reshape(batch * heads, length, dim).transpose(1, 2)
    return F.adaptive_avg_pool1d(flat, n_agents).transpose(1, 2).reshape(batch, heads, n_agents, dim)


class SdpaModel(nn.Module):
    """The smallest model `attnopt.rewrite` finds one site in: a call of F.scaled_dot_product_attention."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def site_runs(length: int, with_linear: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """The candidates at one sequence length, each a closure over the same q, k, v."""
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=generator) for _ in range(3))
    scale = HEAD_DIM**-0.5
    site = SiteInfo.from_shape({"B": 1, "H": HEADS, "N": length, "d": HEAD_DIM}, scale=scale)
    agent_module = build_site_module(AgentConfig(agent_count=N_AGENTS, selection="pool"), site)
    runs = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "agent module": lambda: agent_module(q, k, v, scale=scale),
        "agent op": lambda: agent_attention(q, k, v, pooled_agents(q, N_AGENTS), scale=scale, agent_scale=scale),
    }
    public_agent = attnopt.rewrite(SdpaModel().eval(), "agent", args=(q, k, v))  # default AgentConfig()
    runs["agent public"] = lambda: public_agent(q, k, v)
    public_pooled = attnopt.rewrite(SdpaModel().eval(), "agent", args=(q, k, v), selection="pool", agent_count=48)
    runs["agent public, pool 48"] = lambda: public_pooled(q, k, v)
    if with_linear:
        linear_module = build_site_module(LinearConfig(feature_map="elu1"), site)
        runs["linear module"] = lambda: linear_module(q, k, v, scale=scale)
        runs["linear op"] = lambda: linear_attention(q, k, v, feature_map="elu1")
        public_linear = attnopt.rewrite(SdpaModel().eval(), "linear", args=(q, k, v))
        runs["linear public"] = lambda: public_linear(q, k, v)
    public_clustered = attnopt.rewrite(SdpaModel().eval(), "clustered", args=(q, k, v))  # ClusteredConfig()
    runs["clustered public"] = lambda: public_clustered(q, k, v)
    return runs


def flop_limits(length: int) -> dict[str, float]:
    """SDPA's FLOPs over each variant's at this length: the speed-up a perfect implementation reaches."""
    shape = {"B": 1, "H": HEADS, "N": length, "d": HEAD_DIM}
    exact = costmodel.flops(spec_named("exact").cost(), shape)
    return {"agent": exact / costmodel.flops(spec_named("agent").cost(n_agents=N_AGENTS), shape),
            "linear": exact / costmodel.flops(spec_named("linear").cost(), shape),
            "clustered": exact / costmodel.flops(spec_named("clustered").cost(), shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per length (at least 3 rounds)")
    parser.add_argument("--linear-max-length", type=int, default=None, help="time linear only up to this N (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    table = Table(title=f"attention site on CPU ({THREADS} threads, torch {torch.__version__}): B=1, H={HEADS}, d={HEAD_DIM}, fp32")
    for column in ("N", "SDPA ms", "agent public ms (×)", "agent public, pool 48 ms (×)", "agent module ms (×)", "agent op ms (×)", "agent FLOP limit",
                   "linear public ms (×)", "linear module ms (×)", "linear op ms (×)", "linear FLOP limit",
                   "clustered public ms (×)", "clustered FLOP limit"):
        table.add_column(column, justify="right")
    verdicts = []
    with torch.no_grad():  # not inference_mode: attnopt.rewrite fails on inference tensors (backend._propagate_meta)
        for length in args.lengths:
            with_linear = args.linear_max_length is None or length <= args.linear_max_length
            best = interleaved_best_seconds(site_runs(length, with_linear), args.seconds)
            speedup = {name: best["sdpa"] / seconds for name, seconds in best.items()}

            def cell(name: str) -> str:
                return f"{best[name] * 1e3:.2f} ({speedup[name]:.1f}×)" if name in best else "not timed"

            limits = flop_limits(length)
            table.add_row(str(length), f"{best['sdpa'] * 1e3:.1f}", cell("agent public"),
                          cell("agent public, pool 48"), cell("agent module"),
                          cell("agent op"), f"{limits['agent']:.0f}×", cell("linear public"), cell("linear module"),
                          cell("linear op"), f"{limits['linear']:.0f}×", cell("clustered public"),
                          f"{limits['clustered']:.0f}×")
            verdicts += [
                f"{name} at N={length}: {speedup[name]:.1f}× (target ≥ {target:.0f}×) "
                + ("met" if speedup[name] >= target else "NOT met")
                for (name, target_length), target in TARGETS.items()
                if target_length == length and name in speedup
            ]
    console = Console(width=200)
    console.print(table)
    for verdict in verdicts:
        console.print(verdict)


if __name__ == "__main__":
    main()
