"""The soundness properties. Each test draws its cases with hypothesis, records every outcome
(harness.TALLY, summarised at the end of the session) and fails at the end if any case failed:
a silent wrong result, a near-miss rewritten, an attention not reported, or a crash.

Cases are not shrunk and the test does not stop at the first failure: every distinct failure is
listed, each with a standalone reproducer (its program's source and the inputs that broke it)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, reject, settings

from .harness import TALLY, CaseResult, Invalid, record, run_case, run_instances_case
from .strategies import specs

pytestmark = pytest.mark.slow  # about two minutes: hundreds of generated programs

# Share of the profile's max_examples each test draws.
WEIGHTS = {"programs": 1.0, "near-misses": 0.3, "gradients": 0.15, "instances": 0.2}


def run_cases(profile: settings, name: str, strategy, body) -> None:
    failures: list[CaseResult] = []
    examples = max(1, round(profile.max_examples * WEIGHTS[name]))

    @settings(profile, max_examples=examples)
    @given(strategy)
    def cases(spec):
        try:
            results = body(spec)
        except Invalid:
            TALLY.invalid[name] += 1
            reject()
        for result in results:
            record(result)
            if result.failed:
                failures.append(result)

    cases()
    if failures:
        groups: dict[tuple, list[CaseResult]] = {}
        for failure in failures:
            groups.setdefault(failure.category(), []).append(failure)
        lines = [f"{len(failures)} failing case(s) in {len(groups)} group(s):"]
        for key, members in groups.items():
            lines.append(f"  [{len(members)}] {' | '.join(key)}")
        first = min(next(iter(groups.values())), key=lambda c: len(c.repro))
        lines += ["", f"first group, smallest case: {first.check}: {first.detail}", f"spec: {first.spec.describe()}",
                  first.sites, "", first.repro]
        raise AssertionError("\n".join(lines))


def test_attention_programs_are_rewritten_exactly_or_refused(profile):
    """Every spelling of softmax attention: rewritten and equal on fresh inputs, or refused."""
    run_cases(profile, "programs", specs(), lambda spec: [run_case(spec, "programs")])


def test_near_misses_are_refused_or_left_alone(profile):
    """Softmax over the wrong dim, weights used elsewhere or edited, scales that vary over queries
    or keys, fills that are no mask values: never rewritten."""
    run_cases(profile, "near-misses", specs(near_miss=True), lambda spec: [run_case(spec, "near-misses")])


def test_gradients_of_rewritten_programs_match(profile):
    """fp32 programs whose first-order gradients (q, k, v, parameters) are compared on fresh inputs."""
    strategy = specs().map(lambda s: dataclasses.replace(s, dtype="float32", upcast=False, grad_check=True))
    run_cases(profile, "gradients", strategy, lambda spec: [run_case(spec, "gradients")])


def test_instances_with_different_state_each_equal_their_original(profile):
    """Two instances of one class, different buffers/parameters: rewritten separately, and each
    compiled with torch.compile(backend="attnopt"), each equals its own original."""
    run_cases(profile, "instances", specs(stateful=True), run_instances_case)
