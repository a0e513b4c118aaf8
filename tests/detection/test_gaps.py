"""Regression tests for detector gaps that were closed: GQA spelled with flatten, causal reported
only for masks that really are causal, tensor divisors of the scores, `@` straight into a softmax
written by hand, one-element tensor scales after a view round trip, and attention inside the
subgraphs of higher-order ops (torch.utils.checkpoint), searched by the passes directly."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import attnopt
from attnopt.passes.canonicalize import canonicalize
from attnopt.passes.detect import detect, unsearched_regions
from attnopt.passes.fx_utils import op_name
from attnopt.passes.rewrite import rewrite, rewritten_copy
from attnopt.passes.verify import verify
from attnopt.passes.site_call import site_call

from .idioms import BATCH, HEAD_DIM, HEADS, SEQ, bhsd
from .support import Lambda, assert_outputs_close, reference_attention


def inspect_one(fn, *args):
    """The single site attnopt reports for `fn(*args)`, and the exact rewrite's check: equal
    outputs, from the exact op where the site is rewritable and the original code elsewhere."""
    model = Lambda(fn).eval()
    report = attnopt.inspect(model, args)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    with torch.no_grad():
        expected = model(*args)
        rewritten = attnopt.rewrite(model, "exact", args=args)
        actual = rewritten(*args)
    assert_outputs_close(actual, expected)
    (rewritten_site,) = attnopt.report_of(rewritten).sites
    assert rewritten_site.rewritable == site.rewritable
    assert (rewritten_site.decision and rewritten_site.decision.variant) == ("exact" if site.rewritable else None)
    return site


# --- grouped-query attention spelled with unsqueeze + expand + flatten ------------------------------


def gqa_flatten(q, k, v):
    groups = q.shape[1] // k.shape[1]
    k = k.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)
    v = torch.flatten(v[:, :, None].expand(-1, -1, groups, -1, -1), 1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) * HEAD_DIM**-0.5, dim=-1) @ v


def tiled_heads(q, k, v):
    # unsqueeze(1): query head h reads key head h % Hkv — tiling, not grouping: must not be peeled
    groups = q.shape[1] // k.shape[1]
    k = k.unsqueeze(1).expand(-1, groups, -1, -1, -1).flatten(1, 2)
    v = v.unsqueeze(1).expand(-1, groups, -1, -1, -1).flatten(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) * HEAD_DIM**-0.5, dim=-1) @ v


def test_gqa_repeated_by_flatten_is_grouped_with_its_own_key_head_count():
    site = inspect_one(gqa_flatten, *bhsd(heads=4, kv_heads=2))
    assert site.rewritable, site.reason
    assert (site.shape["H"], site.shape["Hkv"]) == (4, 2)


def test_heads_tiled_by_flatten_are_not_mistaken_for_groups():
    q, k, v = bhsd(heads=4, kv_heads=2)
    site = inspect_one(tiled_heads, q, k, v)
    assert site.rewritable, site.reason
    assert (site.shape["H"], site.shape["Hkv"]) == (4, 4)


# --- causal only for a mask that blocks exactly the keys after each query ---------------------------


def filled(keep_of):
    def attend(q, k, v):
        keep = keep_of(q.size(-2), k.size(-2))
        scores = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).masked_fill(~keep, float("-inf"))
        return scores.softmax(dim=-1) @ v

    return attend


def added(bias_of):
    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * HEAD_DIM**-0.5 + bias_of(q.size(-2), k.size(-2)), dim=-1) @ v

    return attend


def ones(n, m):
    return torch.ones(n, m, dtype=torch.bool)


def causal_float(n, m):
    return torch.zeros(n, m).masked_fill(~ones(n, m).tril(), float("-inf"))


CAUSAL_CASES = {
    "tril-keep-filled": (filled(lambda n, m: ones(n, m).tril()), True),
    "triu-blocked-where": (lambda q, k, v: torch.where(
        ones(q.size(-2), k.size(-2)).triu(1), torch.finfo(q.dtype).min,
        q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(-1) @ v, True),
    "tril-float-added": (added(causal_float), True),
    "tril-finfo-min-added": (added(lambda n, m: torch.zeros(n, m).masked_fill(~ones(n, m).tril(), torch.finfo(torch.float32).min)), True),
    "tril-diagonal-1-filled": (filled(lambda n, m: ones(n, m).tril(diagonal=1)), False),
    "tril-diagonal-minus-1-or-first-key": (filled(lambda n, m: ones(n, m).tril(diagonal=-1) | (torch.arange(m) == 0)), False),
    "tril-float-plus-a-bias": (added(lambda n, m: causal_float(n, m) + 0.5), False),
    "tril-bool-filled-is-all-true": (added(lambda n, m: ones(n, m).tril().masked_fill(~ones(n, m).tril(), float("-inf"))), False),
    "tril-of-nonzero-values": (added(lambda n, m: torch.arange(n * m).reshape(n, m).float().div(n * m).tril()), False),
    "tril-blocking-the-past": (added(lambda n, m: torch.full((n, m), -1e9).tril()), False),
    "sdpa-tril-bool": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=ones(q.size(-2), k.size(-2)).tril()), True),
    "sdpa-tril-float": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=causal_float(q.size(-2), k.size(-2))), True),
    "sdpa-tril-diagonal-2": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=ones(q.size(-2), k.size(-2)).tril(2)), False),
}


@pytest.mark.parametrize("name", CAUSAL_CASES)
def test_causal_is_reported_exactly_for_masks_that_block_the_future(name):
    fn, causal = CAUSAL_CASES[name]
    site = inspect_one(fn, *bhsd())
    assert site.rewritable, site.reason
    assert site.causal is causal
    assert site.mask is not None


def test_an_expanded_per_key_mask_is_reported_as_key_padding_not_causal():
    def attend(q, k, v):
        keep = torch.ones(q.size(0), k.size(-2), dtype=torch.bool).tril()  # batch b keeps b + 1 keys
        scores = q @ k.transpose(-2, -1) / 3.0
        return scores.masked_fill((keep == 0).view(q.size(0), 1, 1, -1).expand_as(scores), float("-inf")).softmax(-1) @ v

    site = inspect_one(attend, *bhsd())
    assert site.rewritable, site.reason
    assert (site.mask, site.causal) == ("key_padding", False)


# --- tensor divisors of the scores ---------------------------------------------------------------


def divided(q, k, v, divisor):
    return torch.matmul(q, k.transpose(-2, -1)).div(divisor).softmax(dim=-1).matmul(v)


@pytest.mark.parametrize("shape", [(HEADS, 1, 1), (BATCH, HEADS, 1, 1), (1,)], ids=str)
def test_scores_divided_by_a_per_head_input_are_bound_exactly(shape):
    q, k, v = bhsd()
    divisor = torch.rand(shape) + 0.5
    site = inspect_one(divided, q, k, v, divisor)
    assert site.rewritable, site.reason
    assert_outputs_close(divided(q, k, v, divisor), reference_attention(q / divisor, k, v, scale=1.0))


def test_scores_divided_by_a_per_query_tensor_are_reported_with_a_reason():
    q, k, v = bhsd()
    norm = q.norm(dim=-1, keepdim=True)  # (B, H, N, 1): varies over queries, not a scale
    site = inspect_one(lambda q, k, v, d: (q @ k.transpose(-2, -1) / d).softmax(dim=-1) @ v, q, k, v, norm)
    assert not site.rewritable
    assert "divided" in site.reason


def test_a_hand_written_softmax_over_a_single_query_is_still_a_softmax():
    q, k, v = bhsd(n=1)

    def attend(q, k, v):
        scores = q @ k.transpose(-2, -1)
        exps = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        return (exps / exps.sum(dim=-1, keepdim=True)) @ v

    site = inspect_one(attend, q, k, v)
    assert site.rewritable and site.form == "manual-softmax"


# --- attention inside torch.utils.checkpoint, through the passes ------------------------------------


class SdpaAttention(nn.Module):
    """An exact attention module with the variants' signature, for driving the passes directly."""

    def forward(self, q, k, v, *, mask=None, scale, causal=False, dropout_p=0.0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                              dropout_p=dropout_p, enable_gqa=q.shape[-3] != k.shape[-3])


def attention_bhsd(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).matmul(v)


class CheckpointedBlock(nn.Module):
    """One attention at the top level and one (with a mask) inside a checkpointed function; the
    two graphs both have nodes named `matmul`, `softmax`, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HEAD_DIM, HEAD_DIM)

    def inner(self, q, k, v):
        keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
        scores = (self.proj(q) @ k.transpose(-2, -1) * HEAD_DIM**-0.5).masked_fill(~keep, float("-inf"))
        return scores.softmax(dim=-1) @ v

    def forward(self, q, k, v):
        x = attention_bhsd(q, k, v)
        y = torch.utils.checkpoint.checkpoint(self.inner, x, k, v, use_reentrant=False)
        return y + x


def captured(model, *args) -> tuple[fx.GraphModule, tuple]:
    """The one graph dynamo captures for `model(*args)`, and its inputs (parameters included)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, tuple(example_inputs)))
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def with_meta(gm: fx.GraphModule, args: tuple) -> fx.GraphModule:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    return gm


def body_nodes(gm: fx.GraphModule) -> list[str]:
    bodies = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and isinstance(getattr(gm, n.target), fx.GraphModule)]
    return [op_name(n) or str(n.target) for body in bodies for n in body.graph.nodes]


def test_attention_inside_a_checkpoint_is_found_verified_and_rewritten_exactly_by_the_passes():
    torch.manual_seed(0)
    model = CheckpointedBlock().eval()
    q, k, v = bhsd()
    gm, args = captured(model, q, k, v)
    with torch.no_grad():
        expected = gm(*args)
    original_body = list(body_nodes(gm))
    assert "softmax" in original_body

    work = with_meta(fx.GraphModule(gm, copy.deepcopy(gm.graph)), args)
    canonicalize(work)
    with_meta(work, args)
    assert len(detect(work)) == 1, "without subgraphs only the top-level site is searched"
    assert len(unsearched_regions(work)) == 1 and unsearched_regions(work, subgraphs=True) == []
    matches = detect(work, subgraphs=True)
    assert len(matches) == 2
    inner = matches[1]
    assert inner.output.graph is not work.graph and inner.causal and inner.reason is None
    calls = [site_call(SdpaAttention(), m.recipe, i) for i, m in enumerate(matches)]
    assert [verify(m, call) for m, call in zip(matches, calls)] == [None, None]

    rewritten = rewritten_copy(work, [(m, call, i) for i, (m, call) in enumerate(zip(matches, calls))])
    with torch.no_grad():
        assert_outputs_close(rewritten(*args), expected)
        assert_outputs_close(work(*args), expected)
    assert "softmax" not in body_nodes(rewritten) and "attnopt_site_1" in body_nodes(rewritten)
    assert "softmax" in body_nodes(work), "rewritten_copy changed the module it copied"
    assert body_nodes(gm) == original_body, "canonicalize changed the captured graph's subgraph"

    # rewriting in place gives the same result, gradients included
    rewrite(work, [(m, call, i) for i, (m, call) in enumerate(zip(matches, calls))])
    inputs = [a.detach().clone().requires_grad_(True) for a in args[:3]] + list(args[3:])
    reference = [a.detach().clone().requires_grad_(True) for a in args[:3]] + list(args[3:])
    work(*inputs)[0].sum().backward()
    gm(*reference)[0].sum().backward()
    for a, b in zip(inputs[:3], reference[:3]):
        assert_outputs_close(a.grad, b.grad)


# --- issue 10: list-operand einsum, the row max subtracted first, vmap, softcap and sinks --------------


def test_einsum_with_list_operands_is_found_and_rewritten():
    q, k, v = bhsd()

    def attention(q, k, v):
        scores = torch.einsum("bhnd,bhmd->bhnm", [q, k]) * HEAD_DIM**-0.5
        return torch.einsum("bhnm,bhmd->bhnd", [scores.softmax(-1), v])

    site = inspect_one(attention, q, k, v)
    assert site.rewritable and site.form == "einsum"


@pytest.mark.parametrize("spelling", ["max-values", "amax", "detached"])
def test_subtracting_the_row_max_before_softmax_is_the_same_softmax(spelling):
    q, k, v = bhsd()

    def attention(q, k, v):
        scores = q @ k.transpose(-1, -2) * HEAD_DIM**-0.5
        if spelling == "max-values":
            peak = scores.max(dim=-1, keepdim=True).values
        elif spelling == "amax":
            peak = scores.amax(-1, keepdim=True)
        else:
            peak = scores.max(-1, keepdim=True)[0].detach()
        return torch.softmax(scores - peak, dim=-1) @ v

    assert inspect_one(attention, q, k, v).rewritable


def test_subtracting_another_rows_max_is_not_the_same_softmax():
    q, k, v = bhsd()

    def attention(q, k, v):
        scores = q @ k.transpose(-1, -2)
        return torch.softmax(scores - scores.amax(-2, keepdim=True), dim=-1) @ v  # max over queries

    site = inspect_one(attention, q, k, v)
    assert not site.rewritable


def test_attention_inside_torch_vmap_is_found_and_other_vmapped_code_keeps_its_nesting():
    q, k, v = bhsd()

    def attention(q, k, v):
        doubled = torch.vmap(lambda x: x * 2)(q)  # its nesting calls have unused results
        per_item = torch.vmap(lambda q, k, v: (q @ k.transpose(-1, -2) * 0.25).softmax(-1) @ v)
        return per_item(doubled, k, v)

    assert inspect_one(attention, q, k, v).rewritable


SOFTCAP = 3.0  # small enough that the cap bends random scores


def keep_rows(n=SEQ, m=SEQ, seed=1):
    """A bool keep-mask (B, 1, N, M) with random entries and fully masked rows."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(BATCH, 1, n, m, generator=generator) < 0.6
    keep[0, 0, 1] = False
    keep[-1, 0, -1] = False
    return keep


def additive_rows(n=SEQ, m=SEQ, seed=2):
    """A float mask (B, 1, N, M): 0 or finfo.min, with fully masked rows."""
    return torch.zeros(BATCH, 1, n, m).masked_fill(~keep_rows(n, m, seed), torch.finfo(torch.float32).min)


def softcap_divided(q, k, v, keep):
    scores = torch.tanh(q @ k.transpose(-1, -2) * HEAD_DIM**-0.5 / SOFTCAP) * SOFTCAP
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def softcap_multiplied(q, k, v, bias):
    scores = torch.matmul(q, k.transpose(-2, -1)) * HEAD_DIM**-0.5
    scores = SOFTCAP * torch.tanh(scores * (1.0 / SOFTCAP))
    return torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Sinks(nn.Module):
    """gpt-oss's eager attention: a learned sink logit per head joins the softmax, then is dropped."""

    def __init__(self, slicing: str = "minus-one") -> None:
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(HEADS))
        self.slicing = slicing

    def forward(self, q, k, v, bias):
        scores = q @ k.transpose(2, 3) * HEAD_DIM**-0.5 + bias
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype)
        probs = probs[..., :-1] if self.slicing == "minus-one" else probs[:, :, :, : k.shape[-2]]
        return torch.matmul(F.dropout(probs, p=0.0, training=self.training).to(v.dtype), v)


def sinks_and_softcap(q, k, v, keep):
    scores = torch.tanh(q @ k.transpose(-1, -2) * (HEAD_DIM**-0.5 / SOFTCAP)) * SOFTCAP
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    sink = torch.zeros(*scores.shape[:-1], 1)  # a constant sink: every row also weighs exp(0)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1] @ v


def fresh_inputs(mask_of, seed):
    torch.manual_seed(seed)
    return (*bhsd(), mask_of(seed=seed + 10))


def assert_exact_on_fresh_inputs(model, mask_of):
    """The exact rewrite equals the original on inputs it was not built on, with fully masked rows."""
    args = fresh_inputs(mask_of, 0)
    rewritten = attnopt.rewrite(model, "exact", args=args, inner="eager")
    for seed in (1, 2):
        args = fresh_inputs(mask_of, seed)
        with torch.no_grad():
            assert_outputs_close(rewritten(*args), model(*args), rtol=1e-5)
    return rewritten


SCORE_TRANSFORMS = {
    "softcap, divided, masked after": (lambda: Lambda(softcap_divided), keep_rows, "softcap"),
    "softcap, multiplied, mask added after": (lambda: Lambda(softcap_multiplied), additive_rows, "softcap"),
    "sinks, [..., :-1]": (lambda: Sinks("minus-one"), additive_rows, "sinks"),
    "sinks, [:, :, :, :M]": (lambda: Sinks("keys"), additive_rows, "sinks"),
    "sinks and softcap": (lambda: Lambda(sinks_and_softcap), keep_rows, "both"),
    "softcap of other factors": (lambda: Lambda(softcap_other_factors), keep_rows, "softcap"),
}


@pytest.mark.parametrize("name", list(SCORE_TRANSFORMS))
def test_softcapped_and_sink_scores_are_found_and_rewritten_exactly(name):
    make, mask_of, transform = SCORE_TRANSFORMS[name]
    model = make().eval()
    site = inspect_one(model.forward, *fresh_inputs(mask_of, 0))
    assert site.rewritable, site.reason
    assert_exact_on_fresh_inputs(model, mask_of)


@pytest.mark.parametrize("variant", ["linear", "agent"])
@pytest.mark.parametrize("name", ["softcap, divided, masked after", "sinks, [..., :-1]"])
def test_variants_refuse_softcapped_and_sink_sites_with_the_reason(name, variant):
    make, mask_of, transform = SCORE_TRANSFORMS[name]
    model = make().eval()
    args = fresh_inputs(mask_of, 0)
    rewritten = attnopt.rewrite(model, variant, args=args, inner="eager")
    (site,) = attnopt.report_of(rewritten).sites
    expected = "caps its logits (softcap 3)" if transform == "softcap" else "adds attention-sink logits"
    assert site.decision.variant != variant and f"{expected}, which {variant} does not compute" in site.decision.reason
    with torch.no_grad():
        assert_outputs_close(rewritten(*args), model(*args))


def test_sink_gradients_flow_through_the_exact_rewrite():
    model = Sinks().train()
    args = fresh_inputs(additive_rows, 0)
    rewritten = attnopt.rewrite(copy.deepcopy(model), "exact", args=args, inner="eager")
    rewritten(*args).square().sum().backward()
    model(*args).square().sum().backward()
    (ours,) = [p.grad for p in rewritten.parameters()]
    torch.testing.assert_close(ours, model.sinks.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, dropped", [("sinks, [..., :-1]", "sinks"), ("softcap, divided, masked after", "softcap")])
def test_verification_draws_fully_masked_rows_and_catches_a_dropped_sink_or_cap(name, dropped):
    from attnopt.variants.exact import ExactAttention

    make, mask_of, _ = SCORE_TRANSFORMS[name]
    gm, args = captured(make().eval(), *fresh_inputs(mask_of, 0))
    work = canonicalize(with_meta(fx.GraphModule(gm, copy.deepcopy(gm.graph)), args))
    (match,) = detect(work)
    assert match.reason is None and getattr(match.recipe, dropped) is not None
    assert verify(match, site_call(ExactAttention(), match.recipe, 0)) is None
    wrong = dataclasses.replace(match.recipe, **{dropped: None})
    assert "verification failed" in verify(match, site_call(ExactAttention(), wrong, 0))


def capped_then_masked_before(q, k, v, bias):
    scores = q @ k.transpose(-1, -2) * HEAD_DIM**-0.5 + bias  # the mask goes in before the cap
    return (torch.tanh(scores / SOFTCAP) * SOFTCAP).softmax(-1) @ v


def capped_then_scaled(q, k, v, bias):
    scores = torch.tanh(q @ k.transpose(-1, -2) / SOFTCAP) * SOFTCAP * HEAD_DIM**-0.5
    return (scores + bias).softmax(-1) @ v


def tanh_not_a_cap(q, k, v, bias):
    scores = torch.tanh(q @ k.transpose(-1, -2) / SOFTCAP) * q.norm(dim=-1, keepdim=True)  # per query
    return (scores + bias).softmax(-1) @ v


def softcap_other_factors(q, k, v, keep):
    # 2·tanh(s / 3) is a softcap 2 of the scores scaled by 2/3
    scores = (torch.tanh(q @ k.transpose(-1, -2) / SOFTCAP) * 2.0).masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


def sink_column_kept(q, k, v, bias):
    scores = q @ k.transpose(-1, -2) + bias
    logits = torch.cat([scores, torch.zeros(*scores.shape[:-1], 1)], dim=-1)
    return torch.softmax(logits, dim=-1)[..., 1:] @ v  # drops the first key, not the sink


@pytest.mark.parametrize("fn, words", [
    (capped_then_masked_before, "before their tanh softcap"),
    (capped_then_scaled, "softcapped scores are multiplied"),
    (tanh_not_a_cap, "`tanh`"),
    (sink_column_kept, "does not drop that column"),
])
def test_score_transforms_attnopt_cannot_express_are_reported_with_a_reason(fn, words):
    site = inspect_one(fn, *fresh_inputs(additive_rows, 0))
    assert not site.rewritable and words in site.reason, site.reason


def tiny_transformers_model(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    if kind == "gemma2":
        config = transformers.Gemma2Config(**common, attn_logit_softcapping=5.0, final_logit_softcapping=None,
                                           sliding_window=4, query_pre_attn_scalar=8)
        model_type = transformers.Gemma2ForCausalLM
    else:
        if not hasattr(transformers, "GptOssConfig"):
            pytest.skip("transformers has no GptOss")
        config = transformers.GptOssConfig(**common, num_local_experts=2, num_experts_per_tok=1, sliding_window=4)
        model_type = transformers.GptOssForCausalLM
    config._attn_implementation = "eager"
    model = model_type(config).eval()
    if kind == "gpt-oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()  # zeros at init: random sinks show they matter
    return model


@pytest.mark.parametrize("kind, transform", [("gemma2", "softcap"), ("gpt-oss", "sinks")])
def test_tiny_transformers_models_with_softcap_or_sinks_are_rewritten_exactly(kind, transform):
    model = tiny_transformers_model(kind)
    ids = torch.randint(0, 64, (2, 7))
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, :3] = 0  # left padding: the padded queries see no key at all
    rewritten = attnopt.rewrite(model, "exact", args=(ids,), kwargs=dict(attention_mask=padding), inner="eager")
    sites = attnopt.report_of(rewritten).sites
    assert len(sites) == 2 and all(site.rewritable for site in sites), [site.reason for site in sites]
    assert all(site.decision.variant == "exact" for site in sites)
    with torch.no_grad():
        for seed in (1, 2):
            ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
            expected = model(ids, attention_mask=padding).logits
            assert_outputs_close(rewritten(ids, attention_mask=padding).logits, expected, rtol=1e-5)
    refused = attnopt.rewrite(model, "linear", args=(ids,), kwargs=dict(attention_mask=padding), inner="eager")
    words = "caps its logits" if transform == "softcap" else "adds attention-sink logits"
    assert all(words in site.decision.reason for site in attnopt.report_of(refused).sites)


def test_a_softmax_over_a_matmul_that_feeds_no_value_matmul_is_not_attention():
    x, w = torch.randn(4, 8, 16), torch.randn(16, 6)

    def router(x):
        return torch.tanh(x @ w).softmax(-1).topk(2, dim=-1).values

    assert attnopt.inspect(Lambda(router), (x,)).sites == []
