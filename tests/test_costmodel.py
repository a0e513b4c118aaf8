"""The cost model's formulas against hand counts and FlopCounterMode, its roofline, break-even and cache."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from attnopt.kernels import agent_attention, linear_attention

from attnopt import costmodel
from attnopt.costmodel import DeviceProfile
from attnopt.variants import spec_named

SHAPE = {"B": 2, "H": 4, "Hkv": 2, "N": 96, "M": 80, "d": 32, "e": 16}
COMPUTE_ONLY = DeviceProfile("compute only", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=math.inf,
                             elementwise_ops_per_s=math.inf, call_overhead_s=0.0)
REALISTIC = DeviceProfile("cpu-like", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                          elementwise_ops_per_s=2e9, call_overhead_s=5e-6)


def cost(variant: str, **params) -> costmodel.CostFormula:
    """The cost formula of the variant called `variant` with `params`."""
    return spec_named(variant).cost(**params)


def qkv(shape: dict[str, int], dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(0)
    sizes = [(shape["B"], shape["H"], shape["N"], shape["d"]), (shape["B"], shape["Hkv"], shape["M"], shape["d"]),
             (shape["B"], shape["Hkv"], shape["M"], shape["e"])]
    return [torch.randn(size, generator=generator, dtype=dtype) for size in sizes]


def test_exact_flops_are_two_per_multiply_add_of_both_matmuls():
    assert costmodel.flops(cost("exact"), SHAPE) == 2 * 2 * 4 * 96 * 80 * (32 + 16)


def test_exact_flops_equal_flop_counter_of_plain_softmax_attention_and_sdpa():
    q, k, v = qkv(SHAPE)
    k, v = (x.repeat_interleave(SHAPE["H"] // SHAPE["Hkv"], dim=1) for x in (k, v))

    def plain():
        return torch.softmax(q @ k.transpose(-1, -2) * SHAPE["d"] ** -0.5, dim=-1) @ v

    expected = costmodel.flops(cost("exact"), SHAPE)
    assert costmodel.count_flops(plain) == expected
    assert costmodel.count_flops(F.scaled_dot_product_attention, q, k, v) == expected


def test_two_stage_flops_equal_flop_counter_of_the_agent_kernel():
    q, k, v = qkv(SHAPE)
    agents = q[:, :, :8]
    counted = costmodel.count_flops(agent_attention, q, k, v, agents, scale=0.2, agent_scale=0.2)
    assert costmodel.flops(cost("mediator", n_mediators=8), SHAPE) == counted
    assert costmodel.flops(cost("agent", n_agents=8, selection="pool"), SHAPE) == counted  # pooling is no matmul


@pytest.mark.parametrize("normalization", ["sum", "inline"])
def test_linear_flops_equal_flop_counter_of_the_linear_kernel(normalization):
    shape = {**SHAPE, "Hkv": SHAPE["H"]}
    q, k, v = qkv(shape)
    counted = costmodel.count_flops(linear_attention, q, k, v, normalization=normalization)
    assert costmodel.flops(cost("linear", normalization=normalization), shape) == counted


def test_agent_flops_by_hand_with_global_kmeans():
    n_agents, iterations = 8, 2
    b_h = SHAPE["B"] * SHAPE["H"]
    two_stages = 2 * b_h * n_agents * (SHAPE["M"] + SHAPE["N"]) * (SHAPE["d"] + SHAPE["e"])
    distances = iterations * 2 * b_h * SHAPE["N"] * n_agents * SHAPE["d"]
    params = {"n_agents": n_agents, "selection": "kmeans", "kmeans_iterations": iterations}
    assert costmodel.flops(cost("agent", **params), SHAPE) == two_stages + distances


def test_bytes_of_fused_exact_are_q_k_v_and_o_and_unfused_adds_four_passes_over_the_scores():
    b, h, hkv, n, m, d, e = (SHAPE[key] for key in ("B", "H", "Hkv", "N", "M", "d", "e"))
    tensors = b * (h * n * d + hkv * m * d + hkv * m * e + h * n * e)
    assert costmodel.bytes_moved(cost("exact"), SHAPE) == 4 * tensors
    assert costmodel.bytes_moved(cost("exact"), SHAPE, dtype=torch.bfloat16) == 2 * tensors
    assert costmodel.bytes_moved(cost("exact", fused=False), SHAPE) == 4 * tensors + 4 * 4 * b * h * n * m


def test_hkv_m_and_e_default_to_h_n_and_d():
    short = {"B": 1, "H": 3, "N": 64, "d": 16}
    full = {**short, "Hkv": 3, "M": 64, "e": 16}
    for variant, params in [("exact", {}), ("agent", {"n_agents": 4}), ("linear", {})]:
        assert costmodel.flops(cost(variant, **params), short) == costmodel.flops(cost(variant, **params), full)


def test_an_unset_token_count_an_unknown_name_and_an_unknown_option_are_reported():
    with pytest.raises(ValueError, match="n"):
        costmodel.flops(cost("agent"), SHAPE)
    with pytest.raises(KeyError, match="unknown variant 'sparse'"):
        cost("sparse")
    with pytest.raises(KeyError, match="feature map"):
        cost("linear", feature_map="cosine")
    with pytest.raises(KeyError, match="agent selection"):
        cost("agent", selection="random")


@pytest.mark.parametrize("variant, unknown", [("exact", {"scale": 0.1}), ("agent", {"temperature": 4.0}),
                                              ("linear", {"power": 3.0}), ("mediator", {"n_agents": 8})])
def test_a_formula_refuses_a_parameter_it_does_not_know(variant, unknown):
    """No parameter is swallowed: one that a formula does not price is a TypeError, not silently free."""
    with pytest.raises(TypeError, match=next(iter(unknown))):
        cost(variant, **unknown)


def test_estimate_is_the_roofline_of_the_formula():
    agent = cost("agent", n_agents=8)
    flops, ops, moved, calls = (costmodel._evaluate(term, SHAPE, torch.float32) for term in
                                (agent.flops, agent.elementwise_ops, agent.bytes_moved, agent.kernel_calls))
    compute = flops / REALISTIC.matmul_flops_per_s + ops / REALISTIC.elementwise_ops_per_s
    memory = moved / REALISTIC.bandwidth_bytes_per_s
    expected = max(compute, memory) + calls * REALISTIC.call_overhead_s
    assert costmodel.estimate_seconds(agent, SHAPE, REALISTIC) == pytest.approx(expected)


def test_memory_bound_work_is_timed_by_bandwidth():
    slow_memory = DeviceProfile("slow memory", 1e15, 1e6, 1e15, 0.0)
    unfused = cost("exact", fused=False)
    seconds = costmodel.estimate_seconds(unfused, SHAPE, slow_memory)
    assert seconds == pytest.approx(costmodel.bytes_moved(unfused, SHAPE) / 1e6)


def test_non_attention_flops_are_counted_and_timed_by_the_same_roofline():
    layer = torch.nn.Linear(64, 32)
    counted = costmodel.count_flops(layer, torch.randn(10, 64))
    assert counted == 2 * 10 * 64 * 32
    assert costmodel.roofline_seconds(counted, device=COMPUTE_ONLY) == pytest.approx(counted / 1e11)


@pytest.mark.parametrize("n_agents", [16, 64])
def test_agent_pays_off_on_flops_once_n_is_below_half_of_n(n_agents):
    shape = {"B": 1, "H": 6, "d": 64}
    assert costmodel.break_even_length(cost("agent", n_agents=n_agents), shape, COMPUTE_ONLY) == 2 * n_agents + 1


@pytest.mark.parametrize("head_dim", [32, 64])
def test_linear_pays_off_on_flops_once_n_exceeds_d(head_dim):
    # 2N²(d+e) against 4N(de + d) with e = d: faster from N > d + 1
    shape = {"B": 1, "H": 6, "d": head_dim}
    assert costmodel.break_even_length(cost("linear"), shape, COMPUTE_ONLY) == head_dim + 2


@pytest.mark.parametrize(
    "variant, params",
    [
        ("agent", {"n_agents": 64}),
        ("agent", {"n_agents": 32, "selection": "kmeans", "kmeans_window": 9}),
        ("agent", {"n_agents": 64, "selection": "bipartite"}),  # a log of N in its call count
        ("mediator", {"n_mediators": 128, "shortcut_offsets": (-1, 0, 1)}),
        ("linear", {"feature_map": "focused"}),
    ],
)
def test_break_even_is_where_the_estimates_cross(variant, params):
    shape = {"B": 1, "H": 6, "d": 64}
    formula = cost(variant, **params)
    length = costmodel.break_even_length(formula, shape, REALISTIC)

    def faster(n: int) -> bool:
        at = {**shape, "N": n}
        return costmodel.estimate_seconds(formula, at, REALISTIC) < costmodel.estimate_seconds(cost("exact"), at, REALISTIC)

    assert length is not None and length > 1
    assert faster(length) and not faster(length - 1)
    assert all(faster(length * factor) for factor in (2, 10, 1000))


def test_a_variant_that_is_never_faster_has_no_break_even():
    assert costmodel.break_even_length(cost("exact", fused=False), {"B": 1, "H": 6, "d": 64}, REALISTIC) is None


@pytest.fixture
def counted_measurements(monkeypatch, tmp_path):
    """Profiles cached under tmp_path; measuring returns REALISTIC and is counted, and so does the
    spot check of a cached profile (its calls in `counted_measurements.spot_checks`)."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    calls = CountedCalls()

    def fake_measure(device, dtype=torch.float32):
        calls.append(device)
        return calls.measured

    def fake_spot_check(device, dtype=torch.float32):
        calls.spot_checks.append(device)
        return calls.spot_checked

    monkeypatch.setattr(costmodel, "measure_device", fake_measure)
    monkeypatch.setattr(costmodel, "spot_check", fake_spot_check)
    return calls


class CountedCalls(list):
    """Devices measured; what the fake measurement and spot check return."""

    def __init__(self):
        super().__init__()
        self.spot_checks: list = []
        self.measured = self.spot_checked = REALISTIC


def test_profile_is_measured_once_then_read_from_the_cache(counted_measurements, tmp_path):
    assert costmodel.device_profile("cpu") == REALISTIC
    assert costmodel.device_profile("cpu") == REALISTIC
    assert len(counted_measurements) == 1
    path = costmodel.cache_path(torch.device("cpu"))
    assert path.parent == tmp_path and path.name.startswith("device-")
    assert json.loads(path.read_text())["matmul_flops_per_s"] == REALISTIC.matmul_flops_per_s


@pytest.mark.parametrize("content", ["{not json", '{"name": "cpu"}', "[]"])
def test_an_unreadable_cache_file_is_measured_again_and_rewritten(counted_measurements, content):
    path = costmodel.cache_path(torch.device("cpu"))
    path.write_text(content)
    assert costmodel.device_profile("cpu") == REALISTIC
    assert len(counted_measurements) == 1
    assert DeviceProfile(**json.loads(path.read_text())) == REALISTIC


def test_cache_files_differ_by_dtype_and_thread_count():
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    first = costmodel.cache_path(cpu)
    try:
        torch.set_num_threads(threads + 1)
        assert costmodel.cache_path(cpu) != first
    finally:
        torch.set_num_threads(threads)
    assert costmodel.cache_path(cpu, torch.bfloat16) != first


def test_a_cached_profile_is_spot_checked_once_per_process_and_kept_when_it_agrees(counted_measurements):
    path = costmodel.cache_path(torch.device("cpu"))
    path.write_text(json.dumps(dataclasses.asdict(REALISTIC)))
    counted_measurements.spot_checked = dataclasses.replace(REALISTIC, matmul_flops_per_s=0.6e11, noise=0.3)
    assert costmodel.device_profile("cpu") == REALISTIC  # 1.7× slower: within 2×, a busy moment
    assert costmodel.device_profile("cpu") == REALISTIC
    assert len(counted_measurements.spot_checks) == 1 and len(counted_measurements) == 0


@pytest.mark.parametrize("factor", [1 / 10, 10])
def test_a_cached_profile_off_by_more_than_2x_is_measured_again_and_rewritten(counted_measurements, factor):
    """A profile measured under load (the machine is now 10× faster) or one the machine no longer
    reaches (10× slower, confirmed by a full measurement) is replaced; rates that agree keep the faster."""
    path = costmodel.cache_path(torch.device("cpu"))
    path.write_text(json.dumps(dataclasses.asdict(REALISTIC)))
    now = dataclasses.replace(REALISTIC, matmul_flops_per_s=REALISTIC.matmul_flops_per_s * factor,
                              bandwidth_bytes_per_s=REALISTIC.bandwidth_bytes_per_s * 1.5,
                              call_overhead_s=REALISTIC.call_overhead_s * 1.5, noise=0.1)
    counted_measurements.spot_checked = counted_measurements.measured = now
    profile = costmodel.device_profile("cpu")
    assert len(counted_measurements) == 1
    assert profile.matmul_flops_per_s == now.matmul_flops_per_s  # disagreed by 10×: the new measurement
    assert profile.bandwidth_bytes_per_s == now.bandwidth_bytes_per_s  # agreed: the faster of the two
    assert profile.call_overhead_s == REALISTIC.call_overhead_s  # agreed: the smaller overhead
    assert profile.noise == 0.1
    assert DeviceProfile(**json.loads(path.read_text())) == profile


def test_profiles_compare_by_their_largest_rate_factor():
    assert REALISTIC.disagreement(REALISTIC) == 1
    slower = dataclasses.replace(REALISTIC, elementwise_ops_per_s=REALISTIC.elementwise_ops_per_s / 3,
                                 call_overhead_s=REALISTIC.call_overhead_s * 2)
    assert slower.disagreement(REALISTIC) == REALISTIC.disagreement(slower) == pytest.approx(3)


def test_measuring_the_cpu_gives_positive_rates_and_a_noise_estimate():
    """Shapes and ranges only: how fast this (possibly loaded) machine is belongs to the benchmarks
    (bench/costmodel_validation.py, bench/planning_speed.py), not to a unit test."""
    profile = costmodel.measure_device(torch.device("cpu"))
    rates = (profile.matmul_flops_per_s, profile.bandwidth_bytes_per_s, profile.elementwise_ops_per_s)
    assert all(math.isfinite(rate) and rate > 0 for rate in rates)
    assert 0 < profile.call_overhead_s < 1.0
    assert math.isfinite(profile.noise) and profile.noise >= 0
    assert profile.name


def test_formulas_are_compiled_once_and_evaluate_without_sympy_exactly():
    formula = cost("agent", n_agents=64, selection="kmeans", kmeans_window=9)
    first, used = costmodel.compiled(*formula.terms[:3])
    again = cost("agent", n_agents=64, selection="kmeans", kmeans_window=9)
    assert costmodel.compiled(*again.terms[:3])[0] is first and used == {"B", "H", "Hkv", "N", "M", "d", "e", "dtype_bytes"}
    huge = {"B": 64, "H": 64, "N": 2**16, "d": 128}  # 2^53 FLOPs and more: beyond a float's integers
    exact = 2 * 64 * 64 * 2**16 * 2**16 * 256
    assert costmodel.flops(cost("exact"), huge) == exact and costmodel.flops(cost("exact"), {**huge, "B": 65}) == exact // 64 * 65
    assert costmodel.flops(formula, SHAPE) == int(formula.flops.subs(costmodel._substitutions(SHAPE, torch.float32)))
