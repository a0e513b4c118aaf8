"""Choose one candidate per attention site so the whole forward meets a Budget at the least error.

The planner sees numbers only — per site, candidates with predicted seconds, FLOPs and measured
error, plus the cost of the rest of the model — so it knows nothing of graphs and can be checked
against brute force.

Rules
- `Budget(time=0.5)`: the predicted whole-forward time (rest of the model + every site) is at most
  0.5 × the original's; among the plans that meet it, the least total error wins: the sum of the
  sites' measured errors, each weighed by its candidate's `objective` where given (the policy
  sets it to the error times the site's measured output gain, attnopt.sensitivity, so the sum
  estimates the error of the graph's output). `flops=` is the same with FLOPs; both may be given.
- `max_error` alone: the fastest plan whose every chosen candidate has error ≤ max_error; with time
  or flops, candidates above max_error are simply left out.
- A candidate predicted slower than its site's baseline is never chosen; nor is one predicted as
  fast with no fewer FLOPs (the baseline, listed first, wins every tie). `never_chosen` says so
  from a lower bound on the seconds, which is how attnopt.candidates skips building them.
- An unattainable budget gives the fastest plan within the other rules, `budget_met=False` and a
  BudgetNotMetWarning; `strict=True` raises BudgetError instead.

Method: a multiple-choice knapsack, solved by dynamic programming over Pareto fronts. Sites are
taken in order; a partial plan carries its cost on each budgeted axis, its error and its choices.
After each site, partial plans that cannot be completed within the caps (their cost plus the
cheapest possible rest exceeds a cap) are dropped, and so is every partial plan that another one
matches or beats on every budgeted axis and on error: adding the same later choices to both keeps
the second no better. The survivors within the caps are compared by (error, costs in axis order,
choices in lexicographic order), so ties go to the candidate listed first and the result is
deterministic. This is exact while every front holds at most `max_front` plans (tens of sites give
hundreds to a few thousand). A larger front is thinned to its least-error plan per 1/max_front of
the first cap; the error may then miss the optimum, but every plan left can still be completed
within the caps, so with one budgeted axis whether the budget can be met stays exact.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np


class BudgetError(ValueError):
    """The budget cannot be met and the caller asked for strict planning."""


class BudgetNotMetWarning(UserWarning):
    """The budget cannot be met; the fastest allowed plan is returned instead."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the optimised model must achieve, relative to the original.

    time: predicted whole-forward seconds ≤ time × the original's (0.5 = twice as fast).
    flops: the same with FLOPs. max_error: every site's measured error ≤ max_error.
    loop_error: the relative error of the final output of a loop over the model (a diffusion
        sampler) ≤ loop_error; only with `optimize(..., loop=run)`, which measures it (attnopt.loops).
    """

    time: float | None = None
    flops: float | None = None
    max_error: float | None = None
    loop_error: float | None = None

    def __post_init__(self) -> None:
        if self.time is None and self.flops is None and self.max_error is None and self.loop_error is None:
            raise ValueError("a Budget needs at least one of time, flops, max_error, loop_error")
        if self.loop_error is not None and not (self.loop_error >= 0 and math.isfinite(self.loop_error)):
            raise ValueError(f"Budget.loop_error must be a finite number ≥ 0, got {self.loop_error!r}")
        for name in ("time", "flops"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Budget.{name} must be a positive fraction of the original, got {value!r}")
        if self.max_error is not None and not self.max_error >= 0:
            raise ValueError(f"Budget.max_error must be ≥ 0, got {self.max_error!r}")

    @classmethod
    def of(cls, budget: Budget | float) -> Budget:
        """A Budget as given, or a bare number read as Budget(time=number)."""
        return budget if isinstance(budget, Budget) else cls(time=float(budget))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One way to compute a site: a variant with its params, predicted cost and measured error."""

    variant: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    est_seconds: float
    flops: float
    error: float
    objective: float | None = None
    """What the plan minimises the sum of, when not the error itself: the error weighed by how much
    it moves the graph's output (attnopt.sensitivity). max_error still caps `error`."""

    def __post_init__(self) -> None:
        for name in ("est_seconds", "flops", "error"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Candidate {self.variant}: {name} must be finite and ≥ 0, got {value!r}")
        if self.objective is not None and not (self.objective >= 0 and math.isfinite(self.objective)):
            raise ValueError(f"Candidate {self.variant}: objective must be finite and ≥ 0, got {self.objective!r}")

    @property
    def weighed_error(self) -> float:
        """The error the plan minimises: `objective` where given, else `error`."""
        return self.error if self.objective is None else self.objective


@dataclasses.dataclass(frozen=True)
class SiteCandidates:
    """A site's baseline (its original attention, error 0) and the alternatives it may take."""

    site_id: Hashable
    baseline: Candidate
    alternatives: Sequence[Candidate] = ()

    def __post_init__(self) -> None:
        if self.baseline.error != 0 or self.baseline.weighed_error != 0:
            raise ValueError(f"site {self.site_id!r}: the baseline's error must be 0, got {self.baseline.error}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen candidate per site and the whole-forward totals before and after."""

    choices: dict[Hashable, Candidate]
    budget: Budget
    budget_met: bool
    seconds_before: float
    seconds_after: float
    flops_before: float
    flops_after: float
    total_error: float
    """Sum of the chosen candidates' measured errors."""
    weighed_error: float = 0.0
    """Sum of the chosen candidates' `weighed_error`: what the plan minimised."""


AXES = {"time": "est_seconds", "flops": "flops"}
"""Budget field → Candidate field it caps."""


def _allowed(site: SiteCandidates, max_error: float | None) -> list[Candidate]:
    """The baseline and every alternative no slower than it and within max_error, in listed order."""
    return [site.baseline] + [
        candidate
        for candidate in site.alternatives
        if candidate.est_seconds <= site.baseline.est_seconds
        and (max_error is None or candidate.error <= max_error)
    ]


def never_chosen(seconds_at_least: float, flops: float, baseline: Candidate) -> bool:
    """Whether a candidate predicted to take at least `seconds_at_least` with `flops` FLOPs can never
    be chosen at a site with this baseline, under any budget: it is slower, or as fast with no
    fewer FLOPs, so the baseline (error 0, listed first) beats or ties it on every axis."""
    return seconds_at_least > baseline.est_seconds or (
        seconds_at_least == baseline.est_seconds and flops >= baseline.flops)


def _fastest(candidates: list[Candidate], primary: str) -> int:
    """Index of the cheapest candidate on `primary`, then on seconds and FLOPs; the first listed on ties."""
    return min(
        range(len(candidates)),
        key=lambda index: (getattr(candidates[index], primary), candidates[index].est_seconds, candidates[index].flops),
    )


def _undominated(costs: np.ndarray) -> np.ndarray:
    """Mask of the rows (partial plans in key order) that no earlier row matches or beats on every axis.

    Earlier rows have no more error, so a row is dominated exactly when an earlier row costs no
    more on every axis. One axis: compare with the running minimum. Two: a staircase of the kept
    rows (first cost increasing, second decreasing) answers "least second cost among first ≤ x".
    """
    if costs.shape[1] == 1:
        earlier_min = np.concatenate(([np.inf], np.minimum.accumulate(costs[:-1, 0])))
        return costs[:, 0] < earlier_min
    keep = np.zeros(len(costs), dtype=bool)
    stair_x: list[float] = []
    stair_y: list[float] = []
    for row, (x, y) in enumerate(costs.tolist()):
        position = bisect.bisect_right(stair_x, x)
        if position > 0 and stair_y[position - 1] <= y:
            continue
        keep[row] = True
        end = position
        while end < len(stair_x) and stair_y[end] >= y:
            end += 1
        stair_x[position:end], stair_y[position:end] = [x], [y]
    return keep


def _thin(costs: np.ndarray, caps: np.ndarray, max_front: int) -> np.ndarray:
    """Rows to keep of a front (in key order) that outgrew max_front: the least-error row per
    1/max_front of the first cap."""
    bucket = np.floor(costs[:, 0] / max(caps[0], np.finfo(float).tiny) * max_front)
    return np.sort(np.unique(bucket, return_index=True)[1])


def _least_error_plan(
    options: list[list[Candidate]],
    start_costs: tuple[float, ...],
    caps: tuple[float, ...],
    fields: tuple[str, ...],
    max_front: int,
) -> tuple[int, ...] | None:
    """Choice indices of the least-error plan within the caps (see the module docstring), or None.

    A front is held as arrays: costs (rows × axes), error, and the rank of each row's choice tuple
    in lexicographic order; each site's parent row and choice are kept to trace the winner back.
    """
    caps_array = np.array(caps)
    site_costs = [np.array([[getattr(c, field) for field in fields] for c in candidates]) for candidates in options]
    site_errors = [np.array([c.weighed_error for c in candidates]) for candidates in options]
    cheapest_rest = np.zeros((len(options) + 1, len(fields)))
    for index in reversed(range(len(options))):
        cheapest_rest[index] = cheapest_rest[index + 1] + site_costs[index].min(axis=0)
    slack = 1 + 1e-9  # dropping early is only a shortcut; the final check below is exact

    costs, errors = np.array([start_costs], dtype=float), np.zeros(1)
    ranks = np.zeros(1, dtype=np.int64)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for index, (candidate_costs, candidate_errors) in enumerate(zip(site_costs, site_errors)):
        rows, choices = len(errors), len(candidate_errors)
        parent, choice = np.repeat(np.arange(rows), choices), np.tile(np.arange(choices), rows)
        new_costs = (costs[:, None, :] + candidate_costs[None, :, :]).reshape(rows * choices, len(fields))
        new_errors = (errors[:, None] + candidate_errors[None, :]).reshape(-1)
        parent_ranks = ranks[parent]  # choice tuples compare as (parent's rank, choice)
        reachable = np.flatnonzero(np.all(new_costs + cheapest_rest[index + 1] <= caps_array * slack, axis=1))
        in_key_order = reachable[
            np.lexsort((choice[reachable], parent_ranks[reachable], *new_costs[reachable].T[::-1], new_errors[reachable]))
        ]
        front = in_key_order[_undominated(new_costs[in_key_order])]
        if len(front) == 0:
            return None
        if len(front) > max_front:
            front = front[_thin(new_costs[front], caps_array, max_front)]
        costs, errors, parent, choice = new_costs[front], new_errors[front], parent[front], choice[front]
        ranks = np.empty(len(front), dtype=np.int64)
        ranks[np.lexsort((choice, parent_ranks[front]))] = np.arange(len(front))
        trail.append((parent, choice))

    feasible = np.flatnonzero(np.all(costs <= caps_array, axis=1))
    if len(feasible) == 0:
        return None
    row = feasible[0]  # fronts stay in key order
    picks = []
    for parent, choice in reversed(trail):
        picks.append(int(choice[row]))
        row = parent[row]
    return tuple(reversed(picks))


def plan(
    sites: Sequence[SiteCandidates],
    budget: Budget | float,
    *,
    other_seconds: float = 0.0,
    other_flops: float = 0.0,
    strict: bool = False,
    max_front: int = 4096,
) -> Plan:
    """Choose a candidate per site under `budget` (a Budget, or a float meaning Budget(time=float)).

    other_seconds / other_flops: predicted cost of everything in the forward that is not a site.
    strict: raise BudgetError instead of warning when the budget cannot be met.
    max_front: partial plans kept per site before thinning (see the module docstring).
    """
    budget = Budget.of(budget)
    if len({site.site_id for site in sites}) != len(sites):
        raise ValueError("site ids must be unique")
    options = [_allowed(site, budget.max_error) for site in sites]
    seconds_before = sum((site.baseline.est_seconds for site in sites), other_seconds)
    flops_before = sum((site.baseline.flops for site in sites), other_flops)
    budgeted = [name for name in AXES if getattr(budget, name) is not None]
    fields = tuple(AXES[name] for name in budgeted)
    totals_before = {"time": (other_seconds, seconds_before), "flops": (other_flops, flops_before)}
    start_costs = tuple(totals_before[name][0] for name in budgeted)
    caps = tuple(getattr(budget, name) * totals_before[name][1] for name in budgeted)

    primary = fields[0] if fields else "est_seconds"
    fastest = tuple(_fastest(candidates, primary) for candidates in options)
    choices = _least_error_plan(options, start_costs, caps, fields, max_front) if fields else fastest
    budget_met = choices is not None
    if not budget_met:
        choices = fastest
    chosen = [candidates[choice] for candidates, choice in zip(options, choices)]
    result = Plan(
        choices={site.site_id: candidate for site, candidate in zip(sites, chosen)},
        budget=budget,
        budget_met=budget_met,
        seconds_before=seconds_before,
        seconds_after=sum((candidate.est_seconds for candidate in chosen), other_seconds),
        flops_before=flops_before,
        flops_after=sum((candidate.flops for candidate in chosen), other_flops),
        total_error=sum(candidate.error for candidate in chosen),
        weighed_error=sum(candidate.weighed_error for candidate in chosen),
    )
    if not budget_met:
        message = (
            f"{budget} cannot be met: the fastest allowed plan predicts {result.seconds_after:.3g} s "
            f"(original {seconds_before:.3g} s) and {result.flops_after:.3g} FLOPs (original {flops_before:.3g})"
        )
        if strict:
            raise BudgetError(message)
        warnings.warn(message + "; returning that plan", BudgetNotMetWarning, stacklevel=2)
    return result
