"""Inductor underneath: with `inner="inductor"` what attnopt returns compiles each signature's
graph with Inductor (its ops kept opaque), the default (`"eager"`) never calls it, an Inductor
failure runs the eager graph and says so, a torch.compile on top of attnopt's module works, and
`dynamic=True` finds the static sites."""

from __future__ import annotations

import math

import pytest
import torch
import torch._inductor.compile_fx as inductor_compile_fx
import torch.nn.functional as F
from torch import nn

import attnopt

WIDTH, HEADS = 32, 2


class SdpaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class MatmulBlock(SdpaBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(dim // HEADS)).softmax(-1)
        return x + self.proj((weights @ v).transpose(1, 2).reshape(batch, n, dim))


def tokens(n: int = 8, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, n, WIDTH)


def seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    return BertModel(config, add_pooling_layer=False)


@pytest.fixture(autouse=True)
def forget_dynamic_sizes():
    """Before and after each test, dynamo forgets which sizes it saw change (its automatic-dynamic
    state is kept per code location, nn.Linear.forward's included): compiles of the same code
    elsewhere (earlier test files, this file's dynamic=True tests) would otherwise make a test's
    compiles symbolic from their first call."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def inductor_compiles(count_calls) -> list[int]:
    """How many graphs attnopt handed to Inductor's compile_fx (the real one runs)."""
    return count_calls(inductor_compile_fx, "compile_fx")


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# ── inner="inductor" runs Inductor; the default ("eager") does not ───────────────────────────────────


@pytest.mark.slow
def test_rewrite_compiles_its_graph_with_inductor_and_computes_the_same_function(inductor_compiles):
    model = seeded(MatmulBlock)
    with torch.no_grad():
        rewritten = attnopt.rewrite(model, "exact", args=(tokens(),), inner="inductor")
        assert inductor_compiles[0] == 1
        assert rewritten._attnopt_backend.inner_seconds  # timed
        report = attnopt.report_of(rewritten)
        assert [site.decision.variant for site in report.sites] == ["exact"]
        assert report.notes == []  # Inductor neither failed nor differed
        for _ in range(2):
            fresh = tokens()
            assert_exact(rewritten(fresh), model(fresh))
    assert inductor_compiles[0] == 1  # compiled once per signature


@pytest.mark.slow
def test_torch_compile_with_the_attnopt_backend_runs_inductor(inductor_compiles):
    model = seeded(SdpaBlock)
    compiled = torch.compile(model, backend="attnopt", options={"inner": "inductor"})
    with torch.no_grad():
        for _ in range(2):
            fresh = tokens()
            assert_exact(compiled(fresh), model(fresh))
    assert inductor_compiles[0] == 1
    assert [site.decision.variant for site in attnopt.report_of(compiled).sites] == ["exact"]


@pytest.mark.slow
@pytest.mark.parametrize("variant, params", [("linear", {"feature_map": "elu1"}), ("agent", {"agent_count": 16}),
                                            ("mediator", {"n_mediators": 16})])
def test_variant_graphs_run_under_inductor_as_they_run_eagerly(variant, params, inductor_compiles):
    model, x = seeded(MatmulBlock), tokens(64)
    with torch.no_grad():
        eager = attnopt.rewrite(model, variant, args=(x,), inner="eager", **params)
        fast = attnopt.rewrite(model, variant, args=(x,), inner="inductor", **params)
        fast(x)  # dynamo may have made the sizes dynamic (another test ran the code at other sizes)
        assert inductor_compiles[0] >= 1
        assert attnopt.report_of(fast).notes == []  # Inductor compiled it (its ops opaque where needed)
        assert [site.decision.variant for site in attnopt.report_of(fast).sites] == [variant]
        # the same rewrite, run by Inductor instead of eagerly
        assert_exact(fast(x), eager(x))


class PaddedSdpaBlock(SdpaBlock):
    """SdpaBlock with a key-padding mask: the variants' general (padded) selection paths."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.proj(out.transpose(1, 2).reshape(batch, n, dim))


@pytest.mark.slow
@pytest.mark.parametrize("variant, params", [("agent", {"agent_count": 8}), ("clustered", {"clusters": 8, "top_keys": 16})])
def test_padded_variant_graphs_compile_with_inductor_without_falling_back(variant, params, inductor_compiles):
    """k-means over padded queries counts cluster sizes with a fixed-size op: a torch.bincount
    (its output size depends on the data) made Inductor fail and the graph run eagerly."""
    model, x = seeded(PaddedSdpaBlock), tokens(64)
    mask = (torch.arange(64) < torch.tensor([[64], [40]])).view(2, 1, 1, 64)
    with torch.no_grad():
        eager = attnopt.rewrite(model, variant, args=(x, mask), inner="eager", **params)
        fast = attnopt.rewrite(model, variant, args=(x, mask), inner="inductor", **params)
        fresh = tokens(64)
        out = fast(fresh, mask)
        assert inductor_compiles[0] >= 1
        assert attnopt.report_of(fast).notes == []
        assert [site.decision.variant for site in attnopt.report_of(fast).sites] == [variant]
        assert_exact(out, eager(fresh, mask))


@pytest.mark.parametrize("explicit", [True, False], ids=["inner-eager", "default"])
def test_eager_is_rewrite_s_default_and_never_calls_inductor(monkeypatch, explicit):
    def refuse(*_args, **_kwargs):
        raise AssertionError("inner='eager' must not call Inductor")

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", refuse)
    model = seeded(SdpaBlock)
    with torch.no_grad():
        rewritten = attnopt.rewrite(model, "exact", args=(tokens(),), **({"inner": "eager"} if explicit else {}))
        compiled = torch.compile(model, backend="attnopt", options={"inner": "eager"})
        fresh = tokens()
        assert_exact(rewritten(fresh), model(fresh))
        assert_exact(compiled(fresh), model(fresh))
    assert attnopt.report_of(rewritten).notes == [] and attnopt.report_of(compiled).notes == []


def test_torch_compile_with_the_attnopt_backend_runs_inductor_by_default(inductor_compiles):
    """It stands in for a plain torch.compile(model): the rewritten graph goes to Inductor, and the
    exact rewrite computes what eager and torch.compile(model) compute (no masked rows here; where
    every key of a row is masked, attnopt's op keeps eager's result)."""
    model = seeded(SdpaBlock)
    compiled = torch.compile(model, backend="attnopt")
    plain = torch.compile(model)
    with torch.no_grad():
        fresh = tokens()
        out = compiled(fresh)
        assert inductor_compiles[0] == 1
        assert_exact(out, model(fresh))
        torch.testing.assert_close(out, plain(fresh), rtol=1e-6, atol=1e-6)
    assert attnopt.report_of(compiled).notes == []
    assert [site.decision.variant for site in attnopt.report_of(compiled).sites] == ["exact"]


def test_inspect_never_compiles(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("inspection runs the model once: nothing to compile")

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", refuse)
    assert [site.form for site in attnopt.inspect(seeded(SdpaBlock), (tokens(),)).sites] == ["sdpa"]


def test_an_unknown_inner_is_named():
    with pytest.raises(attnopt.AttnoptError, match="inner must be one of"):
        attnopt.rewrite(seeded(SdpaBlock), "exact", inner="cudagraphs")


# ── Inductor failures never break the model ───────────────────────────────────────────────────


def test_an_inductor_failure_runs_the_eager_graph_and_is_reported(monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("C++ compiler not found\nmore detail")

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", broken)
    model = seeded(SdpaBlock)
    with torch.no_grad():
        rewritten = attnopt.rewrite(model, "exact", args=(tokens(),), inner="inductor")
        fresh = tokens()
        assert_exact(rewritten(fresh), model(fresh))
    report = attnopt.report_of(rewritten)
    assert [site.decision.variant for site in report.sites] == ["exact"]  # the rewrite stands
    assert len(report.notes) == 1
    assert "Inductor failed (RuntimeError: C++ compiler not found)" in report.notes[0]
    assert "runs eagerly" in report.notes[0]
    assert "note: graph 0" in str(report)


def test_an_inductor_backward_failure_runs_the_eager_graph_and_is_reported(monkeypatch):
    """AOTAutograd compiles a backward lazily, at the first backward call, outside the fallback
    around compile_fx: attnopt has it compiled with the forward, so a failing backward compile
    also leaves the graph eager, with the note, instead of raising from loss.backward()."""
    def broken(*_args, **_kwargs):
        raise RuntimeError("backward kernel failed to build")

    monkeypatch.setattr(inductor_compile_fx, "compile_fx_backward", broken)
    model = seeded(SdpaBlock)
    x = tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x,), inner="inductor")
    fresh = tokens()
    rewritten(fresh).square().mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(fresh).square().mean().backward()
    for actual, expected in zip(got, (p.grad for p in model.parameters())):
        assert_exact(actual, expected)
    (note,) = attnopt.report_of(rewritten).notes
    assert "Inductor failed (RuntimeError: backward kernel failed to build)" in note


def test_an_inductor_compile_that_differs_is_refused_and_reported(monkeypatch):
    def wrong(gm, example_inputs, **_kwargs):
        return lambda *args: [t + 1.0 for t in gm(*args)]

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", wrong)
    model = seeded(SdpaBlock)
    with torch.no_grad():
        compiled = torch.compile(model, backend="attnopt", options={"inner": "inductor"})
        fresh = tokens()
        assert_exact(compiled(fresh), model(fresh))
    (note,) = attnopt.report_of(compiled).notes
    assert "Inductor's compile differs from the graph" in note


# ── torch.compile on top of attnopt's module ──────────────────────────────────────────────────


class CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm


class Around(nn.Module):
    """Code before and after a module (straight-line: dynamo cannot resume inside a loop such as
    nn.Sequential's, so a graph break there leaves the whole frame to eager)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.pre, self.inner, self.norm = nn.Linear(WIDTH, WIDTH), inner, nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(self.pre(x)))


def test_torch_compile_on_top_of_a_rewrite_compiles_around_it_and_keeps_the_rewrite():
    model = seeded(MatmulBlock)
    x = tokens()
    with torch.no_grad():
        # a variant: the rewrite changes the output, so it shows whether the rewrite still runs
        rewritten = attnopt.rewrite(model, "linear", args=(x,), inner="eager", feature_map="elu1")
        torch.manual_seed(1)
        outer = Around(rewritten).eval()
        counting = CountingBackend()
        compiled = torch.compile(outer, backend=counting)
        fresh = tokens()
        expected = outer(fresh)
        actual = compiled(fresh)
        # attnopt's rewrite still runs inside (a linear-attention output, not the softmax one)
        torch.testing.assert_close(actual, expected)
        assert not torch.allclose(actual, outer.norm(model(outer.pre(fresh))), atol=1e-4)
        assert counting.graphs == 2  # the code before and after attnopt's module, compiled

        # the module alone: dynamo no longer skips the frame on attnopt's settings patch
        alone = torch.compile(rewritten, backend=CountingBackend())
        torch.testing.assert_close(alone(fresh), rewritten(fresh))
    from torch._dynamo.utils import counters

    assert not any("ConfigModule.patch" in reason for reason in counters["graph_break"])


def test_torch_compile_on_top_of_an_exact_rewrite_gives_the_same_output():
    model = seeded(SdpaBlock)
    with torch.no_grad():
        rewritten = attnopt.rewrite(model, "exact", args=(tokens(),), inner="eager")
        counting = CountingBackend()
        outer = Around(rewritten).eval()
        compiled = torch.compile(outer, backend=counting)
        fresh = tokens()
        assert_exact(compiled(fresh), outer.norm(model(outer.pre(fresh))))
        assert counting.graphs == 2


# ── dynamic=True ──────────────────────────────────────────────────────────────────────────────


def test_dynamic_true_finds_the_static_sites_of_a_small_sdpa_model():
    model = seeded(SdpaBlock)
    static = [site.form for site in attnopt.inspect(model, (tokens(),)).sites]
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"inner": "eager"})
    with torch.no_grad():
        for n in (8, 12):
            fresh = tokens(n)
            assert_exact(compiled(fresh), model(fresh))
    report = attnopt.report_of(compiled)
    assert report.graphs == 1
    assert [site.form for site in report.sites if site.signature == "2x8x32"] == static
    assert all(site.decision.variant == "exact" for site in report.sites)


@pytest.mark.slow
def test_dynamic_true_finds_the_static_sites_of_a_tiny_bert():
    model = seeded(tiny_bert)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    static = attnopt.inspect(model, (ids,), {"attention_mask": mask}).sites
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"inner": "eager"})
    with torch.no_grad():
        actual = compiled(ids, attention_mask=mask).last_hidden_state
        expected = model(ids, attention_mask=mask).last_hidden_state
    assert_exact(actual, expected)
    sites = attnopt.report_of(compiled).sites
    assert [(s.form, s.rewritable) for s in sites] == [(s.form, s.rewritable) for s in static]
    assert len(sites) == 2 and all(site.decision.variant == "exact" for site in sites)


@pytest.mark.slow
def test_a_graph_with_symbolic_sizes_is_compiled_on_the_second_call_of_a_signature(inductor_compiles):
    model = seeded(SdpaBlock)
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"inner": "inductor"})
    with torch.no_grad():
        fresh = tokens(8)
        assert_exact(compiled(fresh), model(fresh))
        assert inductor_compiles[0] == 0  # a signature seen once (a decode step) runs eagerly
        fresh = tokens(8)
        assert_exact(compiled(fresh), model(fresh))
        assert inductor_compiles[0] == 1
        fresh = tokens(8)
        assert_exact(compiled(fresh), model(fresh))
    assert inductor_compiles[0] == 1
    assert attnopt.report_of(compiled).notes == []
