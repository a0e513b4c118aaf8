"""Per-head decisions: some heads of a site exact, the rest a variant (attnopt/variants/heads.py).

The split module must equal running the two groups of heads separately; per-head candidates are
derived from a variant's measured per-head error and priced as the two calls they make; the
planner takes them where the sharp heads are the ones a variant fails on, and the report says
which heads stayed exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import costmodel
from attnopt.analysis import SiteCapture
from attnopt.candidates import evaluate, evaluate_head_split, head_splits
from attnopt.costmodel import DeviceProfile
from attnopt.kernels import exact_attention
from attnopt.numerics import output_error
from attnopt.variants import AgentConfig, HybridConfig, LinearConfig, MediatorConfig, build_site_module
from attnopt.variants.heads import HeadSplit, HeadSplitAttention, per_head_errors, split_sites

from .support import make_site, padding_mask, tensors

PROFILE = DeviceProfile(name="test CPU", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=2e-6)


@pytest.mark.parametrize("H, Hkv, exact_kv", [(4, 4, (0, 2)), (6, 3, (1,)), (8, 2, (1,))])
@pytest.mark.parametrize("masked", [False, True])
def test_a_split_equals_running_its_two_groups_of_heads_separately(H, Hkv, exact_kv, masked):
    site = make_site(H=H, Hkv=Hkv, N=40, M=40)
    q, k, v = tensors(site)
    mask = padding_mask(site.B, site.M, [40, 29]) if masked else None
    split = HeadSplit(LinearConfig(), exact_kv)
    exact_site, rest_site = split_sites(split, site)
    group = H // Hkv
    exact_q = [h for kv in exact_kv for h in range(kv * group, (kv + 1) * group)]
    rest_q = [h for h in range(H) if h not in exact_q]
    rest_kv = [h for h in range(Hkv) if h not in exact_kv]
    variant = build_site_module(LinearConfig(), rest_site, (q[:, rest_q], k[:, rest_kv], v[:, rest_kv], mask))
    module = HeadSplitAttention(variant, split, site)
    out = module(q, k, v, mask=mask, scale=0.25)
    expected_exact = exact_attention(q[:, exact_q], k[:, list(exact_kv)], v[:, list(exact_kv)], mask, scale=0.25)
    expected_rest = variant(q[:, rest_q], k[:, rest_kv], v[:, rest_kv], mask=mask, scale=0.25)
    torch.testing.assert_close(out[:, exact_q], expected_exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, rest_q], expected_rest, rtol=1e-6, atol=1e-6)
    assert exact_site.H + rest_site.H == H and exact_site.Hkv + rest_site.Hkv == Hkv


def _capture(site, seed=0, sharp_heads=()):
    """A capture whose `sharp_heads` attend sharply (large q), the others nearly uniformly."""
    q, k, v = tensors(site, seed)
    q = q * 0.05
    for head in sharp_heads:
        q[:, head] = q[:, head] * 200
    return SiteCapture(q, k, v, None, site.d ** -0.5, False, 0.0, exact_attention(q, k, v, scale=site.d ** -0.5))


def test_per_head_errors_point_at_the_sharp_heads_and_the_split_keeps_them_exact():
    site = make_site(H=4, Hkv=4, N=64, M=64)
    capture = _capture(site, sharp_heads=(2,))
    full = evaluate(LinearConfig(), site, capture, PROFILE)
    shares = per_head_errors(full.module(capture.q, capture.k, capture.v, scale=capture.scale), capture.output, 4)
    assert max(range(4), key=lambda h: shares[h]) == 2
    splits, _ = head_splits(full, site, capture)
    assert splits[0] == HeadSplit(LinearConfig(), (2,))
    derived = evaluate_head_split(splits[0], site, capture, PROFILE)
    assert derived.candidate.error < full.candidate.error / 2
    assert derived.row["shown"]["exact_heads"] == [2]


@pytest.mark.parametrize("config", [LinearConfig(), HybridConfig(window=8, sinks=1), AgentConfig(agent_count=16),
                                    MediatorConfig(n_mediators=16)], ids=["linear", "hybrid", "agent", "mediator"])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_a_split_read_off_the_full_output_equals_the_built_and_run_split(config, Hkv):
    """Heads-independent variants: the error and price measured without building the split are
    those of building and running it, and the module built when the plan takes it computes that
    error."""
    site = make_site(H=4, Hkv=Hkv, N=64, M=64)
    capture = _capture(site, sharp_heads=(1,))
    full = evaluate(config, site, capture, PROFILE)
    splits, output = head_splits(full, site, capture)
    for split in splits:
        run = evaluate_head_split(split, site, capture, PROFILE)
        read = evaluate_head_split(split, site, capture, PROFILE, full=(full, output))
        assert read.candidate.error == pytest.approx(run.candidate.error, rel=1e-5, abs=1e-7)
        assert read.candidate.flops == run.candidate.flops
        assert read.candidate.est_seconds == pytest.approx(run.candidate.est_seconds, rel=0.05)
        assert read.module is None and run.module is not None  # not built until a plan takes it
        with torch.no_grad():
            direct = read.built()(capture.q, capture.k, capture.v, scale=capture.scale)
        assert output_error(direct, capture.output) == pytest.approx(read.candidate.error, rel=1e-5, abs=1e-7)


def test_a_split_is_priced_as_its_two_calls():
    site = make_site(H=4, Hkv=2, N=64, M=64)
    capture = _capture(site, sharp_heads=(0, 1))
    split = HeadSplit(MediatorConfig(n_mediators=8), (0,))
    derived = evaluate_head_split(split, site, capture, PROFILE)
    with torch.no_grad():
        counted = costmodel.count_flops(derived.module, capture.q, capture.k, capture.v, scale=capture.scale)
    assert derived.candidate.flops == counted
    full = evaluate(MediatorConfig(n_mediators=8), site, capture, PROFILE)
    assert full.candidate.flops < derived.candidate.flops


class TwoKindsOfHeads(nn.Module):
    """One SDPA site of 8 heads: heads 0 and 5 attend sharply (scaled-up queries), the rest softly."""

    def __init__(self, sharp=(0, 5)):
        super().__init__()
        self.gain = nn.Parameter(torch.full((1, 8, 1, 1), 0.05), requires_grad=False)
        for head in sharp:
            self.gain.data[0, head] = 8.0

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q * self.gain, k, v)


def test_optimize_keeps_the_sharp_heads_exact_and_says_so():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 512, 16) for _ in range(3))
    model = TwoKindsOfHeads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnopt.BudgetNotMetWarning)
        fast = attnopt.optimize(model, attnopt.Budget(time=0.9, max_error=0.05), args=(q, k, v),
                                candidates=[LinearConfig()], device=PROFILE)
    (site,) = attnopt.report_of(fast).sites
    decision = site.decision
    assert decision.variant == "linear" and {0, 5} <= set(decision.params["exact_heads"]), decision
    assert decision.error <= 0.05
    assert f"heads {decision.params['exact_heads']} exact" in str(attnopt.report_of(fast))
    rows = {tuple(row["params"].get("exact_heads", ())): row for row in decision.candidates if row["variant"] == "linear"}
    assert rows[()]["error"] > 0.05  # linear on every head would not be faithful enough
    assert rows[(0, 5)]["error"] <= 0.05  # keeping just the two sharp heads exact is
    with torch.no_grad():
        out, expected = fast(q, k, v), model(q, k, v)
    assert ((out - expected).norm() / expected.norm()).item() == pytest.approx(decision.error, rel=1e-3)
