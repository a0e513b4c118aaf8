"""An error budget for a whole loop over the model (a diffusion sampler), not for one call.

Each call of a sampling loop feeds the next, so per-call errors compound: sites held to 0.05 per
call can leave a 20-step DDIM latent 0.08 away from the original's. `optimize(model,
Budget(loop_error=0.05, ...), loop=run)` plans as usual, then runs `run` — a short run of the
user's loop: it takes a model and returns the loop's final output — once with the original model
and once with the rewrite, and measures the relative error of the final output
(`numerics.output_error`). While that end-of-loop error is over `loop_error`, it plans again
with less rewriting under a tighter per-call budget, down to keeping every softmax; the last
rewrite is returned, and `report.loop` (a `LoopCheck`) shows each round's per-call budget,
end-of-loop error and time beside the per-call errors of the sites.

Each round builds a new module (its own capture, recording run, verification and end-to-end
check), but the rounds share one `policies.EvaluationCache`: a site that receives in a later
round what it received in an earlier one (same graph, signature, site and facts, and a capture
with the same bytes) is planned from that round's candidate evaluations — its baseline and
alternatives, their measured errors and prices, and the modules built for them — so a later
round re-runs the knapsack under its budget instead of building and measuring every candidate
again. The cache is closed (emptied) when the rounds are over; `REUSE_EVALUATIONS = False` plans
every round from scratch (what the tests and bench/diffusion_loop.py compare against).

Rules
- Round 1 plans with the user's time/flops budget and every site capped at `max_error`, or at
  `loop_error` when no max_error is given (per-call errors usually compound over the loop, so
  a site above the loop's budget rarely fits in it; a loop that damps errors may take more,
  which an explicit max_error allows).
- A round over the loop's budget plans again with less rewriting: the time axis is relaxed from
  the saving the round's plan predicted, `1 − saving · clamp(0.7 · loop_error / error, 0.1, 0.8)`
  (the least-error plan for a looser time budget rewrites fewer or gentler sites; errors compound
  about in proportion). With no time or flops budget, the time axis starts from round 1's
  predicted saving. A round that rewrote no site, or `MAX_ROUNDS` rounds, ends the search.
- The loop's budget comes first: when no round met it, one last round keeps every softmax
  (`max_error=0`), so the module returned meets it unless it is below the exact op's rounding.
  (End-of-loop error is not monotone in how much is rewritten — one site may compound more than
  two — so the search can miss plans that would have met it; it never returns one that does not.)
- `run` is called under a fixed seed (CPU and CUDA generators forked, so the caller's random
  state is untouched), and the original is run twice: outputs that differ between the two runs
  make the loop unusable as a measure, which is an error naming the cause.
- A loop budget still missed after the last round warns BudgetNotMetWarning (BudgetError if
  strict); so does a time/flops budget the plan that meets the loop's error misses.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from .backend import AttnoptError
from .evaluation_cache import EvaluationCache
from .numerics import output_error
from .planner import Budget, BudgetError, BudgetNotMetWarning

MAX_ROUNDS = 5
SEED = 0
REUSE_EVALUATIONS = True
"""Later rounds plan from the candidate evaluations of earlier ones (see the module doc); False
plans every round from scratch (for comparisons: the result is the same, only slower)."""


@dataclasses.dataclass(frozen=True)
class LoopRound:
    """One planning round: the per-call budget the planner had, and what came of it."""

    per_call: str
    """The per-call budget of the round (as the report's plans show budgets)."""
    loop_error: float
    rewritten_sites: int
    predicted_speedup: float | None
    seconds: float | None = None
    """Wall time of the round: building and planning the module, and running the loop with it."""
    planning_seconds: float | None = None
    """Of which the policy's choosing (`GraphPlan.planning_seconds`, summed over the round's plans):
    the recording run, the candidates' evaluations (unless reused) and the knapsack."""
    reused_sites: int = 0
    """Site evaluations the round took from earlier rounds instead of building and measuring again."""


@dataclasses.dataclass(frozen=True)
class LoopCheck:
    """The end-of-loop check of an `optimize(..., loop=run)` call: what the returned module gives."""

    budget: float
    """Budget.loop_error: the largest allowed relative error of the loop's final output."""
    error: float
    """The measured relative error of the final output of `run`, the returned module against the original."""
    largest_call_error: float
    """The largest per-call error among the returned module's rewritten sites."""
    rounds: tuple[LoopRound, ...]

    @property
    def met(self) -> bool:
        return self.error <= self.budget

    def __str__(self) -> str:
        return (f"loop: end-of-loop error {self.error:.3g} {'≤' if self.met else '>'} {self.budget:g}, "
                f"largest per-call error {self.largest_call_error:.3g} "
                f"(planned in {len(self.rounds)} round(s): {self.rounds[-1].per_call} per call)")


def first_budget(budget: Budget) -> Budget:
    """The per-call budget of round 1: the user's, sites capped at max_error, else at loop_error."""
    assert budget.loop_error is not None
    cap = budget.loop_error if budget.max_error is None else budget.max_error
    return dataclasses.replace(budget, max_error=cap, loop_error=None)


def relaxed(per_call: Budget, speedup: float | None, budget: float, error: float) -> Budget | None:
    """The next round's per-call budget after one whose plan, predicted `speedup`× faster, left the
    loop's final output at `error` > `budget`; None when that plan saved nothing to give back."""
    if not speedup or speedup <= 1:
        return None
    saving = (1 - 1 / speedup) * min(0.8, max(0.1, 0.7 * budget / error))
    axis = "flops" if per_call.flops is not None and per_call.time is None else "time"
    return dataclasses.replace(per_call, **{axis: 1 - saving})


def final_output(run: Callable[[Any], Any], model: Any) -> list[torch.Tensor]:
    """The tensors `run(model)` returns, computed under a fixed seed without touching the
    caller's random state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        out = run(model)
    tensors = [leaf.detach() for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise AttnoptError(f"the loop given to optimize returned {type(out).__name__}, with no tensor in it: "
                           "it must return the loop's final output (e.g. the final latent).")
    return tensors


def loop_error(output: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The relative error of a loop's final output: the largest over its tensors."""
    if len(output) != len(reference) or any(a.shape != b.shape for a, b in zip(output, reference)):
        return float("inf")
    return max(output_error(a, b) for a, b in zip(output, reference))


def reference_output(run: Callable[[Any], Any], model: Any) -> list[torch.Tensor]:
    """The original model's final output, checked to be the same on a second run."""
    with torch.no_grad():
        first = final_output(run, model)
        second = final_output(run, model)
    if loop_error(second, first) > 0:
        raise AttnoptError("the loop given to optimize returns different outputs on two runs of the original "
                           "model under the same seed, so its error cannot be measured: make it deterministic "
                           "(seed its noise with a torch.Generator, or draw it from torch's global generator).")
    return first


def slowest_speedup(report: Any) -> float | None:
    """The predicted speedup of the report's least-sped-up plan (None when nothing was planned)."""
    speedups = [plan.predicted_speedup for plan in report.plans]
    return None if not speedups or None in speedups else min(speedups)


def plan_for_loop(build: Callable[[Budget, EvaluationCache | None], Any], model: Any, run: Callable[[Any], Any],
                  budget: Budget, *, strict: bool = False) -> Any:
    """The module `build(per-call budget, evaluations)` gives for the most rewriting under which
    `run`'s final output stays within `budget.loop_error` of the original's (see the module doc).
    `evaluations` is the rounds' shared EvaluationCache (None with REUSE_EVALUATIONS off), which
    `build` hands to its BudgetPolicy."""
    if budget.loop_error is None:
        raise AttnoptError("optimize got a loop but its Budget has no loop_error: give "
                           "attnopt.Budget(loop_error=..., time=...) to bound the loop's final output.")
    reference = reference_output(run, model)
    per_call, rounds = first_budget(budget), []
    cache = EvaluationCache() if REUSE_EVALUATIONS else None
    try:
        while True:
            began, reused = time.perf_counter(), cache.hits if cache is not None else 0
            with warnings.catch_warnings():  # the returned module's budgets are judged once, below
                warnings.simplefilter("ignore", BudgetNotMetWarning)
                module = build(per_call, cache)
                error = loop_error(final_output(run, module), reference)
            report = module._attnopt_backend.report
            site_errors = [s.decision.error or 0.0 for s in report.rewritten]
            speedup = slowest_speedup(report)
            rounds.append(LoopRound(_describe(per_call), error, len(site_errors), speedup,
                                    seconds=time.perf_counter() - began,
                                    planning_seconds=sum(plan.planning_seconds or 0.0 for plan in report.plans),
                                    reused_sites=(cache.hits if cache is not None else 0) - reused))
            if error <= budget.loop_error or not site_errors:
                break
            per_call = relaxed(per_call, speedup, budget.loop_error, error)
            if per_call is None or len(rounds) == MAX_ROUNDS - 1:
                per_call = dataclasses.replace(budget, time=None, flops=None, max_error=0.0, loop_error=None)
    finally:
        if cache is not None:  # the returned module plans new signatures anew, and holds no evaluations
            cache.close()
    report.loop = LoopCheck(budget.loop_error, error, max(site_errors, default=0.0), tuple(rounds))
    if not report.loop.met:
        message = (f"{report.loop}: the loop's budget is not met"
                   + ("" if site_errors else " even with every softmax kept (it is below the exact rewrite's "
                      "rounding)") + ".")
        if strict:
            raise BudgetError(message)
        warnings.warn(message, BudgetNotMetWarning, stacklevel=3)
    if (budget.time is not None or budget.flops is not None) and not _meets(report, budget):
        message = f"the budget {_describe(budget)} is not met by the plan that meets the loop's error"
        if strict:
            raise BudgetError(message)
        warnings.warn(message, BudgetNotMetWarning, stacklevel=3)
    return module


def _meets(report: Any, budget: Budget) -> bool:
    """Whether every plan of `report` meets the user's time/flops budget."""
    for plan in report.plans:
        if budget.time is not None and plan.predicted_speedup is not None and 1 / plan.predicted_speedup > budget.time:
            return False
        if budget.flops is not None and plan.flops_before and plan.flops_after is not None \
                and plan.flops_after > budget.flops * plan.flops_before:
            return False
    return True


def _describe(budget: Budget) -> str:
    return ", ".join(f"{name}={getattr(budget, name):.3g}" for name in ("time", "flops", "max_error")
                     if getattr(budget, name) is not None)


__all__ = ["LoopCheck", "LoopRound", "plan_for_loop"]
