"""The main job, end to end on a model built in this repo (examples/demo_model.py):

1. find every attention site and print the report;
2. rewrite them exactly (attnopt's own attention op) and check the outputs;
3. at a higher resolution (1025 tokens), `optimize` under a time budget: per site, the cost
   model and the error measured on this call's inputs choose agent, linear, mediator or softmax;
   print the decisions, then time the original and the optimized model.

    python examples/demo.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnopt  # noqa: E402
from demo_model import factory  # noqa: E402


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def best_seconds(run, repeats: int = 5) -> float:
    run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    model, args, kwargs = factory()
    print(attnopt.inspect(model, args, kwargs))

    exact = attnopt.rewrite(model, "exact", args, kwargs)
    with torch.no_grad():
        error = relative_error(exact(*args, **kwargs), model(*args, **kwargs))
    print(attnopt.report_of(exact))
    print(f"exact rewrite: {len(attnopt.report_of(exact).rewritten)} site(s) rewritten, "
          f"relative error vs the original {error:.1e}\n")

    model, args, kwargs = factory(image=256)  # 32×32 patches + a class token: N = 1025
    budget = attnopt.Budget(time=0.5, max_error=0.5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("always", attnopt.BudgetNotMetWarning)
        fast = attnopt.optimize(model, budget, args, kwargs)
        report = attnopt.report_of(fast)
        print(report)
        error = relative_error(fast(*args, **kwargs), model(*args, **kwargs))
        original = best_seconds(lambda: model(*args, **kwargs))
        optimized = best_seconds(lambda: fast(*args, **kwargs))
    print(f"optimize({budget}): {len(report.rewritten)} of {len(report.sites)} site(s) rewritten, "
          f"predicted {report.plans[0].predicted_speedup:.2f}x, measured {original / optimized:.2f}x faster "
          f"({original * 1e3:.1f} ms → {optimized * 1e3:.1f} ms), output relative error {error:.2e}")


if __name__ == "__main__":
    main()
