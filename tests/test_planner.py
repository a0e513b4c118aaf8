"""The planner against brute force on small random instances, and its promises on budgets.

Costs and errors are drawn on dyadic grids (multiples of 1/8, 1/16) so that every sum is exact in
floating point and "optimal" can be compared with ==.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt import candidates, costmodel
from attnopt.costmodel import DeviceProfile
from attnopt.planner import (
    Budget,
    BudgetError,
    BudgetNotMetWarning,
    Candidate,
    SiteCandidates,
    never_chosen,
    plan,
)
from attnopt.report import Decision
from attnopt.variants import AgentConfig, ExactConfig, LinearConfig, SiteInfo, spec_for


def candidate(variant: str, seconds: float, flops: float, error: float) -> Candidate:
    return Candidate(variant=variant, params={"tag": variant}, est_seconds=seconds, flops=flops, error=error)


@st.composite
def sites_strategy(draw, max_sites: int = 4, max_alternatives: int = 3) -> list[SiteCandidates]:
    sites = []
    for site_id in range(draw(st.integers(1, max_sites))):
        baseline_eighths = draw(st.integers(1, 8))
        baseline = candidate("exact", baseline_eighths / 8, draw(st.integers(1, 64)), 0.0)
        alternatives = [
            candidate(
                f"alt{index}",
                draw(st.integers(0, baseline_eighths + 2)) / 8,  # a few slower than the baseline
                draw(st.integers(0, 64)),
                draw(st.integers(0, 8)) / 16,
            )
            for index in range(draw(st.integers(0, max_alternatives)))
        ]
        sites.append(SiteCandidates(site_id, baseline, alternatives))
    return sites


fractions = st.integers(1, 24).map(lambda k: k / 16)
budgets = (
    st.tuples(st.none() | fractions, st.none() | fractions, st.none() | st.integers(0, 16).map(lambda k: k / 16))
    .filter(lambda fields: fields[0] is not None or fields[1] is not None)
    .map(lambda fields: Budget(*fields))
)
other_seconds = st.integers(0, 16).map(lambda k: k / 8)


def allowed(site: SiteCandidates, budget: Budget) -> list[Candidate]:
    """What the rules allow at a site, written independently of the planner."""
    options = [site.baseline, *site.alternatives]
    return [
        c for c in options
        if c.est_seconds <= site.baseline.est_seconds and (budget.max_error is None or c.error <= budget.max_error)
    ]


def brute_force_least_error(sites, budget: Budget, other: float) -> float | None:
    """The least total error over every plan that meets the budget, or None if none does."""
    seconds_cap = None if budget.time is None else budget.time * sum((s.baseline.est_seconds for s in sites), other)
    flops_cap = None if budget.flops is None else budget.flops * sum((s.baseline.flops for s in sites), 0.0)
    errors = []
    for combination in itertools.product(*(allowed(site, budget) for site in sites)):
        seconds = sum((c.est_seconds for c in combination), other)
        flops = sum((c.flops for c in combination), 0.0)
        if (seconds_cap is None or seconds <= seconds_cap) and (flops_cap is None or flops <= flops_cap):
            errors.append(sum(c.error for c in combination))
    return min(errors, default=None)


def quiet_plan(sites, budget, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetNotMetWarning)
        return plan(sites, budget, **options)


@settings(max_examples=1000, deadline=None)
@given(sites_strategy(), budgets, other_seconds)
def test_attainable_budget_is_met_with_the_least_error_brute_force_finds(sites, budget, other):
    best = brute_force_least_error(sites, budget, other)
    result = quiet_plan(sites, budget, other_seconds=other)
    assert result.budget_met == (best is not None)
    if best is not None:
        assert result.total_error == best
        if budget.time is not None:
            assert result.seconds_after <= budget.time * result.seconds_before
        if budget.flops is not None:
            assert result.flops_after <= budget.flops * result.flops_before


@settings(max_examples=100, deadline=None)
@given(sites_strategy(max_sites=6, max_alternatives=4), st.integers(1, 24), other_seconds)
def test_thinned_fronts_still_decide_attainability_and_never_beat_the_optimum(sites, eighths, other):
    budget = Budget(time=eighths / 16)
    best = brute_force_least_error(sites, budget, other)
    result = quiet_plan(sites, budget, other_seconds=other, max_front=2)
    assert result.budget_met == (best is not None)
    if best is not None:
        assert result.total_error >= best
        assert result.seconds_after <= budget.time * result.seconds_before


@settings(max_examples=150, deadline=None)
@given(sites_strategy(), st.integers(1, 24), st.integers(1, 24), other_seconds)
def test_a_looser_time_budget_never_gives_more_error(sites, tight, loose, other):
    tight, loose = sorted((tight / 16, loose / 16))
    tight_plan = quiet_plan(sites, tight, other_seconds=other)
    loose_plan = quiet_plan(sites, loose, other_seconds=other)
    if tight_plan.budget_met:
        assert loose_plan.budget_met
        assert loose_plan.total_error <= tight_plan.total_error


@settings(max_examples=150, deadline=None)
@given(sites_strategy(), budgets, other_seconds)
def test_no_site_takes_a_candidate_slower_than_its_baseline(sites, budget, other):
    result = quiet_plan(sites, budget, other_seconds=other)
    for site in sites:
        assert result.choices[site.site_id].est_seconds <= site.baseline.est_seconds


@settings(max_examples=100, deadline=None)
@given(sites_strategy(), budgets, other_seconds)
def test_same_inputs_give_the_same_plan(sites, budget, other):
    first = quiet_plan(sites, budget, other_seconds=other)
    copies = [SiteCandidates(s.site_id, s.baseline, list(s.alternatives)) for s in sites]
    assert quiet_plan(copies, budget, other_seconds=other) == first


def test_a_cheaper_partial_plan_with_more_error_is_kept_when_the_best_plan_needs_it():
    # After site 0, "exact" (error 0) beats "a" on error; but within 0.875 × 2 s only a + b2 fits
    # without b's large error, so "a" must survive site 0.
    sites = [
        SiteCandidates(0, candidate("exact", 1.0, 1, 0.0), [candidate("a", 0.875, 1, 0.0625)]),
        SiteCandidates(1, candidate("exact", 1.0, 1, 0.0), [candidate("b", 0.5, 1, 0.5), candidate("b2", 0.875, 1, 0.0)]),
    ]
    result = plan(sites, Budget(time=0.875))
    assert [c.variant for c in result.choices.values()] == ["a", "b2"]
    assert result.total_error == 0.0625


def test_ties_go_to_the_candidate_listed_first():
    twins = [candidate("first", 0.5, 10, 0.25), candidate("second", 0.5, 10, 0.25)]
    site = SiteCandidates("s", candidate("exact", 1.0, 20, 0.0), twins)
    assert plan([site], 0.5).choices["s"].variant == "first"


def test_equal_plans_resolve_to_the_first_listed_choice_at_the_earliest_site():
    # a+d and b+c cost 0.75 s with error 0.375 each; the choice tuples (1, 2) < (2, 1) pick a+d.
    options = [candidate("a", 0.5, 1, 0.125), candidate("b", 0.25, 1, 0.25)]
    sites = [
        SiteCandidates(0, candidate("exact", 1.0, 1, 0.0), options),
        SiteCandidates(1, candidate("exact", 1.0, 1, 0.0), [candidate("c", 0.5, 1, 0.125), candidate("d", 0.25, 1, 0.25)]),
    ]
    result = plan(sites, Budget(time=0.375))
    assert [c.variant for c in result.choices.values()] == ["a", "d"]


def test_thinning_keeps_the_least_error_plan_of_a_bucket():
    # With one bucket per cap, site 0 leaves exact (no error) and a (cheaper) in one bucket; the
    # optimum exact + b needs the first.
    sites = [
        SiteCandidates(0, candidate("exact", 1.0, 1, 0.0), [candidate("mid", 0.75, 1, 0.5), candidate("a", 0.5, 1, 0.5)]),
        SiteCandidates(1, candidate("exact", 1.0, 1, 0.0), [candidate("b", 0.25, 1, 0.25), candidate("c", 0.5, 1, 0.125)]),
    ]
    result = plan(sites, Budget(time=0.625), max_front=1)
    assert [c.variant for c in result.choices.values()] == ["exact", "b"]


@settings(max_examples=150, deadline=None)
@given(sites_strategy(), st.integers(0, 16))
def test_max_error_alone_takes_the_fastest_candidate_within_it_at_every_site(sites, sixteenths):
    budget = Budget(max_error=sixteenths / 16)
    result = plan(sites, budget)
    assert result.budget_met
    for site in sites:
        chosen = result.choices[site.site_id]
        assert chosen.error <= budget.max_error
        assert chosen.est_seconds == min(c.est_seconds for c in allowed(site, budget))


def test_unattainable_budget_warns_and_returns_the_fastest_plan():
    site = SiteCandidates(0, candidate("exact", 1.0, 100, 0.0), [candidate("agent", 0.5, 40, 0.1)])
    with pytest.warns(BudgetNotMetWarning, match="cannot be met"):
        result = plan([site], Budget(time=0.25))
    assert not result.budget_met
    assert result.choices[0].variant == "agent"
    assert (result.seconds_before, result.seconds_after) == (1.0, 0.5)


def test_unattainable_budget_with_strict_raises():
    site = SiteCandidates(0, candidate("exact", 1.0, 100, 0.0), [candidate("agent", 0.5, 40, 0.1)])
    with pytest.raises(BudgetError, match="cannot be met"):
        plan([site], Budget(time=0.25), strict=True)


def test_max_error_filters_candidates_under_a_time_budget():
    site = SiteCandidates(0, candidate("exact", 1.0, 100, 0.0),
                          [candidate("linear", 0.25, 10, 0.5), candidate("agent", 0.5, 40, 0.1)])
    assert plan([site], Budget(time=0.3)).choices[0].variant == "linear"
    with pytest.warns(BudgetNotMetWarning):
        result = plan([site], Budget(time=0.3, max_error=0.2))
    assert result.choices[0].variant == "agent"


def test_totals_include_the_rest_of_the_model():
    site = SiteCandidates(0, candidate("exact", 1.0, 100, 0.0), [candidate("agent", 0.25, 10, 0.125)])
    result = plan([site], Budget(time=0.75), other_seconds=1.0, other_flops=50)
    assert result.choices[0].variant == "agent"
    assert (result.seconds_before, result.seconds_after) == (2.0, 1.25)
    assert (result.flops_before, result.flops_after) == (150, 60)
    assert result.total_error == 0.125


def test_a_bare_number_is_a_time_budget():
    assert Budget.of(0.5) == Budget(time=0.5)


@pytest.mark.parametrize("fields", [{}, {"time": 0.0}, {"flops": -1.0}, {"time": float("inf")}, {"max_error": -0.1}])
def test_invalid_budgets_are_refused(fields):
    with pytest.raises(ValueError):
        Budget(**fields)


def test_a_baseline_must_have_zero_error():
    with pytest.raises(ValueError, match="baseline"):
        SiteCandidates(0, candidate("exact", 1.0, 100, 0.5))


def test_site_ids_must_be_unique():
    site = SiteCandidates(0, candidate("exact", 1.0, 100, 0.0))
    with pytest.raises(ValueError, match="unique"):
        plan([site, site], 0.5)


# ── Pruning before building: what the planner could never choose is not built ─────────────────


@settings(max_examples=500, deadline=None)
@given(sites_strategy(), budgets, other_seconds)
def test_candidates_never_chosen_change_no_plan_when_left_out(sites, budget, other):
    """attnopt.candidates skips building what `never_chosen` names (from a lower bound on its
    seconds); leaving those candidates out must give the same plan under every budget."""
    kept = [SiteCandidates(site.site_id, site.baseline, [
        c for c in site.alternatives if not never_chosen(c.est_seconds, c.flops, site.baseline)]) for site in sites]
    assert quiet_plan(kept, budget, other_seconds=other) == quiet_plan(sites, budget, other_seconds=other)


def test_never_chosen_is_slower_or_as_fast_with_no_fewer_flops():
    base = candidate("exact", 1.0, 100, 0.0)
    assert never_chosen(1.5, 10, base) and never_chosen(1.0, 100, base) and never_chosen(1.0, 120, base)
    assert not never_chosen(0.5, 200, base) and not never_chosen(1.0, 99, base)


SITE = SiteInfo(B=2, H=2, Hkv=2, N=512, M=512, d=16, e=16, fused=True)
PROFILE = DeviceProfile("cpu-like", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=5e-6)


def test_a_candidate_predicted_no_faster_than_the_baseline_is_refused_without_being_built(monkeypatch):
    built, solved = [], []
    monkeypatch.setattr(candidates, "build_site_module", lambda *args: built.append(args))
    solve = costmodel.break_even_length
    monkeypatch.setattr(costmodel, "break_even_length", lambda *args: solved.append(args) or solve(*args))
    base = candidates.baseline(SITE, PROFILE).candidate
    slow = AgentConfig(agent_fraction=0.25, selection="kmeans", kmeans_window=None)  # global k-means: N·n·d per step
    evaluated = candidates.evaluate(slow, SITE, None, PROFILE, base)  # no capture needed: nothing is built
    assert built == [] and evaluated.module is None and evaluated.candidate is None
    row = evaluated.row
    assert row["refused"].startswith("not built: predicted no faster than softmax")
    assert row["est_seconds"] > base.est_seconds and row["flops"] > 0 and row["error"] is None
    assert solved == []  # the break-even length is solved when read, once
    assert row["pays_off_from_N"] is None or row["pays_off_from_N"] > SITE.N
    assert row.get("pays_off_from_N") == row["pays_off_from_N"] and len(solved) == 1
    assert json.loads(json.dumps(dict(row)))["pays_off_from_N"] == row["pays_off_from_N"]


def test_exact_is_not_built_where_the_model_already_runs_a_fused_kernel_but_a_faster_candidate_is():
    base = candidates.baseline(SITE, PROFILE).candidate
    exact = candidates.evaluate(ExactConfig(), SITE, None, PROFILE, base)
    assert exact.row["refused"].startswith("not built")
    linear = LinearConfig(feature_map="relu")
    assert candidates._would_not_pay(spec_for(linear).formula(linear, SITE), SITE, PROFILE, base) is None


def test_report_rows_solve_their_break_even_length_lazily_wherever_they_are_read():
    solved = []
    rows = [candidates.CandidateRow({"variant": "linear"}, solve=lambda: solved.append(1) or 90) for _ in range(4)]
    assert list(rows[0]) == ["variant", "pays_off_from_N"] and solved == []
    assert dict(rows[0])["pays_off_from_N"] == 90
    assert {**rows[1]}["pays_off_from_N"] == 90
    assert copy.deepcopy(rows[2]) == {"variant": "linear", "pays_off_from_N": 90}
    assert json.loads(json.dumps(rows[3]))["pays_off_from_N"] == 90
    assert len(solved) == 4
    decision = Decision("linear", candidates=[candidates.CandidateRow({"variant": "linear"}, solve=lambda: 7)])
    assert dataclasses.asdict(decision)["candidates"][0]["pays_off_from_N"] == 7
