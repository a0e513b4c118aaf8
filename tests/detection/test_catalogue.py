"""Each idiom of the catalogue is found as one rewritable site and rewritten exactly.

The self-checks (test_idiom_computes_its_reference, …) test the catalogue itself against an fp64
oracle, so a broken idiom shows up there and not as a detector failure."""

from __future__ import annotations

import collections

import contextlib

import pytest
import torch
import torch.nn.functional as F

import attnopt

from .idioms import CATALOGUE, IDIOMS, Idiom
from .support import (
    assert_gradients_close,
    assert_outputs_close,
    gradients,
    reference_attention,
    relative_error,
    tensors_of,
)

REQUIRED_TAGS = {
    # Inductor's hand-written patterns
    *(f"inductor:{n}" for n in range(1, 28)),
    "inductor:prev13", "inductor:prev14", "inductor:prev15", "inductor:checkpoint",
    # spellings of the two matmuls
    "matmul-op", "torch.matmul", "Tensor.matmul", "bmm", "reshape-round-trip", "baddbmm", "scale-alpha", "einsum",
    # layouts and K transposes
    "bhsd", "bshd", "k-transpose", "k-permute", "k-mT",
    # fused projections
    "fused-unbind", "fused-chunk", "fused-split", "fused-index",
    # scales
    "scale-mul", "scale-div", "scale-tensor", "scale-q", "scale-k", "no-scale", "non-default-scale",
    # masks
    "mask-float", "mask-left", "mask-inplace", "mask-bool-masked_fill", "mask-bool-where", "mask-bool-added",
    "causal-tril", "causal-triu", "key-padding", "finfo-min",
    # casts, clone, dropout
    "cast", "half", "bfloat16", "clone", "dropout-eval", "dropout-train",
    # heads and lengths
    "gqa-expand", "gqa-repeat_interleave", "gqa-repeat_kv", "cross",
    # library calls
    "manual-softmax", "sdpa", "sdpa-mask", "sdpa-causal", "sdpa-scale", "sdpa-gqa",
    "mha", "mha-need-weights", "mha-no-weights", "mha-key-padding", "mha-attn-mask",
    "encoder-layer", "encoder-layer-fastpath", "keyword-input", "checkpoint", "flex", "flex-block-mask",
    "flex-score-mod",
}

GRADIENT_IDIOMS = [
    "inductor-18-gpt2-where-finfo-min",
    "einsum-bshd-in-and-out",
    "bert-extended-mask-keyword",
    "gqa-llama-repeat-kv",
    "cross-attention-projected",
    "diffusers-baddbmm-mask-as-input",
    "fused-qkv-chunk",
    "manual-softmax-amax",
    "sdpa-is-causal",
    "mha-key-padding-mask",
]

DETERMINISTIC = [idiom for idiom in CATALOGUE if not idiom.training]
STOCHASTIC = [idiom for idiom in CATALOGUE if idiom.training]
DROPOUT_SAMPLES = 200


def grad_mode(idiom: Idiom):
    return torch.no_grad() if idiom.no_grad else contextlib.nullcontext()


def output_samples(model, args, kwargs, samples: int = DROPOUT_SAMPLES) -> torch.Tensor:
    """The first output tensor of `samples` seeded forward passes, stacked (float64)."""
    torch.manual_seed(1)
    with torch.no_grad():
        return torch.stack([tensors_of(model(*args, **kwargs))[0].double() for _ in range(samples)])


# --- the catalogue itself ----------------------------------------------------------------------


def test_catalogue_has_at_least_forty_idioms_covering_every_required_form():
    covered = set().union(*(idiom.tags for idiom in CATALOGUE))
    assert len(CATALOGUE) >= 40
    assert all(idiom.sites >= 1 for idiom in CATALOGUE), "an idiom without a site tests nothing here"
    assert REQUIRED_TAGS - covered == set()


def test_reference_attention_agrees_with_sdpa():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    bias, keep = torch.randn(2, 1, 5, 7), torch.rand(1, 1, 5, 7) > 0.3
    keep[..., 0] = True
    cases = [
        (dict(scale=0.3, mask=bias), dict(scale=0.3, attn_mask=bias)),
        (dict(mask=keep), dict(attn_mask=keep)),
        (dict(causal=True), dict(is_causal=True)),
    ]
    for ours, sdpa in cases:
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **sdpa)
        assert relative_error(reference_attention(q, k, v, **ours), expected) <= 1e-5


@pytest.mark.parametrize("idiom", CATALOGUE, ids=str)
def test_idiom_computes_its_reference(idiom: Idiom):
    model, args, kwargs = idiom.make()
    model.eval()  # for training idioms the reference is the dropout-free expectation
    with grad_mode(idiom):
        out = model(*args, **kwargs)
    assert_outputs_close(out, idiom.reference(model, args, kwargs), rtol=idiom.rtol)


@pytest.mark.parametrize("idiom", STOCHASTIC, ids=str)
def test_training_idiom_applies_dropout_around_its_reference(idiom: Idiom):
    model, args, kwargs = idiom.make()
    with torch.no_grad():
        first, second = (tensors_of(model(*args, **kwargs))[0] for _ in range(2))
    assert not torch.equal(first, second)
    expected = tensors_of(idiom.reference(model, args, kwargs))[0].double()
    assert relative_error(output_samples(model, args, kwargs).mean(0), expected) < 0.2


# --- detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("idiom", CATALOGUE, ids=str)
def test_inspect_finds_idiom_as_rewritable_site_with_its_fields(idiom: Idiom):
    model, args, kwargs = idiom.make()
    with grad_mode(idiom):
        report = attnopt.inspect(model, args, kwargs)
    assert len(report.sites) == idiom.sites, str(report)
    for site in report.sites:
        assert site.rewritable, site.reason
        assert site.decision is None
        assert {"B", "H", "Hkv", "N", "M", "d", "e"} <= set(site.shape)
        if idiom.form is not None:
            assert site.form == idiom.form
        for key, value in idiom.shape.items():
            assert site.shape[key] == value, f"shape[{key}]"
        if idiom.causal is not None:
            assert site.causal == idiom.causal
        if idiom.masked:
            assert site.mask is not None or site.causal, "the mask was not recorded"
        if idiom.dropout is not None:
            assert site.dropout == pytest.approx(idiom.dropout)
        if idiom.dtype is not None:
            assert idiom.dtype in str(site.dtype)


# --- exact rewriting -------------------------------------------------------------------------------


@pytest.mark.parametrize("idiom", DETERMINISTIC, ids=str)
def test_exact_rewrite_matches_idiom_and_records_exact_decisions(idiom: Idiom):
    model, args, kwargs = idiom.make()
    with grad_mode(idiom):
        expected = model(*args, **kwargs)
        rewritten = attnopt.rewrite(model, "exact", args=args, kwargs=kwargs)
        actual = rewritten(*args, **kwargs)
    assert_outputs_close(actual, expected, rtol=idiom.rtol)
    sites = attnopt.report_of(rewritten).sites
    assert len(sites) == idiom.sites
    assert all(site.decision is not None and site.decision.variant == "exact" for site in sites)


@pytest.mark.parametrize("idiom", STOCHASTIC, ids=str)
def test_exact_rewrite_keeps_dropout_live_and_unbiased(idiom: Idiom):
    model, args, kwargs = idiom.make()
    rewritten = attnopt.rewrite(model, "exact", args=args, kwargs=kwargs)
    with torch.no_grad():
        first, second = (tensors_of(rewritten(*args, **kwargs))[0] for _ in range(2))
    assert not torch.equal(first, second), "dropout was dropped by the rewrite"
    expected = tensors_of(idiom.reference(model, args, kwargs))[0].double()
    original, rewrite = output_samples(model, args, kwargs), output_samples(rewritten, args, kwargs)
    noise = (original.mean(0) - expected).norm()
    bias = (rewrite.mean(0) - expected).norm()
    assert bias <= 2 * noise, f"mean output off by {bias:.3g}; sampling noise is {noise:.3g}"
    spread = rewrite.std(0).mean() / original.std(0).mean()
    assert 0.85 <= spread <= 1.18, f"dropout noise is {spread:.2f}× the original's: another p?"
    sites = attnopt.report_of(rewritten).sites
    # the example ran with grad on, the samples under no_grad: one graph (and site records) each
    per_graph = collections.Counter(site.graph for site in sites)
    assert len(per_graph) == 2 and set(per_graph.values()) == {idiom.sites}, str(attnopt.report_of(rewritten))
    assert all(site.decision is not None and site.decision.variant == "exact" for site in sites)


@pytest.mark.parametrize("name", GRADIENT_IDIOMS)
def test_exact_rewrite_gives_equal_gradients_in_training_mode(name: str):
    idiom = IDIOMS[name]
    model, args, kwargs = idiom.make()
    model.train()
    expected = gradients(model, args, kwargs)
    rewritten = attnopt.rewrite(model, "exact", args=args, kwargs=kwargs)
    actual = gradients(rewritten, args, kwargs)
    assert any(key.startswith("input:") for key in expected)
    assert_gradients_close(actual, expected, rtol=idiom.rtol)
    sites = attnopt.report_of(rewritten).sites  # the gradients are the exact op's, not the original's
    assert set(collections.Counter(site.graph for site in sites).values()) == {idiom.sites}, str(attnopt.report_of(rewritten))
    assert all(site.decision is not None and site.decision.variant == "exact" for site in sites)
