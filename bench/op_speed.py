"""The bare CPU ops (and the agent public path) against torch SDPA, in one process, interleaved.

Shapes as bench/site_speed.py: B = 1, H = 6, d = 64, fp32, no_grad, torch.set_num_threads(2)
(--threads). Candidates at each N:
- "sdpa": F.scaled_dot_product_attention(q, k, v) — the baseline of every ratio;
- "linear <map> op": attnopt.kernels.linear_attention(q, k, v, feature_map=map,
  feature_scale=√scale) for elu1, relu and focused, as the linear site module calls it;
- "agent op": attnopt.kernels.agent_attention with 64 agents pooled from q and an agent bias;
- "agent module": the eager site module, AgentConfig(agent_count=64, selection="pool") (pooled
  agents, agent bias, V shortcut at offsets −1, 0, 1);
- "agent public" / "linear public": `attnopt.rewrite(model, "agent" | "linear", args=...)` with
  the default configs for a model calling F.scaled_dot_product_attention (compiled by Inductor).
With --baseline REV, each candidate whose code changed also runs as of git revision REV
("… before"): kernels/linear_reference.py, kernels/agent_reference.py and
attnopt/variants/shortcut.py are loaded from `git show REV:path` and patched in while that
candidate runs (the ops look their reference up at call time; the public path is compiled with
the old shortcut in place). The candidates take turns, one call each per round, after one
warm-up call; each row reports the median (and the fastest) call, and SDPA's median over the
candidate's median. The load average is printed before and after. On a shared machine the
wall-clock medians mostly measure waiting (every op is a parallel region that ends when its last
thread has been scheduled); `--threads 1 --clock cpu` measures the work itself.

    python bench/op_speed.py --baseline HEAD                  # N = 4096 and 16384, before/after
    python bench/op_speed.py --lengths 4096 --rounds 15       # quicker
    python bench/op_speed.py --baseline HEAD --threads 1 --clock cpu --no-public   # work, not waiting
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import attnopt.kernels.agent as agent_op_module
import attnopt.kernels.linear as linear_op_module
from attnopt.kernels import agent_attention, linear_attention
from site_speed import SdpaModel, pooled_agents
from timing import interleaved_times

import attnopt
from attnopt.variants import AgentConfig, SiteInfo, build_site_module
from attnopt.variants import shortcut as shortcut_module

HEADS, HEAD_DIM, N_AGENTS = 6, 64, 64
BASELINE_FILES = {
    "linear": ("kernels/linear_reference.py", "attnopt.kernels"),
    "agent": ("kernels/agent_reference.py", "attnopt.kernels"),
    "shortcut": ("attnopt/variants/shortcut.py", "attnopt.variants"),
}


def load_revision(rev: str, path: str, package: str) -> types.ModuleType:
    """The module at `path` as of git revision `rev`, its relative imports resolved in `package`."""
    source = subprocess.check_output(["git", "show", f"{rev}:{path}"], cwd=ROOT, text=True)
    module = types.ModuleType(f"{package}._baseline_{Path(path).stem}")
    module.__package__, module.__file__ = package, f"<{rev}:{path}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 (our own history)
    return module


def baseline_patches(rev: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context manager factory that puts REV's references and V shortcut in place."""
    old = {name: load_revision(rev, path, package) for name, (path, package) in BASELINE_FILES.items()}
    patches = [
        (linear_op_module, "linear_attention_reference", old["linear"].linear_attention_reference),
        (agent_op_module, "agent_attention_reference", old["agent"].agent_attention_reference),
        (shortcut_module.ValueShortcut, "forward", old["shortcut"].ValueShortcut.forward),
    ]

    @contextlib.contextmanager
    def patched() -> Iterator[None]:
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
        try:
            for owner, name, value in patches:
                setattr(owner, name, value)
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)

    return patched


def candidates(length: int, before: Callable[[], contextlib.AbstractContextManager] | None,
               with_public: bool) -> dict[str, Callable[[], torch.Tensor]]:
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=generator) for _ in range(3))
    scale = HEAD_DIM**-0.5
    agents = pooled_agents(q, N_AGENTS)
    agent_bias = torch.randn(1, HEADS, N_AGENTS, generator=generator)
    site = SiteInfo.from_shape({"B": 1, "H": HEADS, "N": length, "d": HEAD_DIM}, scale=scale)
    module = build_site_module(AgentConfig(agent_count=N_AGENTS, selection="pool"), site)
    with torch.no_grad():  # a calibrated-looking shortcut: every weight non-zero
        module.shortcut.weights.copy_(torch.tensor([0.9, 0.05, 0.1, 0.05]).expand_as(module.shortcut.weights))
    runs: dict[str, Callable[[], torch.Tensor]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    changed: dict[str, Callable[[], torch.Tensor]] = {}
    for feature_map in ("elu1", "relu", "focused"):
        changed[f"linear {feature_map} op"] = (
            lambda feature_map=feature_map: linear_attention(q, k, v, feature_map=feature_map,
                                                             feature_scale=math.sqrt(scale)))
    changed["agent op"] = lambda: agent_attention(q, k, v, agents, scale=scale, agent_scale=4 * scale,
                                                  agent_bias=agent_bias)
    changed["agent module"] = lambda: module(q, k, v, scale=scale)
    if with_public:
        public = {name: attnopt.rewrite(SdpaModel().eval(), name, args=(q, k, v)) for name in ("agent", "linear")}
        changed["agent public"] = lambda: public["agent"](q, k, v)
        changed["linear public"] = lambda: public["linear"](q, k, v)
        if before is not None:
            with before():  # compiled (traced) with the old shortcut in place
                old_public = {name: attnopt.rewrite(SdpaModel().eval(), name, args=(q, k, v))
                              for name in ("agent", "linear")}
            changed["agent public before"] = lambda: old_public["agent"](q, k, v)
            changed["linear public before"] = lambda: old_public["linear"](q, k, v)
    for name, run in list(changed.items()):
        runs[name] = run
        if before is not None and not name.endswith("before") and "public" not in name:
            def old(run=run):
                with before():
                    return run()
            runs[f"{name} before"] = old
    if before is not None:  # the public "before" rows run with the old references patched in too
        for name in ("agent public before", "linear public before"):
            if name in runs:
                run = runs[name]
                runs[name] = lambda run=run: _within(before, run)
    return runs


def _within(context: Callable[[], contextlib.AbstractContextManager], run: Callable[[], torch.Tensor]) -> torch.Tensor:
    with context():
        return run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per length (default 15 at N ≤ 4096, else 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", metavar="REV", default=None, help="also time REV's references and shortcut")
    parser.add_argument("--no-public", action="store_true", help="skip the attnopt.rewrite rows")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the calling thread's CPU time (time.thread_time), with --threads 1 only: "
                             "the work each call does, unaffected by waiting for a core on a busy machine")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    before = baseline_patches(args.baseline) if args.baseline else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 H={HEADS} d={HEAD_DIM} fp32 no_grad, "
          f"{args.clock} clock; load average {os.getloadavg()}")
    with torch.no_grad():
        for length in args.lengths:
            rounds = args.rounds or (15 if length <= 4096 else 5)
            times = interleaved_times(candidates(length, before, not args.no_public), rounds, clock)
            sdpa = statistics.median(times["sdpa"])
            print(f"\nN={length}: {rounds} rounds, SDPA median {sdpa * 1e3:.1f} ms (fastest "
                  f"{min(times['sdpa']) * 1e3:.1f} ms); load average {os.getloadavg()}")
            print(f"{'candidate':<28}{'median ms':>11}{'fastest ms':>12}{'× SDPA (median)':>17}{'× (fastest)':>13}")
            for name, samples in times.items():
                if name == "sdpa":
                    continue
                median = statistics.median(samples)
                print(f"{name:<28}{median * 1e3:>11.2f}{min(samples) * 1e3:>12.2f}{sdpa / median:>17.1f}"
                      f"{min(times['sdpa']) / min(samples):>13.1f}")


if __name__ == "__main__":
    main()
