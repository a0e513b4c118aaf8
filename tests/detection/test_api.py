"""The public contract around detection: inputs and outputs pass through, sites are numbered across
graph breaks and point at their code, the model is left alone, reports serialise, the CLI and the
torch.compile backend work."""

from __future__ import annotations

import inspect as pyinspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import attnopt

from .idioms import IDIOMS
from .support import assert_outputs_close, assert_unchanged, merge_heads, snapshot, split_heads

REPO_ROOT = Path(__file__).resolve().parents[2]
WIDTH, HEADS = 32, 2
SITE_FIELDS = {"id", "module", "source", "form", "shape", "causal", "mask", "dropout", "dtype", "rewritable", "reason", "decision"}


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return self.proj(merge_heads(weights @ v))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.attn = SelfAttention()

    def forward(self, x):
        return x + self.attn(self.norm(x))


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.register_buffer("offset", torch.zeros(WIDTH))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x + self.offset


class TwoBlocksWithGraphBreak(TwoBlocks):
    """A data-dependent Python branch between the blocks forces dynamo to split the graph."""

    def forward(self, x):
        x = self.blocks[0](x)
        if x.sum().item() > 0:
            x = x * 0.5
        else:
            x = x - 1.0
        return self.blocks[1](x)


class KeywordAttention(nn.Module):
    """Keyword-only inputs and a dict output."""

    def forward(self, x, *, context=None, bias=None):
        context = x if context is None else context
        q, k, v = split_heads(x, HEADS), split_heads(context, HEADS), split_heads(context, HEADS)
        scores = q @ k.transpose(-2, -1) * 0.2
        if bias is not None:
            scores = scores + bias
        return {"out": merge_heads(scores.softmax(dim=-1) @ v), "context": context}


def tokens(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randn(batch, seq, WIDTH)


def assert_every_site_rewritten_exactly(module, modules: set[str]) -> None:
    """The report of a rewritten or compiled module lists sites of exactly `modules`, each
    rewritten by the exact op: an output equal to the original's then means something."""
    sites = attnopt.report_of(module).sites
    assert {site.module for site in sites} == modules, str(attnopt.report_of(module))
    assert all(site.rewritable and site.decision is not None and site.decision.variant == "exact" for site in sites), \
        str(attnopt.report_of(module))


@pytest.fixture(scope="module")
def two_blocks_report():
    """One inspection of TwoBlocks, shared by the tests that only read its report."""
    torch.manual_seed(0)
    return attnopt.inspect(TwoBlocks().eval(), (tokens(),))


def graph_count(model, *args) -> int:
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=counting_backend)(*args)
    torch._dynamo.reset()
    return len(graphs)


def test_keyword_inputs_reach_the_model_and_the_rewrite():
    model = KeywordAttention()
    x, context, bias = tokens(), tokens(seq=12), torch.randn(1, 1, 8, 12)
    kwargs = {"context": context, "bias": bias}
    report = attnopt.inspect(model, (x,), kwargs)
    assert len(report.sites) == 1 and report.sites[0].rewritable, str(report)
    assert report.sites[0].shape["M"] == 12
    rewritten = attnopt.rewrite(model, "exact", args=(x,), kwargs=kwargs)
    assert_outputs_close(rewritten(x, context=context, bias=bias), model(x, context=context, bias=bias))
    other = {"context": tokens(seq=12), "bias": torch.randn(1, 1, 8, 12)}
    assert_outputs_close(rewritten(x, **other), model(x, **other))
    assert_every_site_rewritten_exactly(rewritten, {""})  # the site is in the root module


@pytest.mark.slow
def test_hugging_face_model_output_comes_back_as_the_same_model_output():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, attn_implementation="sdpa",
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    expected = model(ids)
    rewritten = attnopt.rewrite(model, "exact", args=(ids,))
    actual = rewritten(ids)
    assert_every_site_rewritten_exactly(rewritten, {"encoder.layer.0.attention.self"})
    assert type(actual) is type(expected)
    assert list(actual.keys()) == list(expected.keys())
    assert_outputs_close(actual, expected)
    assert_outputs_close(actual.last_hidden_state, expected.last_hidden_state)


def test_sites_of_several_graphs_are_numbered_uniquely():
    torch.manual_seed(0)
    model = TwoBlocksWithGraphBreak().eval()
    x = tokens() + 3.0
    assert graph_count(model, x) >= 2, "premise: the model must graph-break"
    report = attnopt.inspect(model, (x,))
    assert len(report.sites) == 2, str(report)
    assert len({site.id for site in report.sites}) == 2
    assert all(site.rewritable for site in report.sites)
    assert sorted(site.module for site in report.sites) == ["blocks.0.attn", "blocks.1.attn"]


def test_rewrite_of_a_graph_breaking_model_is_exact_on_both_branches():
    torch.manual_seed(0)
    model = TwoBlocksWithGraphBreak().eval()
    positive, negative = tokens() + 3.0, tokens() - 3.0
    for x, sign in ((positive, 1), (negative, -1)):
        assert sign * model.blocks[0](x).sum().item() > 0, "premise: the inputs take different branches"
    rewritten = attnopt.rewrite(model, "exact", args=(positive,))
    with torch.no_grad():
        for x in (positive, negative):
            assert_outputs_close(rewritten(x), model(x))
    sites = attnopt.report_of(rewritten).sites
    # every compiled graph (grad mode, no_grad recompile, the other branch) has its own records
    assert {site.module for site in sites} == {"blocks.0.attn", "blocks.1.attn"}
    assert len({site.graph for site in sites}) >= 3
    assert all(site.rewritable and site.decision.variant == "exact" for site in sites), str(attnopt.report_of(rewritten))


def test_rewrite_leaves_the_original_model_untouched():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = tokens()
    before = snapshot(model)
    class_forward = type(model).forward
    with torch.no_grad():
        output_before = model(x)
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    with torch.no_grad():
        rewritten(x)
        output_after = model(x)
    assert rewritten is not model
    assert type(model).forward is class_forward
    assert_unchanged(model, before)
    assert torch.equal(output_before, output_after)


def test_rewritten_model_runs_an_attnopt_op_for_every_site():
    """The report's 'exact' decisions are backed by torch.ops.attnopt calls, not an untouched graph."""
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    rewritten(x)  # warm up: compile outside the profile
    with torch.profiler.profile() as profile:
        rewritten(x)
    attnopt_calls = [event.name for event in profile.events() if event.name.startswith("attnopt::")]
    assert attnopt_calls == ["attnopt::exact_attention"] * 2, sorted({event.name for event in profile.events()})


def test_report_to_json_parses_and_lists_every_site_with_its_fields(two_blocks_report):
    report = two_blocks_report
    data = json.loads(report.to_json())
    sites = data["sites"] if isinstance(data, dict) else data
    assert len(sites) == len(report.sites) == 2
    for entry, site in zip(sites, report.sites):
        assert SITE_FIELDS <= set(entry)
        assert entry["id"] == site.id and entry["rewritable"] is True
        assert {"B", "H", "Hkv", "N", "M", "d", "e"} <= set(entry["shape"])


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of a rendered report table (rows start with '│')."""
    return [[cell.strip() for cell in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


def test_report_table_has_one_row_per_site_with_its_id_module_and_form(two_blocks_report):
    report = two_blocks_report
    assert len(report.sites) == 2
    rows = {row[0]: row for row in table_rows(str(report)) if row[0]}
    assert sorted(rows) == sorted(str(site.id) for site in report.sites), str(report)
    for site in report.sites:
        assert rows[str(site.id)][1:3] == [site.module, site.form], str(report)


def test_site_module_and_source_point_at_the_attention_code(two_blocks_report):
    report = two_blocks_report
    assert sorted(site.module for site in report.sites) == ["blocks.0.attn", "blocks.1.attn"]
    lines, first = pyinspect.getsourcelines(SelfAttention.forward)
    for site in report.sites:
        file, _, line = site.source.rpartition(":")
        assert Path(file).name == Path(__file__).name, site.source
        assert first <= int(line) < first + len(lines), site.source


@pytest.mark.slow
def test_cli_inspect_prints_a_table_and_exits_zero(tmp_path):
    factory = tmp_path / "factory_model.py"
    factory.write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn


        class Attention(nn.Module):
            def forward(self, q, k, v):
                return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


        def make():
            return Attention(), tuple(torch.randn(2, 2, 8, 16) for _ in range(3)), {}
    """))
    result = subprocess.run(
        [sys.executable, "-m", "attnopt", "inspect", f"{factory}:make"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "matmul" in result.stdout


@pytest.mark.parametrize("name", ["inductor-01-matmul-div-sqrt", "fused-qkv-unbind", "sdpa-is-causal"])
def test_compile_backend_with_fullgraph_matches_the_original(name):
    model, args, kwargs = IDIOMS[name].make()
    expected = model(*args, **kwargs)
    torch.compile(model, backend="eager", fullgraph=True)(*args, **kwargs)  # premise: fullgraph-capturable
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnopt", fullgraph=True)
    actual = compiled(*args, **kwargs)
    assert_outputs_close(actual, expected)
    sites = attnopt.report_of(compiled).sites
    assert len(sites) == IDIOMS[name].sites, str(attnopt.report_of(compiled))
    assert all(site.decision is not None and site.decision.variant == "exact" for site in sites)


def test_compile_backend_handles_graph_breaks():
    torch.manual_seed(0)
    model = TwoBlocksWithGraphBreak().eval()
    compiled = torch.compile(model, backend="attnopt")
    with torch.no_grad():
        for x in (tokens() + 3.0, tokens() - 3.0):
            assert_outputs_close(compiled(x), model(x))
    assert_every_site_rewritten_exactly(compiled, {"blocks.0.attn", "blocks.1.attn"})
    assert len({site.graph for site in attnopt.report_of(compiled).sites}) >= 2


def test_rewritten_model_stays_exact_on_new_input_shapes():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    rewritten = attnopt.rewrite(model, "exact", args=(tokens(),))
    with torch.no_grad():
        for batch, seq in ((3, 8), (2, 12), (1, 5)):
            x = tokens(batch, seq)
            assert_outputs_close(rewritten(x), model(x))
    assert_every_site_rewritten_exactly(rewritten, {"blocks.0.attn", "blocks.1.attn"})
    shapes = {(site.shape["B"], site.shape["N"]) for site in attnopt.report_of(rewritten).sites}
    assert {(3, 8), (2, 12), (1, 5)} <= shapes, "a new shape ran without a rewritten graph"


def test_inspect_keeps_finding_sites_across_many_instances_of_one_class():
    """Dynamo's recompile limit must not turn later inspections into silent 'no attention'."""
    for _ in range(12):
        model = SelfAttention().eval()
        sites = attnopt.inspect(model, (tokens(),)).sites
        assert len(sites) == 1 and sites[0].rewritable, sites


def test_model_without_attention_has_no_sites_and_rewrites_to_itself():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH)).eval()
    x = tokens()
    assert attnopt.inspect(model, (x,)).sites == []
    assert_outputs_close(attnopt.rewrite(model, "exact", args=(x,))(x), model(x))


class UncapturableAttention(SelfAttention):
    @torch._dynamo.disable
    def forward(self, x):
        return super().forward(x)


def test_a_capture_that_sees_no_graph_is_not_reported_as_free_of_attention():
    model = UncapturableAttention().eval()
    with pytest.raises(attnopt.AttnoptError, match="dynamo ran this call eagerly"):
        attnopt.inspect(model, (tokens(),))
