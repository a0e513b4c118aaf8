"""One spec per variant: every default candidate is priced, every parameter that changes the work
changes the price, the priced work is the work the built module does, and reports show what
tells candidates apart."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnopt import costmodel
from attnopt.candidates import default_candidates
from attnopt.variants import (
    AgentConfig,
    ClusteredConfig,
    ExactConfig,
    HybridConfig,
    LinearConfig,
    MediatorConfig,
    TokenGrid,
    build_site_module,
    spec_for,
    specs,
)

from .support import make_site, tensors

SELF = make_site(B=2, H=4, Hkv=4, N=64, M=64, d=16, e=8)
CROSS = make_site(B=2, H=4, Hkv=4, N=64, M=48, d=16, e=8)
PROFILE = costmodel.DeviceProfile("cpu-like", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                                  elementwise_ops_per_s=2e9, call_overhead_s=5e-6)


def seconds(config, site) -> float:
    return costmodel.estimate_seconds(spec_for(config).formula(config, site), site.shape, PROFILE)


def test_the_default_grid_is_every_spec_s_own_grid_in_registration_order():
    assert [spec.name for spec in specs()] == ["exact", "agent", "linear", "mediator", "hybrid", "clustered"]
    grid_site = make_site(N=197, M=197)  # 1 + 14²: agents are also tried pooled on the grid
    names = [spec_for(config).name for config in default_candidates(grid_site)]
    assert names == ["exact"] + ["agent"] * 6 + ["linear"] * 3 + ["mediator"] * 2 + ["hybrid"] * 4 + ["clustered"] * 4
    assert sum(config.infer_grid for config in default_candidates(grid_site) if isinstance(config, AgentConfig)) == 3
    assert not any(getattr(config, "infer_grid", False) for config in default_candidates(make_site(N=48, M=48)))


@pytest.mark.parametrize("site", [SELF, CROSS], ids=["self", "cross"])
def test_every_default_candidate_is_priced_with_only_parameters_its_formula_knows(site):
    for config in default_candidates(site):
        spec = spec_for(config)
        cost = spec.cost(**spec.cost_params(config, site))  # an unknown parameter would be a TypeError
        assert costmodel.flops(cost, site.shape) > 0 and seconds(config, site) > 0


@pytest.mark.parametrize("config, field, value", [
    (AgentConfig(), "agent_fraction", 0.1),
    (AgentConfig(), "agent_count", 5),
    (AgentConfig(), "selection", "pool"),
    (AgentConfig(), "kmeans_iterations", 1),
    (AgentConfig(), "kmeans_window", None),
    (AgentConfig(), "outlier_fraction", 0.0),
    (AgentConfig(), "max_outliers", 1),
    (AgentConfig(agent_count=16), "kmeans_window", 5),
    (AgentConfig(), "shortcut_offsets", ()),
    (MediatorConfig(n_mediators=32), "n_mediators", 16),
    (MediatorConfig(n_mediators=32), "shortcut_offsets", ()),
    (LinearConfig(), "feature_map", "learned"),
    (LinearConfig(), "normalization", "inline"),
    (HybridConfig(window=16), "window", 8),
    (HybridConfig(window=16), "sinks", 4),
    (HybridConfig(window=16), "feature_map", "focused"),
    (HybridConfig(window=10), "infer_grid", True),  # 3×3 on the 8×8 grid of N = 64
    (ClusteredConfig(clusters=8, top_keys=8), "clusters", 16),
    (ClusteredConfig(clusters=8, top_keys=8), "top_keys", 16),
    (ClusteredConfig(clusters=8, top_keys=8), "kmeans_iterations", 3),
])
def test_every_parameter_that_changes_the_work_changes_the_price(config, field, value):
    """What `**cost_free_params` let through unpriced: the V shortcut and the learned feature map."""
    changed = dataclasses.replace(config, **{field: value})
    assert seconds(changed, SELF) != seconds(config, SELF)


@pytest.mark.parametrize("config", [AgentConfig(), AgentConfig(shortcut_offsets=()), AgentConfig(shortcut_offsets=(0,)),
                                    MediatorConfig(n_mediators=8), MediatorConfig(n_mediators=8, shortcut_offsets=())])
@pytest.mark.parametrize("site", [SELF, CROSS], ids=["self", "cross"])
def test_the_v_shortcut_is_priced_exactly_where_the_module_runs_one(config, site):
    module = build_site_module(config, site, example=(*tensors(site), None))
    runs = module.shortcut.offsets if module.shortcut is not None else ()
    spec = spec_for(config)
    assert spec.cost_params(config, site)["shortcut_offsets"] == runs
    without = dataclasses.replace(config, shortcut_offsets=())
    extra = (spec.formula(config, site).elementwise_ops - spec.formula(without, site).elementwise_ops)
    assert costmodel._evaluate(extra, site.shape, torch.float32) == site.B * site.H * site.N * site.e * len(runs)


FLOP_CHECKED = [(config, site) for site in (SELF, CROSS) for config in default_candidates(site)] + [
    (config, site) for site in (SELF, CROSS) for config in (
        LinearConfig(feature_map="learned"), LinearConfig(feature_map="learned", normalization="inline"),
        LinearConfig(normalization="inline"), AgentConfig(selection="pool"), MediatorConfig(n_mediators=8),
        AgentConfig(), AgentConfig(agent_fraction=0.2), AgentConfig(agent_count=7, kmeans_window=None),
        AgentConfig(agent_count=9, kmeans_window=4, kmeans_iterations=2, max_outliers=1))] + [
    (HybridConfig(window=9, sinks=2, feature_map="focused"), SELF), (HybridConfig(window=100), SELF),
    (HybridConfig(window=9, sinks=2), make_site(B=2, H=4, Hkv=2, N=65, M=65, d=16, e=8, grid=TokenGrid(8, 8, True))),
    (HybridConfig(window=40, sinks=1), make_site(B=2, H=4, Hkv=2, N=37, M=37, d=16, e=8)),  # 3 tiles of 18, padded
    (HybridConfig(window=12, sinks=1), make_site(B=2, H=4, Hkv=2, N=37, M=37, d=16, e=8, causal=True)),
    (ClusteredConfig(clusters=8, top_keys=12), SELF), (ClusteredConfig(clusters=5, top_keys=7, kmeans_iterations=0), CROSS),
    (ClusteredConfig(clusters=100, top_keys=100), SELF),  # both capped at the site's N and M
    (ClusteredConfig(clusters=6, top_keys=9, kmeans_iterations=2), make_site(B=2, H=4, Hkv=2, N=40, M=40, d=16, e=8))]


@pytest.mark.parametrize("config, site", FLOP_CHECKED, ids=lambda value: repr(value)[:60])
def test_priced_flops_are_what_the_built_module_runs(config, site):
    """As FlopCounterMode counts them. A learned φ is a d×d matmul per token in front of the linear
    op: priced as elu+1, it was priced at half its FLOPs."""
    module = build_site_module(config, site, example=(*tensors(site), None))
    with torch.no_grad():
        counted = costmodel.count_flops(module, *tensors(site, seed=1), scale=0.25, causal=site.causal)
    assert costmodel.flops(spec_for(config).formula(config, site), site.shape) == counted


def test_exact_is_priced_fused_where_its_op_runs_the_fused_kernel():
    """Triton on CUDA, torch's SDPA on CPU; with dropout the op runs matmul-softmax-matmul."""
    exact = spec_for(ExactConfig())
    assert exact.cost_params(ExactConfig(), SELF) == {"fused": True}
    assert exact.cost_params(ExactConfig(), dataclasses.replace(SELF, device="cuda")) == {"fused": True}
    with_dropout = dataclasses.replace(SELF, dropout=0.1)
    assert exact.cost_params(ExactConfig(), with_dropout) == {"fused": False}
    assert exact.formula(ExactConfig(), with_dropout) == costmodel.softmax_attention(fused=False)


def test_mediator_price_follows_the_count_of_the_current_call():
    import attnopt

    config = MediatorConfig(n_mediators=32)
    with attnopt.mediator_count(8):
        fewer = seconds(config, SELF)
    assert fewer < seconds(config, SELF)


def test_reports_show_the_always_shown_params_and_those_off_their_default():
    assert spec_for(AgentConfig()).shown_params(AgentConfig(agent_fraction=0.1, selection="pool")) == {
        "agent_fraction": 0.1, "selection": "pool"}
    assert spec_for(MediatorConfig()).shown_params(MediatorConfig(n_mediators=16)) == {"n_mediators": 16}
    assert spec_for(LinearConfig()).shown_params(LinearConfig()) == {"feature_map": "elu1"}
    assert spec_for(ExactConfig()).shown_params(ExactConfig()) == {}
    assert spec_for(HybridConfig()).shown_params(HybridConfig(mix=0.5)) == {"sinks": 1, "window": 64, "mix": 0.5}
    assert spec_for(ClusteredConfig()).shown_params(ClusteredConfig(kmeans_iterations=2)) == {
        "clusters": 32, "top_keys": 64, "kmeans_iterations": 2}


HEAD_SPLIT_SITES = {
    "self-64": (SELF, [1, 3]),
    "gqa-64": (make_site(B=2, H=4, Hkv=2, N=64, M=64, d=16, e=8), [1]),  # kv head 1: query heads 2, 3
    "self-256": (make_site(B=2, H=4, Hkv=4, N=256, M=256, d=16, e=8), [0, 2]),  # 64 and 128 agents run
}


@pytest.mark.parametrize("site_name", sorted(HEAD_SPLIT_SITES))
@pytest.mark.parametrize("calibrated", [False, True], ids=["training-free", "calibrated-grid"])
def test_a_heads_independent_variant_built_for_some_heads_computes_what_the_full_one_does_there(site_name,
                                                                                               calibrated):
    """What attnopt.candidates relies on to read a per-head split's error off the full module:
    every default candidate of a heads-independent variant, self-attention, GQA and a longer site."""
    base, kv_heads = HEAD_SPLIT_SITES[site_name]
    site = dataclasses.replace(base, mask_kind="key_padding")
    q, k, v = tensors(site, seed=3)
    mask = (torch.arange(site.M)[None, :] < torch.tensor([site.M, 40])[:, None])[:, None, None, :]
    group = site.H // site.Hkv
    kv = torch.tensor(kv_heads)
    heads = torch.tensor([kv_head * group + offset for kv_head in kv_heads for offset in range(group)])
    subset = dataclasses.replace(site, H=len(heads), Hkv=len(kv_heads))
    configs = [config for config in default_candidates(base, calibrated=calibrated)
               if spec_for(config).heads_independent and spec_for(config).name != "exact"]
    assert configs
    for config in configs:
        full = build_site_module(config, site, (q, k, v, mask))
        part = build_site_module(config, subset, (q[:, heads], k[:, kv], v[:, kv], mask))
        with torch.no_grad():
            expected = full(q, k, v, mask=mask, scale=0.25)[:, heads]
            actual = part(q[:, heads], k[:, kv], v[:, kv], mask=mask, scale=0.25)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m, c=config: f"{c}: {m}")


def test_every_variant_says_its_heads_are_independent():
    """Agents are selected per head from the call's own queries, mediators clustered per head,
    linear maps and hybrids act per head, and the V shortcut is fitted per head: nothing is
    shared across heads when a module is built (calibration is another matter: candidates
    builds calibrated splits)."""
    assert all(spec.heads_independent for spec in specs() if spec.name != "exact")
