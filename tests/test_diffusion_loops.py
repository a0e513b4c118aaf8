"""Loops over a model that take a timestep (diffusion samplers): one graph for every Python-int
timestep, and an error budget for the loop's final output (`Budget(loop_error=...)`, attnopt.loops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.costmodel import DeviceProfile
from attnopt.variants import AgentConfig, LinearConfig, MediatorConfig

PROFILE = DeviceProfile(name="test CPU", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=2e-6)
CANDIDATES = [AgentConfig(agent_count=16, selection="pool"), LinearConfig(feature_map="elu1"),
              MediatorConfig(n_mediators=16)]
DIM, HEADS, TOKENS, STEPS = 32, 2, 256, (900, 700, 500, 300, 100)


class Denoiser(nn.Module):
    """Two SDPA self-attention blocks conditioned on an integer timestep, like a tiny DiT."""

    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Embedding(1000, DIM)
        self.qkv = nn.ModuleList(nn.Linear(DIM, 3 * DIM) for _ in range(2))
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        h = x + self.time.weight[timestep]
        for qkv in self.qkv:
            q, k, v = qkv(h).view(x.shape[0], x.shape[1], 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
            h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return self.out(h)


def make() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Denoiser().eval()
    return model, torch.randn(1, TOKENS, DIM)


def sample(model: nn.Module) -> torch.Tensor:
    """A 5-step sampler: each step's output feeds the next, so per-call errors compound."""
    x = torch.randn(1, TOKENS, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in STEPS:
            x = x - 0.3 * model(x, timestep=t)
    return x


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_int_timesteps_share_one_graph_and_match_the_original():
    model, x = make()
    with torch.no_grad():
        exact = attnopt.rewrite(model, "exact", args=(x,), kwargs={"timestep": 999})
    assert torch.allclose(sample(exact), sample(model), rtol=1e-5, atol=1e-6)
    report = attnopt.report_of(exact)
    assert report.graphs == 1, report  # one graph for 999 and every step's timestep
    assert len(report.sites) == 2 and all(site.decision.variant == "exact" for site in report.sites)


def test_int_timesteps_passed_positionally_share_one_graph_too():
    model, x = make()
    with torch.no_grad():
        exact = attnopt.rewrite(model, "exact", args=(x, 999))
        for t in STEPS:
            assert torch.allclose(exact(x, t), model(x, t), rtol=1e-5, atol=1e-6)
    assert attnopt.report_of(exact).graphs == 1


def optimize_for(loop_error: float) -> attnopt.AttnoptModule:
    model, _ = make()
    return attnopt.optimize(model, attnopt.Budget(time=0.3, max_error=0.5, loop_error=loop_error), loop=sample,
                            candidates=CANDIDATES, device=PROFILE)


@pytest.mark.filterwarnings("ignore::attnopt.BudgetNotMetWarning")  # time=0.3 is out of reach by design
def test_a_loop_budget_is_measured_on_the_loops_final_output_and_met():
    model, _ = make()
    loose = optimize_for(1.0)
    first = attnopt.report_of(loose).loop
    assert first is not None and len(first.rounds) == 1 and first.rounds[0].rewritten_sites > 0
    assert first.error == pytest.approx(relative(sample(loose), sample(model)), rel=1e-4)
    assert first.error > 0.0

    budget = first.error / 2  # below what the one-round plan gives: attnopt must rewrite less
    tight = optimize_for(budget)
    check = attnopt.report_of(tight).loop
    assert check.met and check.error <= budget and len(check.rounds) > 1
    assert check.rounds[0].loop_error > budget  # round 1 missed it, a later round met it
    assert relative(sample(tight), sample(model)) <= budget  # what the user gets, measured again
    assert "end-of-loop error" in str(attnopt.report_of(tight))
    assert attnopt.report_of(tight).to_dict()["loop"]["error"] == check.error


def test_the_loop_runs_under_a_fixed_seed_and_leaves_the_callers_random_state():
    model, _ = make()
    calls = []

    def noisy(m: nn.Module) -> torch.Tensor:  # draws from the global generator, as many samplers do
        calls.append(1)
        with torch.no_grad():
            return m(torch.randn(1, TOKENS, DIM), timestep=500)

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    attnopt.optimize(model, attnopt.Budget(loop_error=1.0), loop=noisy, candidates=CANDIDATES, device=PROFILE)
    assert torch.equal(torch.random.get_rng_state(), state) and len(calls) >= 3


def test_a_loop_whose_output_changes_between_runs_is_refused():
    model, _ = make()
    counter = iter(range(100))

    def drifting(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(torch.randn(1, TOKENS, DIM, generator=torch.Generator().manual_seed(next(counter))), timestep=5)

    with pytest.raises(attnopt.AttnoptError, match="different outputs on two runs"):
        attnopt.optimize(model, attnopt.Budget(loop_error=0.1), loop=drifting, device=PROFILE)


def test_loop_budgets_without_a_loop_and_bad_loops_are_named():
    model, x = make()
    with pytest.raises(attnopt.AttnoptError, match="give the loop too"):
        attnopt.optimize(model, attnopt.Budget(loop_error=0.1), args=(x, 5))
    with pytest.raises(attnopt.AttnoptError, match="no loop_error"):
        attnopt.optimize(model, attnopt.Budget(time=0.5), loop=sample)
    with pytest.raises(attnopt.AttnoptError, match="must be a callable"):
        attnopt.optimize(model, attnopt.Budget(loop_error=0.1), loop=5)
    with pytest.raises(attnopt.AttnoptError, match="no tensor in it"):
        attnopt.optimize(model, attnopt.Budget(loop_error=0.1), loop=lambda m: None)
    with pytest.raises(ValueError, match="loop_error must be"):
        attnopt.Budget(loop_error=float("nan"))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="needs the loop it bounds"):
        torch.compile(model, backend="attnopt", options={"budget": attnopt.Budget(loop_error=0.1)})(x, 5)


def test_a_loop_budget_below_the_exact_rounding_warns_with_every_softmax_kept():
    model, _ = make()
    with pytest.warns(attnopt.BudgetNotMetWarning, match="loop's budget is not met|the budget"):
        fast = attnopt.optimize(model, attnopt.Budget(time=0.3, loop_error=0.0), loop=sample,
                                candidates=CANDIDATES, device=PROFILE)
    check = attnopt.report_of(fast).loop
    assert check.rounds[-1].rewritten_sites == 0 or check.met
    with pytest.raises(attnopt.BudgetError):
        attnopt.optimize(model, attnopt.Budget(time=0.3, loop_error=0.0), loop=sample, candidates=CANDIDATES,
                         device=PROFILE, strict=True)
