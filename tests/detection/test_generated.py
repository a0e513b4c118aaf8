"""Hypothesis-generated attention programs: 1–3 attention blocks in sequence, each spelled from
drawn choices (layout, matmul spelling, K transpose, scale, mask, softmax/casts, dropout, clone).
The detector must find exactly the generated sites and rewrite them exactly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import attnopt

from .support import assert_outputs_close, linear64, merge_heads, reference_attention, split_heads

BATCH, HEADS, SEQ, HEAD_DIM = 2, 2, 8, 8
WIDTH = HEADS * HEAD_DIM

LAYOUTS = ("bhsd", "bshd")
SCORE_SPELLINGS = ("@", "torch.matmul", "Tensor.matmul", "einsum", "bmm")
K_TRANSPOSES = ("transpose", "mT", "permute")
SCALES = ("none", "mul", "div", "query", "query-and-key", "tensor")
MASKS = ("none", "float-keys", "float-square-left", "float-inplace", "bool-fill", "bool-where", "causal-tril", "causal-triu")
SOFTMAXES = ("F.softmax", "torch.softmax", "Tensor.softmax", "float-then-cast", "dtype-argument", "manual")
DROPOUTS = ("none", "module", "functional")


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """How one generated attention block is spelled."""

    layout: str
    scores: str
    k_transpose: str
    scale: str
    scale_value: float
    mask: str
    softmax: str
    dropout: str
    clone: bool


site_specs = st.builds(
    SiteSpec,
    layout=st.sampled_from(LAYOUTS),
    scores=st.sampled_from(SCORE_SPELLINGS),
    k_transpose=st.sampled_from(K_TRANSPOSES),
    scale=st.sampled_from(SCALES),
    scale_value=st.sampled_from((HEAD_DIM**-0.5, 0.1, 0.37)),
    mask=st.sampled_from(MASKS),
    softmax=st.sampled_from(SOFTMAXES),
    dropout=st.sampled_from(DROPOUTS),
    clone=st.booleans(),
)
programs = st.lists(site_specs, min_size=1, max_size=3)


def transpose_keys(k: torch.Tensor, how: str) -> torch.Tensor:
    if how == "transpose":
        return k.transpose(-2, -1)
    if how == "mT":
        return k.mT
    return k.permute(0, 1, 3, 2)


class GeneratedProgram(nn.Module):
    """x ↦ x + attention_i(x) for each drawn spec, each block with its own fused projection."""

    def __init__(self, specs: list[SiteSpec]) -> None:
        super().__init__()
        self.specs = list(specs)
        self.projections = nn.ModuleList(nn.Linear(WIDTH, 3 * WIDTH) for _ in specs)
        self.attn_drop = nn.Dropout(0.3)
        for i, spec in enumerate(specs):
            self.register_buffer(f"bias{i}", torch.randn(BATCH, 1, 1, SEQ) if spec.mask == "float-keys" else torch.randn(SEQ, SEQ))
            keep = (torch.rand(1, 1, SEQ, SEQ) > 0.4) | torch.eye(SEQ, dtype=torch.bool)
            self.register_buffer(f"keep{i}", keep)
            self.register_buffer(f"scale{i}", torch.tensor(spec.scale_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, spec in enumerate(self.specs):
            x = x + self.attend(i, spec, x)
        return x

    def attend(self, i: int, spec: SiteSpec, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.reshape(BATCH, SEQ, HEADS, HEAD_DIM) for t in self.projections[i](x).chunk(3, dim=-1))
        if spec.layout == "bhsd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.prescale(spec, q, k)
        if spec.layout == "bshd":
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        scores = self.scores(spec, q, k)
        scores = self.postscale(spec, scores, i)
        scores = self.masked(spec, scores, i)
        weights = self.normalised(spec, scores, x.dtype)
        if spec.dropout == "module":
            weights = self.attn_drop(weights)
        elif spec.dropout == "functional":
            weights = F.dropout(weights, p=0.3, training=self.training)
        if spec.clone:
            weights = weights.clone()
        return merge_heads(self.weighted_values(spec, weights, v))

    @staticmethod
    def prescale(spec, q, k):
        if spec.scale == "query":
            return q * spec.scale_value, k
        if spec.scale == "query-and-key":
            root = math.sqrt(spec.scale_value)
            return q * root, k * root
        return q, k

    def scores(self, spec, q, k):
        if spec.scores == "einsum":
            return torch.einsum("bhnd,bhmd->bhnm", q, k)
        if spec.scores == "bmm":
            q3, k3 = q.reshape(BATCH * HEADS, SEQ, HEAD_DIM), k.reshape(BATCH * HEADS, SEQ, HEAD_DIM)
            return torch.bmm(q3, k3.transpose(1, 2)).view(BATCH, HEADS, SEQ, SEQ)
        kt = transpose_keys(k, spec.k_transpose)
        if spec.scores == "@":
            return q @ kt
        if spec.scores == "torch.matmul":
            return torch.matmul(q, kt)
        return q.matmul(kt)

    def postscale(self, spec, scores, i):
        if spec.scale == "mul":
            return scores * spec.scale_value
        if spec.scale == "div":
            return scores / (1.0 / spec.scale_value)
        if spec.scale == "tensor":
            return scores * getattr(self, f"scale{i}")
        return scores

    def masked(self, spec, scores, i):
        bias, keep = getattr(self, f"bias{i}"), getattr(self, f"keep{i}")
        if spec.mask == "float-keys":
            return scores + bias
        if spec.mask == "float-square-left":
            return bias + scores
        if spec.mask == "float-inplace":
            scores += bias
            return scores
        if spec.mask == "bool-fill":
            return scores.masked_fill(~keep, float("-inf"))
        if spec.mask == "bool-where":
            return torch.where(keep, scores, torch.finfo(scores.dtype).min)
        if spec.mask == "causal-tril":
            return scores.masked_fill(~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), float("-inf"))
        if spec.mask == "causal-triu":
            return scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(diagonal=1), float("-inf"))
        return scores

    @staticmethod
    def normalised(spec, scores, dtype):
        if spec.softmax == "F.softmax":
            return F.softmax(scores, dim=-1)
        if spec.softmax == "torch.softmax":
            return torch.softmax(scores, dim=-1)
        if spec.softmax == "Tensor.softmax":
            return scores.softmax(-1)
        if spec.softmax == "float-then-cast":
            return scores.float().softmax(dim=-1).to(dtype)
        if spec.softmax == "dtype-argument":
            return F.softmax(scores, dim=-1, dtype=torch.float32)
        exps = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        return exps / exps.sum(dim=-1, keepdim=True)

    @staticmethod
    def weighted_values(spec, weights, v):
        if spec.scores == "einsum":
            return torch.einsum("bhnm,bhmd->bhnd", weights, v)
        if spec.scores == "bmm":
            w3, v3 = weights.reshape(BATCH * HEADS, SEQ, SEQ), v.reshape(BATCH * HEADS, SEQ, HEAD_DIM)
            return torch.bmm(w3, v3).view(BATCH, HEADS, SEQ, HEAD_DIM)
        return weights @ v


def program_reference(model: GeneratedProgram, x: torch.Tensor) -> torch.Tensor:
    """The program in float64 from the spec alone, with the fp64 attention oracle."""
    x = x.double()
    for i, spec in enumerate(model.specs):
        q, k, v = (split_heads(t, HEADS) for t in linear64(x, model.projections[i]).chunk(3, dim=-1))
        scale = 1.0 if spec.scale == "none" else spec.scale_value
        mask, causal = None, spec.mask.startswith("causal")
        if spec.mask.startswith("float"):
            mask = getattr(model, f"bias{i}")
        elif spec.mask.startswith("bool"):
            mask = getattr(model, f"keep{i}")
        x = x + merge_heads(reference_attention(q, k, v, scale=scale, mask=mask, causal=causal))
    return x.float()


def masked_spec_count(specs: list[SiteSpec]) -> int:
    return sum(spec.mask != "none" for spec in specs)


def build(specs: list[SiteSpec]) -> tuple[GeneratedProgram, torch.Tensor]:
    torch.manual_seed(0)
    model = GeneratedProgram(specs).eval()
    return model, torch.randn(BATCH, SEQ, WIDTH)


# No shrinking: one shrink of a failing 3-site program costs minutes of compiles. The failing
# example is printed as drawn; re-run it alone to minimise by hand.
GENERATED = settings(
    max_examples=25, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(programs)
def test_generated_program_computes_its_reference(specs):
    model, x = build(specs)
    with torch.no_grad():
        assert_outputs_close(model(x), program_reference(model, x))


# Draws that once failed, run first every time: a 0-dim tensor scale after the bmm view round trip
# (refused as "varies over queries or keys"), and `@` / einsum straight into a softmax written by
# hand with no scale (the respelled matmul had no shape, so the manual softmax was not recognised).
FORMER_FAILURES = [
    [SiteSpec("bshd", "bmm", "permute", "tensor", HEAD_DIM**-0.5, "causal-tril", "manual", "functional", True)],
    [SiteSpec("bhsd", "bmm", "mT", "tensor", 0.1, "float-square-left", "dtype-argument", "module", False)],
    [SiteSpec("bhsd", "@", "transpose", "none", 0.1, "none", "manual", "none", False),
     SiteSpec("bshd", "einsum", "transpose", "none", 0.37, "bool-where", "manual", "module", True)],
]


@pytest.mark.slow
@GENERATED
@given(programs)
@example(FORMER_FAILURES[0])
@example(FORMER_FAILURES[1])
@example(FORMER_FAILURES[2])
def test_detector_finds_exactly_the_generated_sites_and_rewrites_them_exactly(specs):
    torch._dynamo.reset()
    model, x = build(specs)
    with torch.no_grad():
        expected = model(x)
    report = attnopt.inspect(model, (x,))
    assert len(report.sites) == len(specs), str(report)
    assert all(site.rewritable for site in report.sites), str(report)
    assert sum(site.mask is not None or site.causal for site in report.sites) == masked_spec_count(specs), str(report)
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    with torch.no_grad():
        assert_outputs_close(rewritten(x), expected)
    assert all(site.decision is not None and site.decision.variant == "exact" for site in attnopt.report_of(rewritten).sites)


@pytest.mark.parametrize("spelling", SCORE_SPELLINGS)
def test_each_score_spelling_of_the_generator_computes_the_reference(spelling):
    """A fixed, heavily decorated block per spelling, checked whatever hypothesis happens to draw."""
    spec = SiteSpec("bshd", spelling, "mT", "tensor", 0.1, "bool-where", "manual", "functional", True)
    model, x = build([spec])
    with torch.no_grad():
        assert_outputs_close(model(x), program_reference(model, x))
