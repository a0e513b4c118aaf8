"""Output gains (attnopt.sensitivity): the plan weighs each site's error by how far it moves the output.

Two attention blocks whose outputs reach the model's output with very different weights: an
error at the damped block barely shows. With a budget that pays for one rewrite only, the plan
must spend it where the output does not see it, even where that site's own error is larger.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.costmodel import DeviceProfile
from attnopt.planner import Candidate, SiteCandidates, plan
from attnopt.sensitivity import PerturbedAttention, graph_output_error
from attnopt.variants import AgentConfig

PROFILE = DeviceProfile(name="test CPU", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=2e-6)
ONE = [AgentConfig(agent_count=16, selection="pool")]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, weight: float, sharpness: float):
        super().__init__()
        self.qkv, self.heads, self.weight, self.sharpness = nn.Linear(dim, 3 * dim), heads, weight, sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q * self.sharpness, k, v)
        return x + self.weight * out.transpose(1, 2).reshape(batch, n, dim)


class TwoBlocks(nn.Module):
    """Block 0 is sharper (larger site error for a reduced variant) but damped by 1e-3 on its way
    to the output; block 1 is smoother and reaches the output at full weight."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, 1e-3, 3.0), Block(dim, heads, 1.0, 1.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture(scope="module")
def planned():
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.randn(2, 512, 32)
    # the budget: FLOPs of one site rewritten, not both (each site is most of the model's FLOPs)
    fast = attnopt.optimize(model, attnopt.Budget(flops=0.75), args=(x,), candidates=ONE, device=PROFILE,
                            output_gains=True)
    return model, x, fast, attnopt.report_of(fast)


def test_the_damped_site_has_the_smaller_gain_and_the_plan_rewrites_it(planned):
    model, x, fast, report = planned
    damped, direct = report.sites
    assert damped.decision.output_gain is not None and direct.decision.output_gain is not None
    assert damped.decision.output_gain < 0.01 * direct.decision.output_gain
    # rewritten where it does not show, although that site's own error is the larger one
    agent_error = {site.id: next(row["error"] for row in site.decision.candidates if row["variant"] == "agent")
                   for site in report.sites}
    assert agent_error[damped.id] > agent_error[direct.id]
    assert damped.decision.variant == "agent" and direct.decision.kept
    assert report.budget_met is True


def test_the_plan_predicts_its_output_error_and_the_check_measures_it(planned):
    model, x, fast, report = planned
    (graph_plan,) = report.plans
    assert graph_plan.predicted_output_error is not None and graph_plan.output_error is not None
    # one site rewritten: the first-order prediction is the measured error, up to the difference
    # between the probe and the site's module (the same module here) and second-order terms
    assert graph_plan.predicted_output_error == pytest.approx(graph_plan.output_error, rel=0.05)
    with torch.no_grad():
        measured = ((fast(x) - model(x)).norm() / model(x).norm()).item()
    assert measured == pytest.approx(graph_plan.output_error, rel=1e-3)
    assert "predicted" in str(report)


def test_without_weighing_the_plan_would_rewrite_the_visible_site():
    """The same numbers the policy measured, planned by the plain sum of site errors: the other
    site wins, which is what the gains are for."""
    cheap = dict(est_seconds=1.0, flops=1.0)
    sites = [SiteCandidates("damped", Candidate(variant="softmax", est_seconds=2.0, flops=2.0, error=0.0),
                            [Candidate(variant="agent", error=0.3, objective=0.3 * 1e-3, **cheap)]),
             SiteCandidates("direct", Candidate(variant="softmax", est_seconds=2.0, flops=2.0, error=0.0),
                            [Candidate(variant="agent", error=0.2, objective=0.2 * 1.0, **cheap)])]
    weighed = plan(sites, attnopt.Budget(flops=0.75))
    assert weighed.choices["damped"].variant == "agent" and weighed.choices["direct"].variant == "softmax"
    assert weighed.weighed_error == pytest.approx(3e-4) and weighed.total_error == pytest.approx(0.3)
    plain = [SiteCandidates(s.site_id, s.baseline, [Candidate(variant="agent", error=c.error, **cheap)
                                                    for c in s.alternatives]) for s in sites]
    unweighed = plan(plain, attnopt.Budget(flops=0.75))
    assert unweighed.choices["direct"].variant == "agent" and unweighed.choices["damped"].variant == "softmax"


def test_gains_are_measured_only_when_asked_and_where_they_can_change_the_plan():
    torch.manual_seed(0)
    x = torch.randn(2, 512, 32)
    two = TwoBlocks().eval()
    report = attnopt.report_of(attnopt.optimize(two, attnopt.Budget(flops=0.75), args=(x,), candidates=ONE,
                                                device=PROFILE))
    assert all(site.decision.output_gain is None for site in report.sites)  # not asked: the plain sum
    assert report.plans[0].predicted_output_error is None
    one = nn.Sequential(Block(32, 2, 1.0, 1.0)).eval()
    report = attnopt.report_of(attnopt.optimize(one, attnopt.Budget(flops=0.75), args=(x,), candidates=ONE,
                                                device=PROFILE, output_gains=True))
    assert report.sites[0].decision.output_gain is None and report.plans[0].predicted_output_error is None
    report = attnopt.report_of(attnopt.optimize(two, attnopt.Budget(max_error=0.9), args=(x,),
                                                candidates=ONE, device=PROFILE, output_gains=True))
    assert all(site.decision.output_gain is None for site in report.sites)


def test_torch_compile_options_and_saved_files_carry_the_setting(planned):
    model, x, fast, report = planned
    compiled = torch.compile(model, backend="attnopt", options={"budget": attnopt.Budget(flops=0.75),
                                                                "candidates": ONE, "device": PROFILE,
                                                                "output_gains": True})
    with torch.no_grad():
        compiled(x)
    assert all(site.decision.output_gain is not None for site in attnopt.report_of(compiled).sites)
    from attnopt import persist
    from attnopt.policies import BudgetPolicy

    for asked in (True, False):
        saved = BudgetPolicy(attnopt.Budget(flops=0.75), ONE, output_gains=asked)
        assert persist._policy_from(persist._policy_record(saved), model, None).output_gains is asked
    record = persist._policy_record(BudgetPolicy(0.5))
    del record["output_gains"]  # a file written before the setting existed
    assert persist._policy_from(record, model, None).output_gains is False


def test_a_perturbed_site_adds_exactly_its_error_and_outputs_compare_like_the_end_to_end_check():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 8, 4).unbind(0)
    delta = torch.randn(1, 2, 8, 4)
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(PerturbedAttention(delta)(q, k, v, scale=0.5), exact + delta, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        PerturbedAttention(delta[:, :1])(q, k, v, scale=0.5)
    reference = [torch.ones(4), torch.arange(3)]
    assert graph_output_error([torch.full((4,), 1.1), torch.arange(3)], reference) == pytest.approx(0.1)
    assert math.isinf(graph_output_error([torch.tensor([1.0, math.nan, 1.0, 1.0]), torch.arange(3)], reference))
