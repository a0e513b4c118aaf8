"""What replaces each rewritable site of one graph: the "decide" step of the backend.

A policy gets every rewritable site of one captured graph at one input signature and returns
its `Choices`: per site, the `Decision` and the attention module computing it (None: the site
keeps its original code), and the graph's `GraphPlan` when it planned one. Policies write
nothing: the backend records the decisions, the modules and the plan.

- `ExactPolicy`: attnopt's exact op everywhere (`rewrite(model, "exact")`).
- `VariantPolicy`: one variant everywhere it is not refused (`rewrite(model, "agent", ...)`).
- `BudgetPolicy`: per site, the candidate a knapsack over the whole graph picks so the graph
  meets the budget at the least total measured error (`optimize`, `options={"budget": ...}`).
- `attnopt.persist.LoadedPolicy`: the decisions and site modules of a saved file (`attnopt.load`),
  for the graphs and shapes it holds; any other shape is decided by the saved policy.

`BudgetPolicy(evaluations=...)` plans from an `attnopt.evaluation_cache.EvaluationCache`: the
candidate evaluations of one `optimize` call, kept for its later planning rounds (a loop budget).

One graph is planned at a time: a model captured whole (no graph breaks) is planned whole; with
graph breaks each graph meets the budget on its own, so the whole model meets it too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from attnopt.passes.detect import SiteMatch

from . import costmodel
from .analysis import Analysis, SiteCapture, analyse
from .calibration import Calibrator, LazySiteData, site_keys
from .candidates import (
    EXACT,
    Evaluated,
    baseline,
    evaluate,
    evaluate_site,
)
from .evaluation_cache import (
    EvaluationCache,
    Evaluations,
    capture_digest,
    hashable,
    outputs_digest,
)
from .planner import Budget, Candidate, SiteCandidates, plan
from .report import Decision, GraphPlan, Site
from .sensitivity import output_gains
from .variants import ExactConfig, SiteInfo, build_site_module


@dataclasses.dataclass
class GraphRequest:
    """One graph at one input signature, with its verified rewritable sites."""

    canonical: fx.GraphModule
    args: tuple[Any, ...]
    mutated: set[int]
    sites: list[tuple[Site, SiteMatch]]
    graph: int
    signature: str

    def analyse(self) -> Analysis:
        return analyse(self.canonical, self.args, self.mutated, self.sites)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a policy decided for one site."""

    decision: Decision
    module: nn.Module | None
    """The attention module computing the site, or None when it keeps its original code."""


@dataclasses.dataclass(frozen=True)
class Choices:
    """A policy's answer for one graph: a Choice per site it decided (a site it could not decide,
    e.g. one the recording run never reached, is left out), the graph's plan, if it made one, and
    the facts of the sites it analysed (what its decisions read, and what the report shows)."""

    sites: dict[int, Choice]
    plan: GraphPlan | None = None
    facts: dict[int, SiteInfo] = dataclasses.field(default_factory=dict)

    @property
    def modules(self) -> dict[int, nn.Module]:
        """Site id → attention module, for the sites to rewrite."""
        return {site_id: choice.module for site_id, choice in self.sites.items() if choice.module is not None}


class Policy(Protocol):
    """What the backend asks of a policy. Optional members the backend reads where present:
    `shares_sizes` (bool, default False: decisions depend on neither weights nor shape, so one
    analysis serves a size bucket; backend._PerSignature), `site_modules` (site id → module
    decided before any graph ran: what a loaded file holds, so `parameters()` and `state_dict()`
    have them from the start; site ids below `first_site_id` are theirs) and `site_ids(key,
    matches)` (the ids of a graph's detected sites, for a call with `backend.call_key` `key`,
    when the policy knows them; else None)."""

    name: str
    per_instance: bool
    """Decisions depend on the weights (measured errors, calibration): plan each instance anew."""

    def choose(self, request: GraphRequest) -> Choices:
        """The decision, and module if rewritten, of every site of the request."""
        ...


class ExactPolicy:
    """Every site computed by attnopt's exact op: same function, attnopt's kernel."""

    name = EXACT.name
    per_instance = False  # the exact op is verified for any weights
    shares_sizes = True  # nor does it depend on the shape: one analysis per size bucket

    def choose(self, request: GraphRequest) -> Choices:
        config = ExactConfig()
        choices = {}
        for site, _ in request.sites:
            info = SiteInfo.from_shape(site.shape)
            flops = costmodel.flops(EXACT.formula(config, info), site.shape)
            decision = Decision(variant=EXACT.name, error=0.0, flops_before=flops, flops_after=flops)
            choices[site.id] = Choice(decision, build_site_module(config, info))
        return Choices(choices)


def _decision(chosen: Evaluated, base: Evaluated, rows: list[dict[str, Any]], reason: str | None) -> Decision:
    candidate = chosen.candidate
    return Decision(variant=candidate.variant, params=dict(candidate.params), flops_before=base.candidate.flops,
                    flops_after=candidate.flops, est_seconds_before=base.candidate.est_seconds,
                    est_seconds_after=candidate.est_seconds, error=candidate.error, candidates=rows, reason=reason)


def _profile(device: Any, analysis: Analysis) -> costmodel.DeviceProfile:
    """The roofline profile for the `device` option, else for the device and dtype the sites ran on."""
    capture = next(iter(analysis.captures.values()), None)
    dtype = capture.q.dtype if capture is not None else torch.float32
    where = device if device is not None or capture is None else capture.q.device
    return costmodel.resolve_profile(where, dtype)


def _site_calibration(calibration: Calibrator | None, request: GraphRequest) -> dict[int, LazySiteData]:
    """Site id → its calibration captures, recorded on first use (none without calibration)."""
    if calibration is None:
        return {}
    keys = site_keys(request)
    return {site.id: LazySiteData(calibration, keys[site.id], f" at {site.source or site.module or site.form}"
                                                             f" (graph {request.graph}, site {site.id})")
            for site, _ in request.sites}


class VariantPolicy:
    """One variant config at every site that does not refuse it, calibrated on the call's inputs —
    or, with `calibration` (attnopt.calibration.Calibrator), fitted on its batches, with the error
    measured on its held-out batches.

    With `keep_slower` (`rewrite(model, variant)` with no parameters: the variant's default
    config), a site where the built config is predicted no faster than the site's own softmax is
    kept, with the prediction as its reason: a default that makes the model slower is no default
    to apply. Parameters given by the caller are applied wherever the variant can run."""

    per_instance = True

    def __init__(self, config: Any, device: Any = None, calibration: Calibrator | None = None,
                 keep_slower: bool = False):
        self.config = config
        self.device = device
        self.calibration = calibration
        self.keep_slower = keep_slower
        self.name = f"rewrite {type(config).__name__}"

    def choose(self, request: GraphRequest) -> Choices:
        analysis = request.analyse()
        profile = _profile(self.device, analysis)
        calibration = _site_calibration(self.calibration, request)
        choices = {}
        for site, _ in request.sites:
            capture = analysis.captures.get(site.id)
            if capture is None:
                continue
            info = analysis.facts[site.id]
            base = baseline(info, profile)
            evaluated = evaluate(self.config, info, capture, profile, calibration=calibration.pop(site.id, None))
            rows = [base.row, evaluated.row]
            if evaluated.module is None:
                choices[site.id] = Choice(_decision(base, base, rows, f"kept: {evaluated.row['refused']}"), None)
            elif self.keep_slower and evaluated.candidate.est_seconds >= base.candidate.est_seconds:
                choices[site.id] = Choice(_decision(base, base, rows, (
                    f"kept: its default config is predicted no faster than softmax here "
                    f"({evaluated.candidate.est_seconds * 1e3:.3g} ms against {base.candidate.est_seconds * 1e3:.3g} ms "
                    f"at N={info.N}); give the variant's parameters to rewrite it anyway.")), None)
            else:
                choices[site.id] = Choice(_decision(evaluated, base, rows, "requested"), evaluated.module)
        return Choices(choices, GraphPlan(request.graph, request.signature, self.name, None, None), analysis.facts)


class _Option(NamedTuple):
    """One alternative at a site as this round plans with it: its (shared, read-only) evaluation,
    and its planner entry and report row for this round (output gains may weigh or drop them)."""

    evaluated: Evaluated
    candidate: Candidate | None
    row: dict[str, Any]


class BudgetPolicy:
    """Plan every site of the graph under a Budget (see attnopt.planner for the method).

    With `calibration` (attnopt.calibration.Calibrator), candidates are fitted on its batches and
    their errors measured on its held-out batches, and the default candidates include the
    configs only calibration makes worth trying.

    With `evaluations` (an `EvaluationCache` shared by the planning rounds of one optimize call),
    a site whose evaluation an earlier round made for the same site and capture is planned from
    it, without building and measuring its candidates again."""

    name = "budget"
    per_instance = True

    def __init__(self, budget: Budget | float, candidates: Sequence[Any] | None = None, *, strict: bool = False,
                 device: Any = None, calibration: Calibrator | None = None, output_gains: bool = False,
                 evaluations: EvaluationCache | None = None):
        self.budget = Budget.of(budget)
        self.candidates = candidates
        self.strict = strict
        self.device = device
        self.calibration = calibration
        self.output_gains = output_gains
        self.evaluations = evaluations

    def choose(self, request: GraphRequest) -> Choices:
        analysis = request.analyse()
        profile = _profile(self.device, analysis)
        cache = self.evaluations if self.evaluations is not None and self.evaluations.serves(self) else None
        calibration_keys = site_keys(request) if cache is not None and self.calibration is not None else {}
        evaluations: dict[int, Evaluations] = {}
        keys: dict[int, tuple | None] = {}
        calibration = _site_calibration(self.calibration, request)
        progress = tqdm(request.sites, desc=f"attnopt: pricing and measuring candidates (graph {request.graph})",
                        unit="site", disable=None, leave=False)  # shown on a terminal only
        for site, _ in progress:
            capture = analysis.captures.get(site.id)
            if capture is None:
                continue
            info = analysis.facts[site.id]
            # one site's calibration captures at a time: popped, so they are freed once it is evaluated
            data = calibration.pop(site.id, None)

            def evaluate(info: SiteInfo = info, capture: SiteCapture = capture, data: Any = data) -> Evaluations:
                return evaluate_site(info, capture, self.candidates, profile, data)

            if cache is None:
                evaluations[site.id] = evaluate()
                continue
            keys[site.id] = hashable((request.graph, request.signature, site.id, site.module, site.source,
                                       site.form, info, capture_digest(capture), calibration_keys.get(site.id)))
            evaluations[site.id] = cache.evaluations(keys[site.id], evaluate)
        options = {site_id: [_Option(ev, ev.candidate, ev.row) for ev in alternatives]
                   for site_id, (_, alternatives) in evaluations.items()}
        gains = self._weigh(request, analysis, evaluations, options, cache, keys)
        # FlopCounterMode counted each site as the exact op, whose FLOPs the baseline's formula equals
        other_flops = max(0, analysis.total_flops - sum(base.candidate.flops for base, _ in evaluations.values()))
        other_seconds = costmodel.roofline_seconds(other_flops, device=profile)
        entries = [SiteCandidates(site_id, base.candidate, [option.candidate for option in options[site_id]
                                                            if option.candidate])
                   for site_id, (base, _) in evaluations.items()]
        result = plan(entries, self.budget, other_seconds=other_seconds, other_flops=other_flops, strict=self.strict)
        choices = {}
        for site_id, (base, _) in evaluations.items():
            rows = [base.row] + [option.row for option in options[site_id]]
            pick = result.choices[site_id]
            if pick is base.candidate:
                reason = self._kept_reason(base, options[site_id], result.budget_met)
                choices[site_id] = Choice(_decision(base, base, rows, reason), None)
                continue
            option = next(option for option in options[site_id] if option.candidate is pick)
            reason = ("the least-error plan meeting the budget" if result.budget_met
                      else "the fastest plan (the budget cannot be met)")
            # (a weighed candidate differs from its evaluation's in `objective` only, which no decision shows)
            choices[site_id] = Choice(_decision(option.evaluated, base, rows, reason), option.evaluated.built())
        for site_id, gain in gains.items():
            choices[site_id].decision.output_gain = gain
        return Choices(choices, GraphPlan(
            request.graph, request.signature, self.name, _describe(self.budget), result.budget_met,
            seconds_before=result.seconds_before, seconds_after=result.seconds_after,
            flops_before=result.flops_before, flops_after=result.flops_after, total_error=result.total_error,
            predicted_output_error=result.weighed_error if gains else None),
            analysis.facts)

    def _weigh(self, request: GraphRequest, analysis: Analysis, evaluations: dict[int, Evaluations],
               options: dict[int, list[_Option]], cache: EvaluationCache | None = None,
               keys: dict[int, tuple | None] | None = None) -> dict[int, float]:
        """Weigh each candidate's error by its site's output gain (attnopt.sensitivity), so the plan
        minimises the estimated error of the graph's output; site id → gain. The weighed candidates
        (and the rows of dropped ones) replace this round's `options`; the evaluations are not changed.

        The probe at a site is its least-error candidate predicted faster than softmax. Not measured
        when not asked for (`output_gains`: one more run of the graph per site, ~10 forwards of
        all-MiniLM-L6-v2's planning for a plan no better there: bench/RESULTS.md) or when it cannot
        change the plan: fewer than two sites with such a candidate, or a budget with neither time
        nor flops (the fastest plan within max_error is taken). A site whose
        probe makes the graph's output non-finite keeps softmax: its alternatives are dropped."""
        if not self.output_gains:
            return {}
        probes: dict[int, Evaluated] = {}
        for site_id, (base, alternatives) in evaluations.items():
            faster = [ev for ev in alternatives if ev.candidate is not None
                      and ev.candidate.est_seconds < base.candidate.est_seconds]
            if faster:
                probes[site_id] = min(faster, key=lambda ev: ev.candidate.error)
        if len(probes) < 2 or (self.budget.time is None and self.budget.flops is None):
            return {}

        def measure() -> dict[int, float]:
            outputs = {}
            for site_id, probe in probes.items():
                capture = analysis.captures[site_id]
                with torch.no_grad():
                    outputs[site_id] = probe.built()(capture.q, capture.k, capture.v, mask=capture.mask,
                                                    scale=capture.scale, causal=capture.causal,
                                                    dropout_p=capture.dropout_p)
            return output_gains(request, analysis, outputs)

        if cache is None:
            gains = measure()
        else:
            site_keys_ = tuple((site_id, (keys or {}).get(site_id)) for site_id in evaluations)
            whole = None if any(key is None for _, key in site_keys_) else hashable(
                (request.graph, request.signature, request.canonical.code, site_keys_,
                 outputs_digest(analysis.outputs)))
            gains = cache.gains(whole, measure)
        for site_id, gain in gains.items():
            weighed = []
            for option in options[site_id]:
                if option.candidate is None:
                    weighed.append(option)
                elif math.isfinite(gain):
                    weighed.append(option._replace(
                        candidate=dataclasses.replace(option.candidate, objective=gain * option.candidate.error)))
                else:
                    weighed.append(_Option(option.evaluated, None, dict(option.row.items()) | {"refused": (
                        "rewriting this site by its best candidate made the graph's output non-finite "
                        "(attnopt.sensitivity).")}))
            options[site_id] = weighed
        return gains

    def _kept_reason(self, base: Evaluated, options: list[_Option], budget_met: bool) -> str:
        faster = [option.candidate for option in options
                  if option.candidate is not None and option.candidate.est_seconds < base.candidate.est_seconds]
        if self.budget.max_error is not None:
            faster = [candidate for candidate in faster if candidate.error <= self.budget.max_error]
        if not faster:
            return "kept: no candidate is predicted faster than softmax here" + (
                f" within max_error={self.budget.max_error:g}" if self.budget.max_error is not None else "") + "."
        return "kept: the budget is met at less error without rewriting this site." if budget_met else (
            "kept: rewriting it would not bring the plan closer to the budget.")


def _describe(budget: Budget) -> str:
    return ", ".join(f"{name}={getattr(budget, name):g}" for name in ("time", "flops", "max_error", "loop_error")
                     if getattr(budget, name) is not None)


__all__ = ["BudgetPolicy", "Choice", "Choices", "ExactPolicy", "GraphRequest", "Policy", "VariantPolicy"]
