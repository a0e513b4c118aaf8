"""attnopt.optimize end to end: plans per shape, decisions in the report, budgets and refusals.

Costs are priced with a fixed DeviceProfile so decisions do not depend on how loaded the test
machine is; errors are measured for real on each call's inputs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.api import AttnoptModule
from attnopt.backend import AttnoptBackend
from attnopt.costmodel import DeviceProfile
from attnopt.policies import BudgetPolicy, ExactPolicy, VariantPolicy
from attnopt.variants import AgentConfig, LinearConfig, MediatorConfig

PROFILE = DeviceProfile(name="test CPU", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=2e-6)
FEW = [AgentConfig(agent_fraction=0.1, selection="pool"), LinearConfig(feature_map="elu1"),
       MediatorConfig(n_mediators=16)]


class Block(nn.Module):
    """Self-attention with SDPA or written out with matmuls, optionally causal via a tril mask."""

    def __init__(self, dim: int, heads: int, form: str, causal: bool):
        super().__init__()
        self.qkv, self.proj, self.heads, self.form, self.causal = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, form, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if self.causal:
                keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~keep, float("-inf"))
            out = scores.softmax(-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class Net(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, forms=("sdpa", "matmul"), causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, form, causal) for form in forms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def make(n_tokens: int, seed: int = 0, **kwargs) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return Net(**kwargs).eval(), torch.randn(2, n_tokens, 32)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def planned():
    model, x = make(512)
    fast = attnopt.optimize(model, 0.5, args=(x,), candidates=FEW, device=PROFILE)
    return model, x, fast, attnopt.report_of(fast)


def test_an_attainable_budget_is_met_and_every_decision_is_audited(planned):
    model, x, fast, report = planned
    assert report.budget_met is True
    (graph_plan,) = report.plans
    assert graph_plan.seconds_after <= 0.5 * graph_plan.seconds_before
    assert len(report.sites) == 2 and len(report.rewritten) >= 1
    for site in report.sites:
        decision = site.decision
        assert decision is not None and decision.reason
        assert decision.flops_before > 0 and decision.est_seconds_before > 0
        whole = [row["variant"] for row in decision.candidates if "exact_heads" not in row["params"]]
        assert whole == ["softmax", "agent", "linear", "mediator"]
        # per-head alternatives follow: a variant on some heads, its worst heads kept exact
        assert all(row["variant"] in whole[1:] and row["params"]["exact_heads"]
                   for row in decision.candidates if "exact_heads" in row["params"])
        for row in decision.candidates[1:]:
            assert row["refused"] is None
            assert row["error"] >= 0 and row["est_seconds"] > 0
            assert row["pays_off_from_N"] is None or row["pays_off_from_N"] >= 1
        if decision.variant != "softmax":
            chosen = next(row for row in decision.candidates
                          if row["variant"] == decision.variant and row["params"] == decision.params)
            assert decision.error == chosen["error"] and decision.est_seconds_after < decision.est_seconds_before
    summary = str(report)
    assert "plan: graph 0 at 2x512x32" in summary and "met: True" in summary
    explained = report.explain(report.sites[0].id)
    assert "pays off from N" in explained and "mediator" in explained and "n_mediators=16" in explained
    assert "selection=pool" in explained and "kmeans_iterations" not in explained  # defaults are not shown


class RecordingPolicy:
    """Passes each request on to `policy` and keeps it."""

    def __init__(self, policy):
        self.policy, self.name, self.per_instance, self.requests = policy, policy.name, policy.per_instance, []

    def choose(self, request):
        self.requests.append(request)
        return self.policy.choose(request)


@pytest.mark.parametrize("policy", [BudgetPolicy(0.5, FEW, device=PROFILE), VariantPolicy(AgentConfig(selection="pool")),
                                    ExactPolicy()], ids=["budget", "variant", "exact"])
def test_a_policy_returns_its_choices_and_writes_nothing(policy):
    """The backend records decisions, modules and plans; choosing again changes no site and no plan."""
    model, x = make(256)
    recording = RecordingPolicy(policy)
    backend = AttnoptBackend(recording)
    with torch.no_grad():
        AttnoptModule(model, backend, None)(x)
    (request,) = recording.requests
    recorded = [site.decision for site, _ in request.sites]
    plans = list(backend.report.plans)
    choices = policy.choose(request)
    assert [site.decision for site, _ in request.sites] == recorded
    assert all(site.decision is decision for (site, _), decision in zip(request.sites, recorded))
    assert backend.report.plans == plans
    assert sorted(choices.sites) == [site.id for site, _ in request.sites]
    assert [(c.decision.variant, c.decision.params, c.decision.error) for c in choices.sites.values()] == [
        (d.variant, d.params, d.error) for d in recorded]
    assert all((choice.module is None) == choice.decision.kept for choice in choices.sites.values())
    assert set(choices.modules) == {site.id for site in backend.report.rewritten}
    assert (choices.plan is None) == isinstance(policy, ExactPolicy) and len(plans) == (choices.plan is not None)


def test_the_reported_output_error_is_what_the_user_gets(planned):
    model, x, fast, report = planned
    with torch.no_grad():
        error = relative(fast(x), model(x))
    assert error > 1e-4  # something was really rewritten
    assert error == pytest.approx(report.plans[0].output_error, rel=1e-4)


def test_a_new_input_shape_is_planned_for_that_shape(planned):
    model, x, fast, report = planned
    with torch.no_grad():
        fast(torch.randn(1, 256, 32))
    assert [plan.signature for plan in report.plans] == ["2x512x32", "1x256x32"]
    assert {site.shape["N"] for site in report.sites} == {512, 256}
    assert all(site.decision is not None for site in report.sites)


def test_planning_is_deterministic():
    decisions = []
    for _ in range(2):
        model, x = make(256, seed=3)
        report = attnopt.report_of(attnopt.optimize(model, 0.5, args=(x,), candidates=FEW, device=PROFILE))
        decisions.append([(s.decision.variant, s.decision.params, s.decision.error) for s in report.sites])
    assert decisions[0] == decisions[1]


def test_max_error_zero_changes_nothing():
    model, x = make(256)
    fast = attnopt.optimize(model, attnopt.Budget(max_error=0.0), args=(x,), candidates=FEW, device=PROFILE)
    with torch.no_grad():
        assert relative(fast(x), model(x)) < 1e-6
    assert all(site.decision.error == 0 for site in attnopt.report_of(fast).sites)


def test_max_error_bounds_every_site():
    model, x = make(512)
    fast = attnopt.optimize(model, attnopt.Budget(max_error=0.5), args=(x,), candidates=FEW, device=PROFILE)
    for site in attnopt.report_of(fast).sites:
        assert site.decision.error <= 0.5


def test_an_unattainable_budget_warns_and_strict_raises():
    model, x = make(256)
    with pytest.warns(attnopt.BudgetNotMetWarning):
        fast = attnopt.optimize(model, 0.001, args=(x,), candidates=FEW, device=PROFILE)
    assert attnopt.report_of(fast).budget_met is False
    with pytest.raises(attnopt.BudgetError):
        attnopt.optimize(model, 0.001, args=(x,), candidates=FEW, device=PROFILE, strict=True)


def test_short_sequences_stay_exact():
    """At 16 tokens no approximate variant is predicted faster than softmax, so none is chosen,
    whatever the budget. A site the model wrote as three kernels may take attnopt's exact op
    (one fused kernel: the same function, cheaper); a site that called SDPA keeps its own."""
    model, x = make(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnopt.BudgetNotMetWarning)
        fast = attnopt.optimize(model, 0.5, args=(x,), device=PROFILE)
    report = attnopt.report_of(fast)
    assert {s.decision.variant for s in report.sites} <= {"softmax", "exact"}
    assert all(s.decision.variant == "softmax" and "no candidate is predicted faster" in s.decision.reason
               for s in report.sites if s.form == "sdpa")
    assert all(s.decision.error == 0 for s in report.sites)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["sdpa", "matmul"])
def test_causal_sites_refuse_agents_and_keep_causality_in_linear_attention(form):
    model, x = make(128, forms=(form,), causal=True)
    fast = attnopt.rewrite(model, "agent", args=(x,))
    (site,) = attnopt.report_of(fast).sites
    assert site.decision.variant == "softmax" and "causal" in site.decision.reason
    # parameters given: applied wherever linear can run (the default config would be kept where this
    # machine's measured profile predicts it slower than softmax at N=128)
    linear = attnopt.rewrite(model, "linear", args=(x,), feature_map="elu1")
    (site,) = attnopt.report_of(linear).sites
    assert site.decision.variant == "linear"
    # a causal rewrite never lets a token see the future: changing the last token changes no earlier output
    changed = x.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        before, after = linear(x), linear(changed)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6)


def test_a_default_config_predicted_slower_than_softmax_is_kept_with_the_prediction_and_given_params_are_applied():
    """rewrite(model, variant) with the variant's default config keeps a site where the cost
    model predicts it no faster than the site's softmax (64 agents for 32 tokens); the same
    variant with parameters given is applied, as asked."""
    model, x = make(32, forms=("sdpa",))
    default = attnopt.rewrite(model, "agent", args=(x,))
    (site,) = attnopt.report_of(default).sites
    assert site.decision.variant == "softmax"
    assert "predicted no faster than softmax here" in site.decision.reason and "N=32" in site.decision.reason
    with torch.no_grad():
        torch.testing.assert_close(default(x), model(x), rtol=1e-5, atol=1e-6)
    asked = attnopt.rewrite(model, "agent", args=(x,), agent_count=8)
    (site,) = attnopt.report_of(asked).sites
    assert site.decision.variant == "agent" and site.decision.reason == "requested"


def test_rewrite_into_one_variant_reports_its_measured_error():
    model, x = make(256)
    fast = attnopt.rewrite(model, "agent", args=(x,), agent_fraction=0.25, selection="pool")
    report = attnopt.report_of(fast)
    assert [s.decision.variant for s in report.sites] == ["agent", "agent"]
    assert all(0 < s.decision.error < 1 and s.decision.params["agent_fraction"] == 0.25 for s in report.sites)
    assert report.plans[0].output_error > 0


def test_torch_compile_takes_a_budget():
    model, x = make(512)
    compiled = torch.compile(model, backend="attnopt",
                             options={"budget": 0.5, "candidates": FEW, "device": PROFILE})
    with torch.no_grad():
        out = compiled(x)
    report = attnopt.report_of(compiled)
    assert report.budget_met is True and len(report.rewritten) >= 1
    with torch.no_grad():
        assert relative(out, model(x)) == pytest.approx(report.plans[0].output_error, rel=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(budget="fast"), "budget must be a number"),
    (dict(budget=-1), "positive fraction"),
])
def test_bad_budgets_are_named(bad, message):
    model, x = make(16)
    with pytest.raises(attnopt.AttnoptError, match=message):
        attnopt.optimize(model, args=(x,), **bad)


def test_unknown_variants_and_bad_parameters_are_named():
    model, x = make(16)
    with pytest.raises(attnopt.AttnoptError, match="unknown variant"):
        attnopt.rewrite(model, "sparse", args=(x,))
    with pytest.raises(attnopt.AttnoptError, match="bad parameters for the agent variant"):
        attnopt.rewrite(model, "agent", args=(x,), agent_fraction=2.0)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="either a budget or a variant"):
        torch.compile(model, backend="attnopt", options={"budget": 0.5, "variant": "agent"})(x)


def test_a_diffusers_dit_follows_its_mediator_schedule_across_timesteps(monkeypatch):
    import diffusers

    from attnopt.variants.mediator import MediatorAttention

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, sample_size=16,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=32).eval()
    sample, labels = torch.randn(2, 4, 16, 16), torch.tensor([1, 2])
    schedule = attnopt.MediatorSchedule(((0, 16), (500, 4)))
    with torch.no_grad():  # the calls below run without grad too: no recompile, one call per site
        fast = attnopt.rewrite(model, "mediator", kwargs={"hidden_states": sample, "timestep": torch.tensor([10, 10]),
                                                            "class_labels": labels}, n_mediators=16, schedule=schedule)
    report = attnopt.report_of(fast)
    assert len(report.sites) == 2 and all(s.decision.variant == "mediator" for s in report.sites)

    counts = []
    tokens_for = MediatorAttention.tokens_for
    monkeypatch.setattr(MediatorAttention, "tokens_for", lambda self, count: counts.append(count) or tokens_for(self, count))
    outputs = {}
    with torch.no_grad():
        for step in (900, 100):
            counts.clear()
            outputs[step] = fast(hidden_states=sample, timestep=torch.tensor([step, step]), class_labels=labels).sample
            assert counts == [schedule.count_at(step)] * 2
        with attnopt.mediator_count(8):  # an explicit count wins over the schedule
            counts.clear()
            fast(hidden_states=sample, timestep=torch.tensor([900, 900]), class_labels=labels)
            assert counts == [8, 8]
    assert all(torch.isfinite(out).all() for out in outputs.values())
    with pytest.raises(ValueError, match="one timestep per call"):
        fast(hidden_states=sample, timestep=torch.tensor([900, 100]), class_labels=labels)


def test_vit_at_224_keeps_softmax_where_no_candidate_is_predicted_faster():
    """A transformers ViT at 224² (N=197) under a time budget: agent attention (local k-means
    selection) is predicted slower than SDPA at 197 tokens, so no site takes it, and the report says
    from which length each agent candidate would pay off."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=96, num_attention_heads=2, num_hidden_layers=2,
                       intermediate_size=192, attn_implementation="sdpa")
    model, pixels = ViTModel(config, add_pooling_layer=False).eval(), torch.randn(1, 3, 224, 224)
    agents = [AgentConfig(), AgentConfig(agent_fraction=0.1), AgentConfig(agent_fraction=0.1, infer_grid=True)]
    with pytest.warns(attnopt.BudgetNotMetWarning):
        fast = attnopt.optimize(model, 0.5, kwargs={"pixel_values": pixels}, candidates=agents, device=PROFILE)
    report = attnopt.report_of(fast)
    assert [site.shape["N"] for site in report.sites] == [197, 197]
    assert report.rewritten == [] and report.budget_met is False
    for site in report.sites:
        assert site.decision.variant == "softmax"
        for row in site.decision.candidates[1:]:
            assert row["est_seconds"] > site.decision.est_seconds_before
            assert row["pays_off_from_N"] is None or row["pays_off_from_N"] > 197
    with torch.no_grad():
        assert torch.equal(fast(pixel_values=pixels).last_hidden_state, model(pixel_values=pixels).last_hidden_state)
