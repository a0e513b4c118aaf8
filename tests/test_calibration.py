"""Calibration (attnopt.calibration): site modules fitted on calibration batches, errors measured on
held-out batches, the original model untouched, everything deterministic under a seed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.analysis import SiteCapture
from attnopt.backend import AttnoptError
from attnopt.calibration import (
    Calibration,
    Calibrator,
    held_out_error,
    held_out_indices,
    materialise,
)
from attnopt.costmodel import DeviceProfile
from attnopt.variants import HybridConfig, LinearConfig, build_site_module
from tests.variants.support import make_site, tensors

PROFILE = DeviceProfile(name="test CPU", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=2e-6)
DIM, HEADS, TOKENS = 32, 2, 48


class SharpBlock(nn.Module):
    """SDPA self-attention whose q/k projections are scaled up: peaked, far from uniform attention."""

    def __init__(self, sharp: float = 3.0, graph_break: bool = True):
        super().__init__()
        self.qkv, self.proj, self.graph_break = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM), graph_break
        with torch.no_grad():
            self.qkv.weight[: 2 * DIM] *= sharp

    def qkv_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, n, _ = x.shape
        return self.qkv(x).view(batch, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_of(x)
        out = F.scaled_dot_product_attention(q, k, v)
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.proj(out.transpose(1, 2).reshape(x.shape))


class TwoBlocks(nn.Module):
    """Two attention blocks of one class (dynamo runs both through one graph) with a graph break each."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SharpBlock(), SharpBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def make_model(seed: int = 0) -> TwoBlocks:
    torch.manual_seed(seed)
    return TwoBlocks().eval()


def make_batches(n: int = 8, seed: int = 1, batch: int = 2) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, TOKENS, DIM, generator=generator),) for _ in range(n)]


EXAMPLE = (torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(123)),)


def decided(module) -> list:
    return [site for site in attnopt.report_of(module).sites if site.decision is not None]


def site_module(rewritten, site) -> nn.Module:
    return rewritten._attnopt_backend._chosen[site.id]


@pytest.fixture(scope="module")
def learned_runs():
    model = make_model()
    batches = make_batches()
    before = attnopt.rewrite(model, "linear", args=EXAMPLE, feature_map="learned",
                             calibration=Calibration(batches, steps=0))
    after = attnopt.rewrite(model, "linear", args=EXAMPLE, feature_map="learned",
                            calibration=Calibration(batches, steps=150))
    return model, batches, before, after


def test_calibration_lowers_the_held_out_error_of_every_site(learned_runs):
    _, _, before, after = learned_runs
    sites_before, sites_after = decided(before), decided(after)
    assert len(sites_after) == 2  # both blocks, each its own site despite sharing one graph
    for untrained, trained in zip(sites_before, sites_after):
        assert trained.decision.variant == "linear"
        assert trained.decision.error < untrained.decision.error - 0.02, (untrained.decision.error,
                                                                          trained.decision.error)


def test_step_zero_is_the_training_free_map(learned_runs):
    model, batches, before, _ = learned_runs
    elu = attnopt.rewrite(model, "linear", args=EXAMPLE, feature_map="elu1", calibration=batches)
    for learned, fixed in zip(decided(before), decided(elu)):
        assert learned.decision.error == pytest.approx(fixed.decision.error, rel=1e-5, abs=1e-7)
    # and module to module, on a random site
    site = make_site(B=2, H=4, Hkv=2, N=32, M=32, d=8, e=8)
    q, k, v = tensors(site, seed=3)
    learned = build_site_module(LinearConfig(feature_map="learned"), site)
    fixed = build_site_module(LinearConfig(feature_map="elu1"), site)
    with torch.no_grad():
        torch.testing.assert_close(learned(q, k, v, scale=0.3), fixed(q, k, v, scale=0.3), rtol=1e-6, atol=1e-6)


def test_the_reported_error_is_measured_on_the_held_out_batches(learned_runs):
    model, batches, _, after = learned_runs
    site = decided(after)[0]  # block 0: its inputs are the batches themselves
    module = site_module(after, site)
    block = model.blocks[0]
    held = held_out_indices(len(batches), 4)
    assert held == [3, 7]

    def captures(indices):
        result = []
        with torch.no_grad():
            for i in indices:
                q, k, v = block.qkv_of(batches[i][0])
                out = F.scaled_dot_product_attention(q, k, v)
                result.append(SiteCapture(q, k, v, None, 1 / math.sqrt(q.shape[-1]), False, 0.0, out))
        return result

    assert site.decision.error == pytest.approx(held_out_error(module, captures(held)), rel=1e-5)
    trained_on = [i for i in range(len(batches)) if i not in held]
    assert held_out_error(module, captures(trained_on)) != pytest.approx(site.decision.error, rel=1e-3)


def test_held_out_batches_are_never_fitted_on():
    model, batches = make_model(), make_batches()
    other = list(batches)
    for i in (3, 7):  # other held-out batches, same training batches
        other[i] = (3 * batches[i][0].flip(1),)
    first = attnopt.rewrite(model, "linear", args=EXAMPLE, feature_map="learned", calibration=Calibration(batches, steps=20))
    second = attnopt.rewrite(model, "linear", args=EXAMPLE, feature_map="learned", calibration=Calibration(other, steps=20))
    for a, b in zip(decided(first), decided(second)):
        for pa, pb in zip(site_module(first, a).parameters(), site_module(second, b).parameters()):
            assert torch.equal(pa, pb)  # fitted on the same batches: the same parameters
        assert a.decision.error != pytest.approx(b.decision.error, rel=1e-3)  # measured on other batches


def test_held_out_rule():
    assert held_out_indices(8, 4) == [3, 7]
    assert held_out_indices(9, 4) == [3, 7]
    assert held_out_indices(3, 4) == [2]  # fewer than 4: the last one
    assert held_out_indices(2, 4) == [1]
    assert held_out_indices(6, 2) == [1, 3, 5]


def test_deterministic_under_a_seed_and_the_user_rng_untouched():
    model, batches = make_model(), make_batches(n=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        state = torch.get_rng_state()
        rewritten = attnopt.rewrite(model, "mediator", args=EXAMPLE, n_mediators=8,
                                    calibration=Calibration(batches, steps=15, seed=3))
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(rewritten)
    for a, b in zip(decided(runs[0]), decided(runs[1])):
        assert a.decision.error == b.decision.error
        for pa, pb in zip(site_module(runs[0], a).parameters(), site_module(runs[1], b).parameters()):
            assert torch.equal(pa, pb)
    other_seed = attnopt.rewrite(model, "mediator", args=EXAMPLE, n_mediators=8,
                                 calibration=Calibration(batches, steps=15, seed=4))
    assert any(not torch.equal(pa, pb) for pa, pb in zip(runs[0].parameters(), other_seed.parameters()))


def test_the_original_model_is_unchanged_and_calibrated_parameters_are_the_modules():
    model, batches = make_model(), make_batches(n=4)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rewritten = attnopt.rewrite(model, "linear", args=EXAMPLE, feature_map="learned",
                                calibration=Calibration(batches, steps=30))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype, name
    names = dict(rewritten.named_parameters())
    model_names = {name for name, _ in model.named_parameters()}
    site_params = {name: p for name, p in names.items() if ".attnopt_sites." in f".{name}"}
    assert len(site_params) == 4  # W and b of each of the two sites' feature maps
    for site in decided(rewritten):
        for parameter in site_module(rewritten, site).parameters():
            assert isinstance(parameter, nn.Parameter)
            assert any(parameter is p for p in rewritten.parameters())
        weight = site_module(rewritten, site).feature_module.weight
        assert not torch.equal(weight, torch.eye(weight.shape[-1]).expand_as(weight))  # it was fitted
    assert {f"model.{name}" for name in model_names} <= set(names)
    # the state dict is the model's, with its own keys, and the sites' calibrated parameters
    assert set(rewritten.state_dict()) == set(model.state_dict()) | set(site_params)


def test_buffers_changed_by_a_recording_run_are_restored():
    model = nn.Sequential(nn.BatchNorm1d(TOKENS), SharpBlock(graph_break=False)).train()
    calibrator = Calibrator(model, make_batches(n=2))
    before = {name: b.clone() for name, b in model.named_buffers()}
    calibrator._run_all(None)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize("calibration, message", [
    ([], "empty"),
    (iter(()), "empty"),
    ([(torch.randn(2, TOKENS, DIM),)], "at least two"),
    ([3, 4], "tuple or list"),
    ([(torch.randn(2, TOKENS, DIM),), {"x": torch.randn(2, TOKENS, DIM)}], "another structure"),
    (torch.randn(2, TOKENS, DIM), "iterable of batches"),
])
def test_bad_calibration_data_is_a_clear_error(calibration, message):
    with pytest.raises(AttnoptError, match=message):
        attnopt.rewrite(make_model(), "linear", args=EXAMPLE, calibration=calibration)


def test_batches_the_model_cannot_take_are_a_clear_error():
    batches = [(torch.randn(2, TOKENS, DIM), torch.randn(2))] * 2  # forward takes one input
    with pytest.raises(AttnoptError, match="calibration batch 0 could not be run"):
        attnopt.rewrite(make_model(), "linear", args=EXAMPLE, feature_map="learned", calibration=batches)


class Branchy(nn.Module):
    """Attention in one of two blocks, chosen by a flag: data with the flag off never reaches `b`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = SharpBlock(graph_break=False), SharpBlock(graph_break=False)

    def forward(self, x: torch.Tensor, use_b: bool = False) -> torch.Tensor:
        return self.b(x) if use_b else self.a(x)


def test_calibration_data_that_never_reaches_a_site_is_a_clear_error():
    torch.manual_seed(0)
    model, batches = Branchy().eval(), make_batches(n=4)
    with pytest.raises(AttnoptError, match="never reaches"):
        attnopt.rewrite(model, "linear", args=(EXAMPLE[0], True), feature_map="elu1", calibration=batches)
    reached = attnopt.rewrite(model, "linear", args=(EXAMPLE[0], False), feature_map="elu1", calibration=batches)
    assert decided(reached)[0].decision.variant == "linear"


def test_dataloader_and_dict_batches():
    from torch.utils.data import DataLoader, TensorDataset

    model = make_model()
    data = torch.cat([b[0] for b in make_batches(n=4)])
    loader = DataLoader(TensorDataset(data), batch_size=2)  # batches are [x] lists
    assert len(materialise(loader)) == 4
    as_dicts = [{"x": b[0]} for b in make_batches(n=4)]
    for calibration in (loader, as_dicts):
        rewritten = attnopt.rewrite(model, "hybrid", args=EXAMPLE, window=8, sinks=1,
                                    calibration=Calibration(calibration, steps=5))
        assert all(site.decision.variant == "hybrid" for site in decided(rewritten))


def test_hybrid_mix_is_a_positive_parameter_started_at_the_config_value():
    site = make_site(B=2, H=4, Hkv=4, N=32, M=32, d=8, e=8)
    module = build_site_module(HybridConfig(window=8, mix=0.3), site)
    assert [p for p in module.calibration_parameters()] == [module.mix_log_scale]
    with torch.no_grad():
        assert float(module.mix) == 0.3
        module.mix_log_scale.fill_(-50.0)
        assert 0 < float(module.mix) < 0.3
    zero = build_site_module(HybridConfig(window=8, mix=0.0), site)
    assert zero.mix == 0.0 and zero.calibration_parameters() == []


def test_hybrid_and_mediator_calibration_lower_the_held_out_error():
    model, batches = make_model(), make_batches(n=8)
    # hybrid: a mix far off, which the fitted mixing weight corrects
    for variant, params in (("hybrid", {"window": 8, "sinks": 1, "mix": 20.0}), ("mediator", {"n_mediators": 8})):
        untrained = attnopt.rewrite(model, variant, args=EXAMPLE, calibration=Calibration(batches, steps=0), **params)
        trained = attnopt.rewrite(model, variant, args=EXAMPLE, calibration=Calibration(batches, steps=60), **params)
        for a, b in zip(decided(untrained), decided(trained)):
            assert b.decision.error < a.decision.error, (variant, a.decision.error, b.decision.error)
        if variant == "hybrid":
            assert all(float(site_module(trained, site).mix.detach()) < 20.0 for site in decided(trained))


def agent_rewrite(model: nn.Module, batches: list, steps: int, seed: int = 0) -> nn.Module:
    """8 agents for 48 tokens, their stage temperatures and V shortcut fitted for `steps` steps."""
    return attnopt.rewrite(model, "agent", args=EXAMPLE, agent_count=8,
                           calibration=Calibration(batches, steps=steps, lr=0.03, seed=seed))


@pytest.fixture(scope="module")
def agent_runs():
    model, batches = make_model(), make_batches()
    return model, batches, agent_rewrite(model, batches, steps=0), agent_rewrite(model, batches, steps=60)


def test_agent_step_zero_is_the_training_free_agents(agent_runs):
    model, batches, before, _ = agent_runs
    free = attnopt.rewrite(model, "agent", args=EXAMPLE, agent_count=8)  # no calibration at all
    # the graphs planned on the example (grad mode: a no_grad call is planned anew, its shortcut
    # fitted on block 1's inputs as that plan's block 0 gives them)
    assert torch.equal(before(*EXAMPLE), free(*EXAMPLE))
    assert torch.equal(before(*batches[3]), free(*batches[3]))
    for site in decided(before):
        module = site_module(before, site)
        assert not module.stage1_log_temperature.any() and not module.stage2_log_temperature.any()


def test_agent_calibration_lowers_the_held_out_error_of_every_site(agent_runs):
    _, _, before, after = agent_runs
    assert len(decided(after)) == 2
    for untrained, trained in zip(decided(before), decided(after)):
        assert trained.decision.variant == "agent"
        assert trained.decision.error < untrained.decision.error - 0.01, (untrained.decision.error,
                                                                          trained.decision.error)
        assert site_module(after, trained).stage2_log_temperature.abs().min() > 0  # every head's was fitted


def test_agent_calibration_is_deterministic_under_a_seed(agent_runs):
    model, batches, _, after = agent_runs
    again, other_seed = agent_rewrite(model, batches, steps=60), agent_rewrite(model, batches, steps=60, seed=1)
    for a, b, c in zip(decided(after), decided(again), decided(other_seed)):
        assert a.decision.error == b.decision.error
        first, second, third = (dict(site_module(run, site).named_parameters())
                                for run, site in ((after, a), (again, b), (other_seed, c)))
        assert all(torch.equal(first[name], second[name]) for name in first)
        assert any(not torch.equal(first[name], third[name]) for name in first)  # another training order


def test_agent_temperatures_are_parameters_and_state_and_load_back(agent_runs, tmp_path):
    *_, after = agent_runs
    names, state = dict(after.named_parameters()), after.state_dict()
    for site in decided(after):
        for name, parameter in site_module(after, site).named_parameters():
            key = f"attnopt_sites.{site.id}.{name}"
            assert names[key] is parameter and torch.equal(state[key], parameter)
    attnopt.save(after, tmp_path / "agents.pt")
    loaded = attnopt.load(make_model(), tmp_path / "agents.pt")
    with torch.no_grad():
        assert torch.equal(loaded(*EXAMPLE), after(*EXAMPLE))
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items() if "attnopt_sites." in key)

@pytest.mark.filterwarnings("ignore::attnopt.BudgetNotMetWarning")
def test_optimize_with_calibration_tries_the_learned_map():
    model = make_model()
    generator = torch.Generator().manual_seed(5)
    batches = [(torch.randn(1, 512, DIM, generator=generator),) for _ in range(4)]
    example = (torch.randn(1, 512, DIM, generator=generator),)

    def linear_rows(module):
        return {row["params"]["feature_map"]: row for site in decided(module) for row in site.decision.candidates
                if row["variant"] == "linear"}

    fast = attnopt.optimize(model, 0.5, args=example, device=PROFILE, calibration=Calibration(batches, steps=10))
    rows = linear_rows(fast)
    assert rows["learned"]["refused"] is None and math.isfinite(rows["learned"]["error"])
    assert attnopt.report_of(fast).budget_met is not None
    assert "learned" not in linear_rows(attnopt.optimize(model, 0.5, args=example, device=PROFILE))


def test_small_bert_with_padding():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, 100, (2, 24), generator=generator)
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, 18:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    batches = [batch() for _ in range(4)]
    example = batch()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    untrained = attnopt.rewrite(model, "linear", kwargs=example, feature_map="learned",
                                calibration=Calibration(batches, steps=0))
    trained = attnopt.rewrite(model, "linear", kwargs=example, feature_map="learned",
                              calibration=Calibration(batches, steps=60))
    assert len(decided(trained)) == 2
    for a, b in zip(decided(untrained), decided(trained)):
        assert math.isfinite(b.decision.error) and b.decision.error <= a.decision.error
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
    assert trained(**example).last_hidden_state.isfinite().all()
