"""Planning rounds of a loop budget (attnopt.loops) share one EvaluationCache: a later round plans
from the first round's candidate evaluations (no candidate built or measured again), and plans
exactly what planning every round from scratch plans."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import attnopt
from attnopt import loops, policies
from attnopt.api import AttnoptModule
from attnopt.backend import AttnoptBackend
from attnopt.calibration import Calibration
from attnopt.evaluation_cache import EvaluationCache
from attnopt.policies import BudgetPolicy
from tests.test_diffusion_loops import (
    CANDIDATES,
    DIM,
    PROFILE,
    TOKENS,
    Denoiser,
    sample,
)

SITES = 2  # the Denoiser's two attention blocks
LOOP_ERROR = 0.04
"""Below the first round's end-of-loop error (≈0.05: both sites rewritten), above the second's
(≈0.03: one site rewritten): two rounds, the second choosing a module the first built."""


def make(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser().eval()


def latent(seed: int, tokens: int = TOKENS) -> torch.Tensor:
    return torch.randn(1, tokens, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def evaluated(count_calls) -> list[int]:
    """evaluate_site calls of the budget policy, in the one element: one per site evaluated."""
    return count_calls(policies, "evaluate_site")


def optimize(model: nn.Module, loop_error: float = LOOP_ERROR, **options) -> AttnoptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnopt.BudgetNotMetWarning)  # time=0.3 is out of reach by design
        return attnopt.optimize(model, attnopt.Budget(time=0.3, max_error=0.5, loop_error=loop_error), loop=sample,
                                candidates=CANDIDATES, device=PROFILE, **options)


def rounds_of(module: AttnoptModule) -> list[tuple]:
    """What each round planned and measured (not its time, nor what it reused)."""
    return [(r.per_call, r.loop_error, r.rewritten_sites, r.predicted_speedup)
            for r in attnopt.report_of(module).loop.rounds]


def decisions_of(module: AttnoptModule) -> list[tuple]:
    return [(site.id, site.decision.variant, site.decision.params, site.decision.error, site.decision.flops_after,
             site.decision.est_seconds_after, site.decision.output_gain, site.decision.reason,
             [dict(row.items()) for row in site.decision.candidates])
            for site in attnopt.report_of(module).sites]


# ── later rounds reuse the first round's evaluations ──────────────────────────────────────────


@pytest.mark.filterwarnings("ignore::attnopt.BudgetNotMetWarning")  # the new signature's plan: time is out of reach
def test_later_rounds_evaluate_no_site_again(evaluated):
    module = optimize(make())
    check = attnopt.report_of(module).loop
    assert len(check.rounds) >= 2 and check.met
    assert evaluated[0] == SITES  # each site's candidates built and measured once, in round 1
    assert check.rounds[0].reused_sites == 0
    assert all(r.reused_sites == SITES for r in check.rounds[1:])
    assert all(r.seconds is not None and r.seconds > 0 for r in check.rounds)
    cache = module._attnopt_backend.policy.evaluations
    assert isinstance(cache, EvaluationCache) and not cache.open  # closed: the module holds no evaluations
    with torch.no_grad():  # a new signature after the rounds is planned as usual (evaluated anew)
        module(latent(3, tokens=TOKENS // 2), timestep=500)
    assert evaluated[0] == 2 * SITES


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"output_gains": True}, "calibration"],
                         ids=["plain", "output-gains", "calibration"])
def test_reusing_evaluations_plans_what_planning_from_scratch_plans(options, monkeypatch, evaluated, count_calls):
    gains = count_calls(policies, "output_gains")
    if options == "calibration":
        batches = [(latent(10 + i), t) for i, t in enumerate((900, 700, 500, 300, 100, 800, 600, 400))]
        options = {"calibration": Calibration(batches, steps=5)}
    monkeypatch.setattr(loops, "REUSE_EVALUATIONS", False)
    scratch = optimize(make(), **options)
    from_scratch, gains_from_scratch = evaluated[0], gains[0]
    monkeypatch.setattr(loops, "REUSE_EVALUATIONS", True)
    evaluated[0] = gains[0] = 0
    reused = optimize(make(), **options)
    rounds = len(attnopt.report_of(reused).loop.rounds)
    assert rounds >= 2
    assert evaluated[0] == SITES and from_scratch == SITES * rounds
    assert rounds_of(reused) == rounds_of(scratch)
    assert decisions_of(reused) == decisions_of(scratch)
    assert any(site.decision.variant != attnopt.report.KEPT for site in attnopt.report_of(reused).sites)
    if options.get("output_gains"):  # measured once (round 1), reused by every round that weighs errors
        assert gains[0] == 1 and gains_from_scratch > 1
        assert all(site.decision.output_gain is not None for site in attnopt.report_of(reused).sites)
    assert attnopt.report_of(reused).plans[-1].output_error == attnopt.report_of(scratch).plans[-1].output_error
    assert torch.equal(sample(reused), sample(scratch))
    with torch.no_grad():
        assert torch.equal(reused(latent(5), timestep=250), scratch(latent(5), timestep=250))
    state, expected = reused.state_dict(), scratch.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[key], expected[key]) for key in state)


def test_a_module_kept_from_a_discarded_round_is_chosen_again_unchanged(monkeypatch):
    chosen: list[dict[int, tuple[nn.Module, dict[str, torch.Tensor]]]] = []
    real = BudgetPolicy.choose

    def recording(self, request):
        choices = real(self, request)
        chosen.append({site_id: (module, {k: v.clone() for k, v in module.state_dict().items()})
                       for site_id, module in choices.modules.items()})
        return choices

    monkeypatch.setattr(BudgetPolicy, "choose", recording)
    module = optimize(make())
    assert len(chosen) >= 2 and chosen[-1]
    first, last = chosen[0], chosen[-1]
    for site_id, (kept, _) in last.items():
        original, state = first[site_id]
        assert kept is original  # built in round 1, whose module was discarded
        # the round-1 loop runs and checks, and round 2's, changed nothing in it
        assert all(torch.equal(value, state[key]) for key, value in kept.state_dict().items())
    assert dict(module.attnopt_site_modules()) == {site_id: kept for site_id, (kept, _) in last.items()}


# ── never reused where it does not belong ─────────────────────────────────────────────────────


@pytest.mark.slow
def test_another_optimize_call_never_reuses_the_evaluations_of_one_before(evaluated):
    model = make()
    first = optimize(model)
    firsts = evaluated[0]
    other = optimize(make(seed=1))  # another instance, other weights
    again = optimize(model)  # the same model again: a new call plans anew
    for module in (first, other, again):
        assert attnopt.report_of(module).loop.rounds[0].reused_sites == 0
    assert firsts == SITES and evaluated[0] == 3 * SITES
    modules = [{id(m) for _, m in module.attnopt_site_modules()} for module in (first, other, again)]
    assert not modules[0] & modules[1] and not modules[0] & modules[2] and not modules[1] & modules[2]


def _plan_once(policy: BudgetPolicy, model: nn.Module, x: torch.Tensor) -> list:
    backend = AttnoptBackend(policy)
    with torch.no_grad():
        AttnoptModule(model, backend, None)(x, 500)
    return [(site.decision.variant, site.decision.error) for site in backend.report.sites]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::attnopt.BudgetNotMetWarning")  # time=0.5 is out of reach by design
def test_an_evaluation_is_reused_only_for_the_same_site_capture_and_settings(evaluated):
    model, cache = make(), EvaluationCache()
    policy = lambda budget=0.5, candidates=CANDIDATES: BudgetPolicy(  # noqa: E731
        budget, candidates, device=PROFILE, evaluations=cache)
    x = latent(0)
    first = _plan_once(policy(), model, x)
    assert (cache.misses, cache.hits, evaluated[0]) == (SITES, 0, SITES)
    assert _plan_once(policy(), model, x) == first  # the same graph, inputs and weights: reused
    assert (cache.misses, cache.hits, evaluated[0]) == (SITES, SITES, SITES)
    _plan_once(policy(0.9), model, x)  # another budget: the same evaluations
    assert (cache.hits, evaluated[0]) == (2 * SITES, SITES)

    _plan_once(policy(), model, latent(1))  # other values, same shapes: every site measured again
    assert (cache.hits, evaluated[0]) == (2 * SITES, 2 * SITES)
    _plan_once(policy(), model, latent(0, tokens=TOKENS // 2))  # another shape
    assert (cache.hits, evaluated[0]) == (2 * SITES, 3 * SITES)
    _plan_once(policy(), make(seed=1), x)  # another instance's weights
    assert (cache.hits, evaluated[0]) == (2 * SITES, 4 * SITES)
    _plan_once(policy(candidates=list(CANDIDATES)), model, x)  # other candidates (an equal list): not served
    assert (cache.hits, evaluated[0]) == (2 * SITES, 5 * SITES)

    twin = copy.deepcopy(cache)
    assert not twin.open and twin.hits == 0  # a copy keeps nothing
    cache.close()
    assert _plan_once(policy(), model, x) == first  # closed: evaluated anew, nothing kept
    assert (cache.hits, evaluated[0]) == (2 * SITES, 6 * SITES) and not cache._evaluations
