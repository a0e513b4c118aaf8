"""Measured plans shared across the shapes of one size bucket (attnopt.backend.PLAN_SHARING): a
service that sees many batch sizes and lengths plans once per bucket, each new shape checked on
its first call against the original, and planned anew when the shared plan does worse there."""

from __future__ import annotations

import warnings

import torch

import attnopt
import attnopt.backend
from tests.test_optimize import FEW, PROFILE, make, relative

OPTIONS = {"budget": 0.5, "candidates": FEW, "device": PROFILE}


def serve(compiled, model, shapes) -> list[float]:
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnopt.BudgetNotMetWarning)
        for batch, length in shapes:
            x = torch.randn(batch, length, 32)
            errors.append(relative(compiled(x), model(x)))
    return errors


def served(shapes: list[tuple[int, int]]) -> tuple[attnopt.Report, list[float]]:
    """The seeded 512-token model compiled with attnopt's budget (dynamic shapes) and served
    `shapes` (batch, length) in order: its report, and each call's error against the original."""
    torch.manual_seed(0)
    model, _ = make(512)
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options=OPTIONS)
    errors = serve(compiled, model, shapes)
    return attnopt.report_of(compiled), errors


def test_shapes_of_one_bucket_share_the_plan_made_for_the_first():
    report, errors = served([(2, 480), (2, 300), (2, 500), (1, 400)])
    planned = list(report.plans)  # batch 1 is another bucket (and dynamo's own graph: size 1 is static)
    assert [plan.signature for plan in planned] == ["2x480x32", "1x400x32"], planned
    assert planned[0].shared_with == ["2x300x32", "2x500x32"]
    assert planned[0].output_error > 0 and report.rewritten
    for error in errors[1:3]:  # what the shared plan gives, measured again here
        assert error <= attnopt.backend.PLAN_SHARING * planned[0].output_error + 1e-6
    assert "also serves 2 other shape(s)" in str(report)


def test_another_batch_size_shares_the_plan_of_its_length_and_another_length_does_not():
    report, errors = served([(2, 480), (4, 480), (8, 300), (4, 200)])
    # batches 4 and 8 are other size buckets, of the same lengths' bucket: the plan made at 2x480,
    # checked again on each; 200 tokens is another length bucket: planned on its own
    assert [plan.signature for plan in report.plans] == ["2x480x32", "4x200x32"], report.plans
    assert report.plans[0].shared_with == ["4x480x32", "8x300x32"]
    for error in errors[1:3]:
        assert error <= attnopt.backend.PLAN_SHARING * report.plans[0].output_error + 1e-6


def test_exact_rewrites_share_one_analysis_across_batch_sizes_of_a_length():
    torch.manual_seed(0)
    model, _ = make(512)
    compiled = torch.compile(model, backend="attnopt", dynamic=True)
    with torch.no_grad():
        for batch, length in [(2, 480), (4, 480), (8, 300), (4, 200)]:
            x = torch.randn(batch, length, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    backend = attnopt.report_of(compiled)
    analysed = sorted({(site.graph, site.signature) for site in backend.sites})
    # 4x480 and 8x300 are checked on their first call and reuse 2x480's graph; 4x200 is another length
    assert [signature for _, signature in analysed] == ["2x480x32", "4x200x32"], analysed


def test_buckets_differing_in_the_batch_only_are_told_apart_from_others():
    from attnopt.backend import other_batch_of

    weight = ((32, 32), torch.float32, "cpu")
    two, eight = ((2, 512, 32), torch.float32, "cpu"), ((8, 512, 32), torch.float32, "cpu")
    assert other_batch_of((two, weight, 2), (eight, weight, 8)) == (2, 8)  # symbolic batch int too
    assert other_batch_of((two, weight), (two, weight)) is None  # the same bucket
    longer = ((2, 1024, 32), torch.float32, "cpu")
    assert other_batch_of((two,), (longer,)) is None  # another length
    mask_two, mask_four = ((2, 512), torch.bool, "cpu"), ((4, 512), torch.bool, "cpu")
    assert other_batch_of((two, mask_two), (eight, mask_four)) is None  # not one batch size
    assert other_batch_of((two, 512), (eight, 1024)) is None  # an int that is not the batch
    half = ((8, 512, 32), torch.float16, "cpu")
    assert other_batch_of((two,), (half,)) is None  # another dtype


def test_a_plan_that_does_worse_at_another_shape_is_not_shared(monkeypatch):
    monkeypatch.setattr(attnopt.backend, "PLAN_SHARING", 0.0)  # no approximate plan can pass
    report, _ = served([(2, 480), (2, 300)])
    assert [plan.signature for plan in report.plans] == ["2x480x32", "2x300x32"]
    assert all(not plan.shared_with for plan in report.plans)


def test_another_instance_never_takes_a_shared_plan():
    first, _ = make(512, seed=0)
    second, _ = make(512, seed=1)
    compiled = torch.compile(lambda model, x: model(x), backend="attnopt", dynamic=True, options=OPTIONS)
    serve(lambda x: compiled(first, x), first, [(2, 480)])
    serve(lambda x: compiled(second, x), second, [(2, 300)])  # same code and bucket, other weights
    report = attnopt.report_of(compiled)
    assert [plan.signature for plan in report.plans] == ["2x480x32", "2x300x32"]
    assert all(not plan.shared_with for plan in report.plans)
