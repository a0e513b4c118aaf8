"""Save and load (attnopt.persist): the saved plans, decisions and calibrated site parameters come
back for the same model without planning or calibrating again; another model is refused; the
site parameters are ordinary parameters and state of the returned module."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
import attnopt.calibration
import attnopt.policies
from attnopt import persist
from attnopt.backend import AttnoptBackend, AttnoptError
from attnopt.calibration import Calibration
from attnopt.candidates import CausalMaskAttention
from attnopt.costmodel import DeviceProfile
from attnopt.variants import LinearConfig, MediatorConfig, build_site_module
from attnopt.variants.heads import HeadSplit, HeadSplitAttention, split_sites
from attnopt.variants.mediator import MediatorAttention
from tests.variants.support import make_site, tensors

DIM, TOKENS = 32, 64
# matmuls slow, calls free: the two-stage and linear variants pay off already at 64 tokens
SLOW_MATMULS = DeviceProfile(name="slow matmuls", matmul_flops_per_s=1e9, bandwidth_bytes_per_s=1e12,
                             elementwise_ops_per_s=1e12, call_overhead_s=1e-9)


class Block(nn.Module):
    """SDPA self-attention whose q/k projections are scaled up: peaked, far from uniform attention."""

    def __init__(self, heads: int = 2, graph_break: bool = False):
        super().__init__()
        self.heads, self.graph_break = heads, graph_break
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        with torch.no_grad():
            self.qkv.weight[: 2 * DIM] *= 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, DIM // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.proj(out.transpose(1, 2).reshape(x.shape))


class Net(nn.Module):
    def __init__(self, layers: int = 2, heads: int = 2, graph_break: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(heads, graph_break) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def make_model(seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs).eval()


def inputs(seed: int, n: int = TOKENS, batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed)),)


BATCHES = [inputs(100 + i) for i in range(4)]
EXAMPLE, OTHER = inputs(1), inputs(2)
CANDIDATES = [LinearConfig(feature_map="learned"), MediatorConfig(n_mediators=8)]


def optimized(model: nn.Module) -> attnopt.AttnoptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnopt.BudgetNotMetWarning)
        return attnopt.optimize(model, 0.6, args=EXAMPLE, device=SLOW_MATMULS, candidates=CANDIDATES,
                                calibration=Calibration(BATCHES, steps=10))


def rewritten_sites(module) -> list:
    return [site for site in attnopt.report_of(module).sites if site.decision is not None and not site.decision.kept]


def site_keys(module) -> list[str]:
    return [key for key in module.state_dict() if key.startswith("attnopt_sites.")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[attnopt.AttnoptModule, Path]:
    """An optimize with calibration whose plan rewrites both sites, saved."""
    module = optimized(make_model())
    assert len(rewritten_sites(module)) == 2
    assert all(site.decision.variant in ("linear", "mediator") for site in rewritten_sites(module))
    path = tmp_path_factory.mktemp("plans") / "optimized.pt"
    attnopt.save(module, path)
    return module, path


def test_optimize_with_calibration_loads_back_to_the_same_outputs_and_report(saved):
    module, path = saved
    assert isinstance(torch.load(path, weights_only=True), dict)  # plain containers only
    loaded = attnopt.load(make_model(), path)
    # the site modules and their calibrated parameters are there before the first call
    assert site_keys(loaded) == site_keys(module) != []
    for key in site_keys(module):
        assert torch.equal(loaded.state_dict()[key], module.state_dict()[key]), key
    with torch.no_grad():
        for x in (EXAMPLE, OTHER):
            assert torch.equal(loaded(*x), module(*x))
    before, after = attnopt.report_of(module), attnopt.report_of(loaded)
    saved_sites = {site.id: site for site in before.sites}  # (a no-grad call added a graph there: 2 more sites)
    assert [site.id for site in after.sites] == [0, 1]
    for site in after.sites:
        twin = saved_sites[site.id]
        assert (site.module, site.shape, site.decision.variant, site.decision.params, site.decision.error) == (
            twin.module, twin.shape, twin.decision.variant, twin.decision.params, twin.decision.error)
        assert site.decision.candidates == twin.decision.candidates
    assert all(site.decision.loaded_from == str(path) for site in after.sites)
    assert [plan.signature for plan in after.plans] == [plan.signature for plan in before.plans]
    assert all(plan.loaded_from == str(path) and plan.output_error is not None for plan in after.plans)
    assert after.budget_met == before.budget_met
    text = str(after)
    assert "loaded" in text and str(path) in text and "planned in" not in text


def test_load_neither_plans_nor_calibrates_but_checks_again(saved, monkeypatch):
    _, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("load planned or calibrated")

    for owner, name in ((attnopt.policies.BudgetPolicy, "choose"), (attnopt.policies.VariantPolicy, "choose"),
                        (attnopt.policies, "analyse"), (attnopt.policies, "plan"), (attnopt.policies, "evaluate_site"),
                        (attnopt.calibration.Calibrator, "calibrate"), (attnopt.calibration.Calibrator, "site_data"),
                        (attnopt.calibration, "fit"), (MediatorAttention, "initialise")):
        monkeypatch.setattr(owner, name, refuse)
    checks = []
    end_to_end = AttnoptBackend._end_to_end
    monkeypatch.setattr(AttnoptBackend, "_end_to_end", lambda self, *a, **k: checks.append(1) or end_to_end(self, *a, **k))
    loaded = attnopt.load(make_model(), path, args=EXAMPLE)
    assert len(rewritten_sites(loaded)) == 2 and checks  # decisions applied, the end-to-end check ran
    # a shape the file does not hold is planned by the saved policy (here: refused by the patch)
    with pytest.raises(AssertionError, match="load planned"):
        loaded(*inputs(3, n=2 * TOKENS))


def test_a_shape_the_file_does_not_hold_is_planned_with_the_saved_budget(saved):
    _, path = saved
    loaded = attnopt.load(make_model(), path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", attnopt.BudgetNotMetWarning)
        loaded(*inputs(3, n=2 * TOKENS))
    plans = attnopt.report_of(loaded).plans
    assert [plan.loaded_from for plan in plans] == [None] and plans[0].budget == "time=0.6"
    assert plans[0].signature == f"2x{2 * TOKENS}x{DIM}"


@pytest.mark.parametrize("variant, params, graph_break", [
    ("mediator", {"n_mediators": 8}, True),
    ("linear", {"feature_map": "learned"}, False),
    ("hybrid", {"window": 8, "sinks": 1}, False),
    ("clustered", {"clusters": 4, "top_keys": 8}, True),  # nothing to calibrate: the fit is skipped
    ("exact", {}, False),
])
def test_a_rewrite_loads_back_to_the_same_outputs(tmp_path, variant, params, graph_break):
    calibration = Calibration(BATCHES, steps=10) if variant != "exact" else None
    module = attnopt.rewrite(make_model(graph_break=graph_break), variant, args=EXAMPLE, calibration=calibration,
                             **params)
    assert {site.decision.variant for site in rewritten_sites(module)} == {variant}
    attnopt.save(module, tmp_path / "plans.pt")
    loaded = attnopt.load(make_model(graph_break=graph_break), tmp_path / "plans.pt")
    with torch.no_grad():
        assert torch.equal(loaded(*EXAMPLE), module(*EXAMPLE))
    saved_sites = {site.id: site for site in rewritten_sites(module)}
    assert [site.id for site in rewritten_sites(loaded)] == [0, 1]
    for site in rewritten_sites(loaded):
        assert site.decision.loaded_from is not None
        assert (site.decision.params, site.decision.error) == (saved_sites[site.id].decision.params,
                                                               saved_sites[site.id].decision.error)


def test_shapes_load_whatever_order_they_are_called_in(tmp_path):
    """The first shape a process meets gets a static graph, later ones a dynamic graph: a file saved
    after 64 then 96 tokens serves 96 then 64 without planning."""
    module = attnopt.rewrite(make_model(), "linear", args=EXAMPLE, feature_map="learned",
                             calibration=Calibration(BATCHES, steps=5))
    longer = inputs(3, n=96)
    with torch.no_grad():
        expected = module(*longer), module(*EXAMPLE)
    attnopt.save(module, tmp_path / "plans.pt")
    loaded = attnopt.load(make_model(), tmp_path / "plans.pt")
    with torch.no_grad():
        assert torch.equal(loaded(*longer), expected[0]) and torch.equal(loaded(*EXAMPLE), expected[1])
    report = attnopt.report_of(loaded)
    assert {plan.signature for plan in report.plans} == {f"2x96x{DIM}", f"2x{TOKENS}x{DIM}"}
    assert all(plan.loaded_from is not None for plan in report.plans)


def test_a_model_of_another_structure_is_refused_at_load(saved):
    _, path = saved
    with pytest.raises(AttnoptError, match=r"is not the model saved in .*weights the saved model does not have: "
                                           r"blocks\.2\."):
        attnopt.load(make_model(layers=3), path)


def test_a_site_that_differs_from_the_file_is_refused_on_its_first_call(saved):
    _, path = saved
    loaded = attnopt.load(make_model(heads=4), path)  # the same weights' shapes, another head dim
    with pytest.raises(AttnoptError, match=r"(?s)does not match what .* saved.*the site at blocks\.0 .*"
                                           r"H=4 \(saved 2\).*d=8 \(saved 16\).*blocks\.1"):
        loaded(*EXAMPLE)


def test_other_weights_are_warned_about(saved):
    _, path = saved
    with pytest.warns(UserWarning, match="differ from those saved"):
        attnopt.load(make_model(seed=1), path)


def test_unknown_versions_and_other_files_are_refused(saved, tmp_path):
    _, path = saved
    record = torch.load(path, weights_only=True)
    torch.save({**record, "version": persist.FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(AttnoptError, match=f"format version {persist.FORMAT_VERSION + 1}.*cannot read"):
        attnopt.load(make_model(), tmp_path / "newer.pt")
    torch.save(make_model().state_dict(), tmp_path / "state.pt")
    with pytest.raises(AttnoptError, match="not a file attnopt.save wrote"):
        attnopt.load(make_model(), tmp_path / "state.pt")
    with pytest.raises(AttnoptError, match="takes a module returned by"):
        attnopt.save(make_model(), tmp_path / "plain.pt")


def test_site_parameters_are_parameters_and_state_and_the_originals_state_dict_loads(saved):
    module, path = saved
    loaded = attnopt.load(make_model(), path)
    names = dict(loaded.named_parameters())
    site_parameters = {name: p for name, p in names.items() if name.startswith("attnopt_sites.")}
    assert site_parameters and all(any(p is q for q in loaded.parameters()) for p in site_parameters.values())
    original = make_model(seed=1)
    assert set(loaded.state_dict()) == set(original.state_dict()) | set(site_keys(module))
    before = {key: loaded.state_dict()[key].clone() for key in site_keys(loaded)}
    loaded.load_state_dict(original.state_dict())  # strict: the model's own keys load, the sites keep theirs
    assert torch.equal(loaded.model.blocks[0].qkv.weight, original.blocks[0].qkv.weight)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in before.items())
    full = {key: value + 1 if key.startswith("attnopt_sites.") else value for key, value in module.state_dict().items()}
    loaded.load_state_dict(full)  # a rewrite's whole state dict: the sites' keys load into them
    assert all(torch.equal(loaded.state_dict()[key], value + 1) for key, value in before.items())
    with pytest.raises(RuntimeError, match="Unexpected key.*attnopt_sites.99.mediators"):
        loaded.load_state_dict({**original.state_dict(), "attnopt_sites.99.mediators": torch.zeros(1)})
    partial = {**original.state_dict(), next(iter(before)): next(iter(before.values()))}
    with pytest.raises(RuntimeError, match="Missing key"):
        loaded.load_state_dict(partial)


def test_dtype_device_and_mode_changes_reach_the_site_modules(saved):
    """`.double()`, `.to()`, `.train()`/`.eval()` act on the site modules too: their parameters
    are parameters of the module, so they must follow its dtype and mode like the model's."""
    _, path = saved
    loaded = attnopt.load(make_model(), path)
    sites = [module for _, module in loaded.attnopt_site_modules()]
    assert sites and any(True for module in sites for _ in module.parameters())
    loaded.double()
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    loaded.to(torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.train() is loaded and all(module.training for module in sites)
    assert loaded.eval() is loaded and not any(module.training for module in sites)
    with torch.no_grad():  # the float32 plan still runs, on the converted-back site modules
        assert torch.isfinite(loaded(*EXAMPLE)).all()


def test_a_training_step_moves_the_calibrated_parameters(saved):
    _, path = saved
    loaded = attnopt.load(make_model(), path)
    site_parameters = {name: p.detach().clone() for name, p in loaded.named_parameters()
                       if name.startswith("attnopt_sites.")}
    optimizer = torch.optim.Adam(loaded.parameters(), lr=1e-2)
    loss = (loaded(*EXAMPLE) - EXAMPLE[0]).square().mean()
    loss.backward()
    optimizer.step()
    moved = {name: p for name, p in loaded.named_parameters() if name in site_parameters}
    assert any(not torch.equal(moved[name], value) for name, value in site_parameters.items())


def test_a_rewrite_inside_a_larger_module_saves_and_loads_its_site_keys(saved):
    module, path = saved
    outer = nn.Sequential(attnopt.load(make_model(), path), nn.Linear(DIM, DIM))
    keys = list(outer.state_dict())
    assert [key for key in keys if ".attnopt_sites." in key] == [f"0.{key}" for key in site_keys(module)]
    with pytest.warns(UserWarning, match="differ from those saved"):
        other = nn.Sequential(attnopt.load(make_model(seed=1), path), nn.Linear(DIM, DIM))
    other.load_state_dict(outer.state_dict())
    with torch.no_grad():
        assert torch.equal(other(*EXAMPLE), outer(*EXAMPLE))
    other.load_state_dict({key: value for key, value in outer.state_dict().items() if ".attnopt_sites." not in key})


def test_a_setting_kept_outside_the_state_dict_is_refused_by_save(tmp_path):
    module = attnopt.rewrite(make_model(), "hybrid", args=EXAMPLE, window=8, sinks=1)
    _, site_module = module.attnopt_site_modules()[0]
    site_module.mix = 0.5  # set by hand: not what its config (mix=1.0) builds, and no parameter
    with pytest.raises(AttnoptError, match="base_mix = 0.5 is not what its config builds"):
        attnopt.save(module, tmp_path / "plans.pt")


def test_a_copy_of_a_loaded_module_owns_its_site_parameters(saved):
    module, path = saved
    loaded = attnopt.load(make_model(), path)
    twin = copy.deepcopy(loaded)
    mine, theirs = dict(loaded.named_parameters()), dict(twin.named_parameters())
    assert mine.keys() == theirs.keys() and all(mine[name] is not theirs[name] for name in mine)
    with torch.no_grad():
        assert torch.equal(twin(*EXAMPLE), module(*EXAMPLE))
    assert all(site.decision.loaded_from == str(path) for site in rewritten_sites(twin))


def test_a_loaded_module_saves_every_graph_again(saved, tmp_path):
    module, path = saved
    loaded = attnopt.load(make_model(), path)  # never called: its graphs are in the file still
    attnopt.save(loaded, tmp_path / "again.pt")
    again = attnopt.load(make_model(), tmp_path / "again.pt")
    with torch.no_grad():
        assert torch.equal(again(*EXAMPLE), module(*EXAMPLE))
    assert all(site.decision.loaded_from == str(tmp_path / "again.pt") for site in rewritten_sites(again))


def test_per_head_and_causal_wrappers_are_rebuilt():
    site = make_site(B=2, H=4, Hkv=2, N=16, M=16, d=8, e=8, causal=True)
    split = HeadSplit(LinearConfig(feature_map="learned"), (1,))
    _, rest = split_sites(split, site)
    module = CausalMaskAttention(HeadSplitAttention(build_site_module(split.config, rest), split, site))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(4)) * 0.1)
    description = persist._describe(module)
    rebuilt = persist._rebuild(persist._decode(persist._encode(description)))
    rebuilt.load_state_dict(module.state_dict())
    q, k, v = tensors(site, seed=5)
    with torch.no_grad():
        assert torch.equal(rebuilt(q, k, v, scale=0.3), module(q, k, v, scale=0.3))


@pytest.mark.slow
def test_a_fresh_process_loads_the_same_module(saved, tmp_path):
    """Site ids, state dict keys and outputs are the same in a process that never planned."""
    module, path = saved
    with torch.no_grad():
        torch.save({"x": EXAMPLE[0], "out": module(*EXAMPLE), "keys": list(module.state_dict())}, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import torch, attnopt
        from tests.test_save_load import make_model
        want = torch.load({str(tmp_path / "want.pt")!r})
        loaded = attnopt.load(make_model(), {str(path)!r})
        assert list(loaded.state_dict()) == want["keys"], list(loaded.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(want["x"]), want["out"])
        assert [s.id for s in attnopt.report_of(loaded).sites] == [0, 1]
    """)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
