"""How long `attnopt.optimize` plans, against one forward of the original model (issue 12).

Two models, random init (seeded), fp32, default candidates, `optimize(model, 0.5)` priced on this
machine's measured device profile:

* "2-block": the two-block model of tests/test_optimize.py (dim 32, 2 heads, an SDPA block and a
  written-out matmul block) on 2×512 tokens. Target: planning ≤ 5 s.
* "MiniLM": a transformers BertModel shaped like all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads,
  intermediate 1536, SDPA) on 8×512 tokens, half the rows padded from token 400. Target:
  planning ≤ 15× one forward.

Planning is the wall-clock time of the `optimize` call (capture, detection and verification,
the recording run, candidates built and measured, the knapsack, the rewrite and its end-to-end
check); one forward is the fastest of a few. The stage breakdown times the main steps by
wrapping them (the rest is dynamo's capture, canonicalisation, detection and the rewrite);
candidates are split per variant into built-and-measured and refused before building.

    OMP_NUM_THREADS=1 python bench/planning_speed.py                 # both models, 1 thread
    OMP_NUM_THREADS=1 python bench/planning_speed.py --only 2-block
    OMP_NUM_THREADS=1 python bench/planning_speed.py --profile       # + cProfile's top functions
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import math
import pstats
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import backend, candidates, costmodel, policies
from attnopt.variants import spec_for

TARGETS = {"2-block": ("seconds", 5.0), "MiniLM": ("ratio", 15.0)}


class Block(nn.Module):
    """tests/test_optimize.py's block: self-attention with SDPA or written out with matmuls."""

    def __init__(self, dim: int, heads: int, form: str):
        super().__init__()
        self.qkv, self.proj, self.heads, self.form = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class TwoBlocks(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, form) for form in ("sdpa", "matmul"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def two_blocks() -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    return TwoBlocks().eval(), (torch.randn(2, 512, 32),), {}


def minilm() -> tuple[nn.Module, tuple, dict]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        attn_implementation="sdpa")
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1000, config.vocab_size, (8, 512))
    mask = torch.ones(8, 512, dtype=torch.long)
    mask[1::2, 400:] = 0
    return model, (), {"input_ids": ids, "attention_mask": mask}


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple, dict]]] = {"2-block": two_blocks, "MiniLM": minilm}


def best_forward_seconds(model: nn.Module, args: tuple, kwargs: dict, repeats: int = 3) -> float:
    with torch.no_grad():
        model(*args, **kwargs)
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*args, **kwargs)
            timings.append(time.perf_counter() - start)
    return min(timings)


class Stages:
    """Seconds spent in the main steps of planning, by wrapping them for the duration of a run."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()

    def timed(self, name: Callable[..., str] | str, function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                label = name(*args, **kwargs) if callable(name) else name
                self.seconds[label] += time.perf_counter() - start
                self.counts[label] += 1

        return wrapper

    @contextmanager
    def installed(self) -> Iterator[None]:
        evaluate = candidates.evaluate

        def evaluate_and_label(config, *args, **kwargs):
            start = time.perf_counter()
            result = evaluate(config, *args, **kwargs)
            refused = result.row.get("refused") or ""
            kind = "not built (predicted no faster)" if refused.startswith("not built") else (
                "refused" if refused else "built + measured")
            label = f"candidate {spec_for(config).name}: {kind}"
            self.seconds[label] += time.perf_counter() - start
            self.counts[label] += 1
            return result

        patches = [
            (backend, "verify", self.timed("verification (random inputs, per site)", backend.verify)),
            (policies.GraphRequest, "analyse", self.timed("recording run (analysis)", policies.GraphRequest.analyse)),
            (policies, "plan", self.timed("knapsack", policies.plan)),
            (policies, "output_gains", self.timed("output gains (one perturbed run per site)", policies.output_gains)),
            (candidates, "evaluate", evaluate_and_label),
            (backend.AttnoptBackend, "_end_to_end",
             self.timed("end-to-end check", backend.AttnoptBackend._end_to_end)),
        ]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, replacement in patches:
                setattr(owner, name, replacement)
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


def run(name: str, profile: bool) -> dict:
    model, args, kwargs = MODELS[name]()
    forward = best_forward_seconds(model, args, kwargs)
    stages = Stages()
    profiler = cProfile.Profile() if profile else None
    with torch.no_grad(), warnings.catch_warnings(), stages.installed():
        warnings.simplefilter("ignore", attnopt.BudgetNotMetWarning)
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        fast = attnopt.optimize(model, 0.5, args, kwargs)
        if profiler is not None:
            profiler.disable()
        planning = time.perf_counter() - start
    report = attnopt.report_of(fast)
    print(f"\n── {name}: {len(report.sites)} site(s) ──")
    print("\n".join(line for line in str(report).splitlines() if line.startswith(("plan:", "budget met"))))
    print(f"planning {planning:.2f} s, one forward {forward * 1e3:.0f} ms: {planning / forward:.1f}× one forward")
    print("stage breakdown (seconds, calls):")
    for label, seconds in sorted(stages.seconds.items(), key=lambda item: -item[1]):
        print(f"  {seconds:7.2f} s  {stages.counts[label]:4d}×  {label}")
    print(f"  {planning - sum(stages.seconds.values()):7.2f} s         rest (dynamo capture, canonicalize, detect, rewrite)")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    return {"planning": planning, "forward": forward, "recorded": [p.planning_seconds for p in report.plans]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    start = time.perf_counter()
    device = costmodel.device_profile("cpu")
    print(f"device profile ({time.perf_counter() - start:.2f} s to read, check or measure): "
          f"{device.matmul_flops_per_s / 1e9:.1f} GFLOP/s, {device.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
          f"{device.elementwise_ops_per_s / 1e9:.2f} Gop/s element-wise, {device.call_overhead_s * 1e6:.1f} µs/call, "
          f"noise {device.noise:.0%}; torch threads {torch.get_num_threads()}")
    results = {name: run(name, options.profile) for name in (options.only or MODELS)}
    print("\n| model | one forward ms | planning s | × one forward | target | met |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        kind, bound = TARGETS[name]
        value = result["planning"] if kind == "seconds" else result["planning"] / result["forward"]
        target = f"≤ {bound:g} s" if kind == "seconds" else f"≤ {bound:g}×"
        print(f"| {name} | {result['forward'] * 1e3:.0f} | {result['planning']:.1f} | "
              f"{result['planning'] / result['forward']:.1f} | {target} | {'yes' if value <= bound else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
