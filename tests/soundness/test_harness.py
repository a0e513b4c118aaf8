"""The suite's own machinery: the comparison oracle, the generator's programs, and that a planted
wrong rewrite is caught (so a green run means something). Fast and deterministic; not counted in
the outcome table."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn as nn

import attnopt

from . import harness
from . import values as V
from .oracle import TOLERANCE, compare, compare_tensor
from .programs import Spec, render


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_equal_outputs_and_shared_nans_are_equal():
    assert compare(t(1.0, math.nan, -math.inf), t(1.0, math.nan, -math.inf)) is None
    assert compare((t(1.0), [t(2.0)]), (t(1.0), [t(2.0)])) is None


@pytest.mark.parametrize("actual, expected, kind", [
    (t(1.0, math.nan), t(1.0, 2.0), "nan-where-finite"),
    (t(1.0, 2.0), t(1.0, math.nan), "finite-where-nan"),
    (t(1.0, math.inf), t(1.0, 2.0), "inf-where-finite"),
    (t(1.0, -math.inf), t(1.0, math.inf), "inf-where-finite"),
    (t(1.0, 2.0), t(1.0, -math.inf), "finite-where-inf"),
    (t(1.0, 2.0), t(1.0, 2.1), "values"),
])
def test_differences_are_named(actual, expected, kind):
    mismatch = compare_tensor(actual, expected)
    assert mismatch is not None and mismatch.kind == kind


def test_structure_and_dtype_must_match():
    assert compare((t(1.0),), t(1.0)).kind == "structure"
    assert compare(t(1.0, dtype=torch.float16), t(1.0)).kind == "structure"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tolerance_is_relative_l2_per_dtype(dtype):
    expected = torch.ones(100, dtype=dtype)
    tol = TOLERANCE[dtype]
    assert compare_tensor(expected * (1 + tol / 4), expected) is None
    assert compare_tensor(expected * (1 + 4 * tol), expected) is not None


def test_rounding_allowance_needs_an_inaccurate_original():
    exact = torch.linspace(1, 2, 50, dtype=torch.float64)
    original = (exact * (1 + 1e-4)).float()  # the original is itself 1e-4 off
    rewritten = (exact * (1 - 1e-4)).float()  # as far off, the other way
    wrong = (exact * 1.01).float()
    assert compare(rewritten, original) is not None
    assert compare(rewritten, original, reference=lambda: exact) is None
    assert compare(wrong, original, reference=lambda: exact) is not None
    assert compare(rewritten, exact.float(), reference=lambda: exact) is not None  # accurate original: no allowance


@pytest.mark.parametrize("spec", [
    Spec(),
    Spec(family="bmm", mask="fill_", fill="input", fill_value=-1e4, scale="input", polarity="keep-int"),
    Spec(family="baddbmm", mask="baddbmm-input", scale="alpha", mask_shape="full", cross=True),
    Spec(family="einsum", mask="where", fill="zeros_like", mask_source="buffer", polarity="drop"),
    Spec(family="torch.matmul", mask="hf-extended", fill="finfo.min", scale="head-temp", dtype="bfloat16", upcast=True),
    Spec(family="sdpa", mask="bool", polarity="drop", scale="kwarg", dtype="float16"),
    Spec(family="mha", mask="kpm+am", mha_self=True, batch_first=False),
])
def test_generated_programs_run(spec):
    program = render(spec)
    model = harness._build(program, harness.load(program), V.state_values(program, 0, 0), 0)
    for regime in ("all-keep", "some", "rows", "mixed", "partial"):
        out = harness.run(model, V.tensors(V.input_values(program, regime, 3, example=regime != "mixed")), False)
        assert harness.tensors_of(out)


def test_reproducer_is_a_standalone_script():
    spec = Spec(mask="fill", fill="-1e9", example_mask="all-keep", scale="mul")
    program = render(spec)
    state = V.state_values(program, 0, 0)
    example = V.input_values(program, "all-keep", 1, example=True)
    fresh = V.input_values(program, "mixed", 2, example=False)
    script = harness.repro_script(program, state, example, fresh, example_grad=True, check_grad=False, seed=0)
    compile(script, "<repro>", "exec")
    namespace: dict = {}
    exec(compile(script.split("torch.manual_seed(")[0], "<repro>", "exec"), namespace)
    assert all(torch.equal(a, b.tensor) for a, b in zip(namespace["fresh"], fresh))


class _IgnoresMask(nn.Module):
    """A planted wrong rewrite: runs the model with every key kept."""

    def __init__(self, model: nn.Module, slot: int):
        super().__init__()
        self.model, self.slot = model, slot

    def forward(self, *args):
        args = list(args)
        args[self.slot] = torch.ones_like(args[self.slot])
        return self.model(*args)


def _fake_report(variant: str | None, reason: str | None = None):
    site = types.SimpleNamespace(id=0, form="matmul", mask="boolean", scale=1.0, rewritable=reason is None,
                                 reason=reason, decision=types.SimpleNamespace(variant=variant) if variant else None)
    return types.SimpleNamespace(sites=[site])


def test_a_planted_wrong_rewrite_is_a_silent_wrong_result(monkeypatch):
    spec = Spec(mask="fill", fill="-inf", example_mask="all-keep")
    monkeypatch.setattr(attnopt, "rewrite", lambda model, variant, args: _IgnoresMask(model, 3))
    monkeypatch.setattr(attnopt, "report_of", lambda module: _fake_report("exact"))
    result = harness.run_case(spec)
    assert result.outcome == "silent-wrong", result
    assert "fresh input" in result.check and result.repro


@pytest.mark.parametrize("report, near_miss, outcome", [
    (_fake_report("exact"), False, "rewritten-equal"),
    (_fake_report(None, "a reason"), False, "refused"),
    (_fake_report(None, None), False, "unreported"),
    (types.SimpleNamespace(sites=[]), False, "unreported"),
    (_fake_report("exact"), True, "near-miss-rewritten"),
    (types.SimpleNamespace(sites=[]), True, "left-alone"),
])
def test_outcomes_of_a_faithful_rewrite(monkeypatch, report, near_miss, outcome):
    spec = Spec(mask="fill", softmax_dim="-2" if near_miss else "-1")
    monkeypatch.setattr(attnopt, "rewrite", lambda model, variant, args: model)
    monkeypatch.setattr(attnopt, "report_of", lambda module: report)
    assert harness.run_case(spec).outcome == outcome
