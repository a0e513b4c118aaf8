"""The zoo's slow tier: representative transformers model types, built from tiny random-init
configs (tests/zoo/zoo.py), inspected and rewritten exactly; the attention calls that really run
are counted on both sides.

For each (model type, attention implementation): the tiny model builds and runs; inspect and the
exact rewrite do not raise; the rewrite reproduces the original's outputs; every attention call
the original makes either goes through `attnopt::exact_attention` or belongs to a site that
`inspect` reports refused with a reason (none silently missed); and for these types, all known
to be fully rewritten, every call goes through attnopt's op. The whole zoo is
`python tests/zoo/run_zoo.py` (docs/zoo_coverage.md).

LED's and Longformer's encoders compute sliding-window attention on chunks attnopt does not
model (and have no SDPA implementation): each of those calls must be a site reported refused.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from .zoo import IMPLEMENTATIONS, RTOL, measure

pytestmark = pytest.mark.slow

TYPES = ("bert", "gpt2", "llama", "mistral", "qwen2", "t5", "bart", "vit", "clip", "whisper")
FULLY_REWRITTEN = set(TYPES)
"""Types whose every attention call goes through attnopt's op after the exact rewrite."""


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_type", TYPES)
def test_zoo_model_type(model_type: str, implementation: str) -> None:
    r = measure(model_type, implementation)
    where = f"{model_type} ({implementation}, {r.tier} config, {r.inputs})"
    assert r.outcome != "skipped", f"{model_type} ({implementation}) did not build or run: {r.skip_reason}"
    assert not r.errors, f"{where}: {r.errors}"
    assert r.outcome != "WRONG", f"{where}: the exact rewrite differs by {r.max_rel:.3g} > {RTOL:g}"
    assert r.max_rel is not None and r.max_rel <= RTOL, f"{where}: relative error {r.max_rel}"
    assert r.original_attention > 0, f"{where}: the original made no attention call ({r.original})"
    assert r.silently_missed == 0, (
        f"{where}: {r.left_original} original attention call(s) left after the rewrite, "
        f"only {len(r.refused)} site(s) reported refused: {r.refused}; graph breaks {r.graph_breaks}")
    if model_type in FULLY_REWRITTEN:
        assert r.outcome == "all", (
            f"{where}: {r.through_attnopt} of {r.original_attention} attention calls through attnopt's op "
            f"(original {r.original}, rewritten {r.rewritten}); refused {r.refused}")
        assert r.rewritten_sites == r.sites == r.rewritable, f"{where}: sites {r.sites}, rewritten {r.rewritten_sites}"


REFUSED_TYPES = ("led", "longformer")
"""Types with attention attnopt reports refused (sliding-window chunks), once silently missed."""


@pytest.mark.parametrize("model_type", REFUSED_TYPES)
def test_zoo_attention_attnopt_cannot_rewrite_is_reported(model_type: str) -> None:
    r = measure(model_type, "eager")
    where = f"{model_type} (eager, {r.tier} config, {r.inputs})"
    assert r.outcome != "skipped", f"{model_type} did not build or run: {r.skip_reason}"
    assert not r.errors and r.outcome != "WRONG", f"{where}: {r.errors}, relative error {r.max_rel}"
    assert r.left_original > 0 and r.silently_missed == 0, (
        f"{where}: {r.left_original} original attention call(s) left, refused {r.refused}")
    assert all("assembled in a way attnopt does not model" in reason for reason in r.refused), r.refused


VARIANT_TYPES = ("bert", "vit", "whisper", "swin", "siglip", "t5")
"""Encoders, an encoder-decoder with cross-attention, shifted windows, relative position bias."""
NO_SITE_FOR = {("t5", "hybrid")}
"""T5's self-attention adds a relative position bias that differs per query (refused by every
variant here) and hybrid's window means nothing across sequences (its cross-attention)."""
VARIANTS = (("clustered", {"clusters": 3, "top_keys": 3}), ("agent", {"agent_count": 3}),
            ("mediator", {"n_mediators": 3}), ("hybrid", {"window": 3, "sinks": 1}))


@pytest.mark.parametrize("variant, params", VARIANTS, ids=[name for name, _ in VARIANTS])
@pytest.mark.parametrize("model_type", VARIANT_TYPES)
def test_zoo_model_types_rewrite_into_each_approximate_variant(model_type: str, variant: str, params: dict) -> None:
    """`attnopt.rewrite(model, variant, kwargs=...)` on a real architecture (sdpa): no error, finite
    outputs, and every site either takes the variant or is left as softmax with its reason (causal
    decoders, per-query biases and cross-attention are what the variants refuse)."""
    import torch

    import attnopt

    from .zoo import Outcome, _build_and_run, _call, output_tensors

    outcome = Outcome(model_type, "sdpa")
    built = _build_and_run(outcome)
    assert built is not None, f"{model_type} did not build or run: {outcome.skip_reason}"
    model, kwargs, _, _ = built
    torch._dynamo.reset()
    with torch.no_grad():
        rewritten = attnopt.rewrite(model, variant, kwargs=kwargs, inner="eager", **params)
        out = _call(rewritten, kwargs)
    assert all(bool(t.isfinite().all()) for t in output_tensors(out) if t.is_floating_point())
    sites = attnopt.report_of(rewritten).sites
    taken = any(site.decision is not None and site.decision.variant == variant for site in sites)
    assert taken != ((model_type, variant) in NO_SITE_FOR), sites
    for site in sites:
        assert site.decision is not None, f"site {site.id} undecided"
        if site.decision.variant != variant:
            assert site.decision.kept and (site.reason or site.decision.reason), f"site {site.id} kept without a reason"
