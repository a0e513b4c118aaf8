"""Regression tests for the transformers-zoo gaps of issue 10, each a spelling of a real model:

- keyword arguments of the ops canonicalize respells (BLOOM's `alibi.baddbmm(batch1=q,
  batch2=k, beta=1.0, alpha=s)` crashed; `torch.where(condition=...)`, `x.where(c, y)`,
  `softmax(x, -1, dtype)` with the dtype passed by position, ...);
- DeBERTa's `scores + 0` before a fill (the mask became an int64 tensor the exact op refused) and
  XSoftmax's zeroing after the softmax (SEW-D), modelled exactly or refused;
- einsum with `...` (LongT5's blocked attention), and attention attnopt cannot rewrite reported,
  not missed (Pegasus-X's concatenated score blocks, MGP-STR's token learner, `add(alpha=)`);
- scales computed from symbolic sizes (`math.sqrt(q.size(-1))` under dynamic shapes): read on
  every call, so two head dims through one compiled graph each get their own scale.

Exact rewrites are compared with the original on fresh inputs (fully masked rows included) to
1e-5 relative in fp32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.passes.canonicalize import _einsum_plan, reciprocal_number

from .idioms import BATCH, HEAD_DIM, HEADS, SEQ, bhsd
from .support import Lambda, assert_outputs_close

LOWEST = torch.finfo(torch.float32).min
SCALE = HEAD_DIM**-0.5


def keep_rows(seed: int) -> torch.Tensor:
    """A bool keep-mask (B, 1, N, N) with random entries, a fully masked and a fully open row."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(BATCH, 1, SEQ, SEQ, generator=generator) < 0.6
    keep[0, 0, 1] = False
    keep[-1, 0, -1] = True
    keep[-1, 0, 2] = False
    return keep


def additive_rows(seed: int) -> torch.Tensor:
    """A float mask (B, 1, N, N): a random bias, finfo.min where keep_rows blocks (whole rows too)."""
    generator = torch.Generator().manual_seed(seed + 100)
    bias = torch.randn(BATCH, 1, SEQ, SEQ, generator=generator)
    return bias.masked_fill(~keep_rows(seed), LOWEST)


def alibi_rows(seed: int) -> torch.Tensor:
    """BLOOM's alibi (B·H, 1, M): a per-head slope times the key position, finfo.min on padded
    keys (batch 1 has every key padded: every row of its heads is fully masked)."""
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)])
    alibi = (slopes[:, None] * torch.arange(SEQ)).repeat(BATCH, 1).reshape(BATCH * HEADS, 1, SEQ)
    padded = torch.rand(BATCH, 1, 1, SEQ, generator=torch.Generator().manual_seed(seed)) < 0.3
    padded[-1] = True
    return alibi.masked_fill(padded.expand(BATCH, HEADS, 1, SEQ).reshape(BATCH * HEADS, 1, SEQ), LOWEST)


def fresh(mask_of, seed: int) -> tuple:
    torch.manual_seed(seed)
    return (*bhsd(), *([mask_of(seed)] if mask_of is not None else []))




def assert_found_and_exact(fn, mask_of=None) -> attnopt.Report:
    """`fn` has one site, rewritten by the exact op, equal to the original on fresh inputs."""
    model = Lambda(fn).eval()
    args = fresh(mask_of, 0)
    rewritten = attnopt.rewrite(model, "exact", args=args, inner="eager")
    with torch.no_grad():
        for seed in (1, 2):
            args = fresh(mask_of, seed)
            assert_outputs_close(rewritten(*args), model(*args), rtol=1e-5)
    report = attnopt.report_of(rewritten)  # a site per graph compiled (grad mode), each rewritten
    assert report.sites and all(site.rewritable and site.decision.variant == "exact" for site in report.sites), \
        [site.reason for site in report.sites]
    assert len({site.source for site in report.sites}) == 1
    return report


def refused_reason(fn, mask_of=None) -> str:
    """The reason of `fn`'s one site, which must be refused (and left as it was)."""
    model = Lambda(fn).eval()
    report = attnopt.inspect(model, fresh(mask_of, 0))
    assert len(report.sites) == 1, str(report)
    assert not report.sites[0].rewritable
    return report.sites[0].reason


def heads_folded(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[-2:])


# ── 1. keyword arguments (BLOOM) ─────────────────────────────────────────────────────────────────


def bloom_attention(q, k, v, alibi):
    """BLOOM's eager attention, spelled as transformers spells it."""
    b, h, n, d = q.shape
    scores = alibi.baddbmm(batch1=heads_folded(q), batch2=heads_folded(k).transpose(-1, -2), beta=1.0, alpha=d**-0.5)
    weights = F.softmax(scores.view(b, h, n, -1), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(weights.view(b * h, n, -1), heads_folded(v))


def baddbmm_all_keywords(q, k, v, alibi):
    scores = torch.baddbmm(input=alibi, batch1=heads_folded(q), batch2=heads_folded(k).transpose(1, 2),
                           beta=0.5, alpha=SCALE)
    return torch.bmm(scores.softmax(-1), heads_folded(v))


def matmul_keywords(q, k, v, keep):
    scores = torch.matmul(input=q, other=k.transpose(-1, -2)) * SCALE
    return torch.matmul(input=scores.masked_fill(mask=~keep, value=float("-inf")).softmax(dim=-1), other=v)


def bmm_keywords(q, k, v):
    scores = torch.bmm(input=heads_folded(q), mat2=heads_folded(k).transpose(1, 2))
    return torch.bmm(input=F.softmax(input=torch.div(input=scores, other=math.sqrt(HEAD_DIM)), dim=-1),
                     mat2=heads_folded(v))


def where_keywords(q, k, v, keep):
    scores = torch.where(condition=keep, input=q @ k.transpose(-1, -2) * SCALE, other=float("-inf"))
    return F.dropout(input=scores.softmax(-1), p=0.1, training=False) @ v


def where_method(q, k, v, keep):
    return torch.softmax((q @ k.transpose(-1, -2) * SCALE).where(keep, LOWEST), -1) @ v


def mul_add_keywords(q, k, v, mask):
    scores = torch.add(input=torch.mul(input=q @ k.transpose(-1, -2), other=SCALE), other=mask)
    return torch.softmax(scores, -1, torch.float64).to(q.dtype) @ v  # dtype by position


def method_softmax_dtype_by_position(q, k, v, mask):
    return (q @ k.transpose(-1, -2) * SCALE + mask).softmax(-1, torch.float64).float() @ v


@pytest.mark.parametrize("fn, mask_of", [
    (bloom_attention, alibi_rows),
    (baddbmm_all_keywords, alibi_rows),
    (matmul_keywords, keep_rows),
    (bmm_keywords, None),
    (where_keywords, keep_rows),
    (where_method, keep_rows),
    (mul_add_keywords, additive_rows),
    (method_softmax_dtype_by_position, additive_rows),
], ids=lambda x: getattr(x, "__name__", None))
def test_ops_called_with_keyword_arguments_are_found_and_rewritten_exactly(fn, mask_of):
    assert_found_and_exact(fn, mask_of)


def test_an_add_with_alpha_on_the_scores_is_reported_not_missed():
    def add_with_alpha(q, k, v, mask):
        return torch.softmax(torch.add(q @ k.transpose(-1, -2) * SCALE, mask, alpha=2.0), -1) @ v

    reason = refused_reason(add_with_alpha, additive_rows)
    assert "`add`" in reason and "alpha" in reason, reason


# ── 2. DeBERTa: `+ 0`, XSoftmax ──────────────────────────────────────────────────────────────────


def plus_zero_then_fill(q, k, v, keep):
    """DeBERTa without relative attention: `rel_att = 0; scores = scores + rel_att`."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + 0
    return scores.masked_fill(~keep, LOWEST).softmax(-1) @ v


def plus_number_then_fill(q, k, v, keep):
    scores = q @ k.transpose(-1, -2) * SCALE + 1.5
    return scores.masked_fill(~keep, LOWEST).softmax(-1) @ v


def int_mask(seed: int) -> torch.Tensor:
    return keep_rows(seed).long()


def xsoftmax(q, k, v, mask):
    """SEW-D's XSoftmax around scaled scores: fill, softmax, zero where filled (in place)."""
    rmask = ~(mask.to(torch.bool))
    scores = (q @ k.transpose(-1, -2) * SCALE).masked_fill(rmask, torch.tensor(LOWEST))
    weights = torch.softmax(scores, -1)
    weights.masked_fill_(rmask, 0)
    return weights @ v


def negation_spelled_twice(q, k, v, keep):
    """-inf fill: the original's fully masked rows are NaN before the zeroing, 0 after it."""
    weights = torch.softmax((q @ k.transpose(-1, -2) * SCALE).masked_fill(~keep, float("-inf")), -1)
    return weights.masked_fill(~keep, 0.0) @ v


def kept_by_where_then_zeroed(q, k, v, keep):
    weights = torch.softmax(torch.where(keep, q @ k.transpose(-1, -2) * SCALE, LOWEST), -1)
    return weights.masked_fill(keep.logical_not(), 0) @ v


@pytest.mark.parametrize("fn, mask_of", [
    (plus_zero_then_fill, keep_rows), (plus_number_then_fill, keep_rows), (xsoftmax, int_mask),
    (negation_spelled_twice, keep_rows), (kept_by_where_then_zeroed, keep_rows),
], ids=lambda x: getattr(x, "__name__", None))
def test_deberta_spellings_are_found_and_rewritten_exactly(fn, mask_of):
    assert_found_and_exact(fn, mask_of)


def test_xsoftmax_rows_with_every_key_masked_give_zero_like_the_original():
    q, k, v, mask = fresh(int_mask, 3)
    rewritten = attnopt.rewrite(Lambda(xsoftmax).eval(), "exact", args=(q, k, v, mask), inner="eager")
    with torch.no_grad():
        out = rewritten(q, k, v, mask)
    assert all(site.decision.variant == "exact" for site in attnopt.report_of(rewritten).sites)
    empty = ~mask.bool().any(-1)  # (B, 1, N): rows with no key
    assert empty.any()
    assert torch.equal(out[empty.expand(-1, HEADS, -1)], torch.zeros_like(out[empty.expand(-1, HEADS, -1)]))


def xsoftmax_after_a_bias(q, k, v, mask):
    bias = q.mean(-1, keepdim=True) * k.mean(-1).unsqueeze(-2)  # data: any value, -inf rows too
    rmask = ~(mask.to(torch.bool))
    weights = torch.softmax((q @ k.transpose(-1, -2) * SCALE + bias).masked_fill(rmask, LOWEST), -1)
    return weights.masked_fill(rmask, 0) @ v


def zeroed_by_another_mask(q, k, v, mask):
    rmask = ~(mask.to(torch.bool))
    weights = torch.softmax((q @ k.transpose(-1, -2) * SCALE).masked_fill(rmask, LOWEST), -1)
    return weights.masked_fill(rmask.transpose(-1, -2), 0) @ v


def zeroed_after_a_small_fill(q, k, v, mask):
    rmask = ~(mask.to(torch.bool))
    weights = torch.softmax((q @ k.transpose(-1, -2) * SCALE).masked_fill(rmask, -1e4), -1)
    return weights.masked_fill(rmask, 0) @ v


def filled_with_a_number_after_softmax(q, k, v, mask):
    rmask = ~(mask.to(torch.bool))
    weights = torch.softmax((q @ k.transpose(-1, -2) * SCALE).masked_fill(rmask, LOWEST), -1)
    return weights.masked_fill(rmask, 0.5) @ v


@pytest.mark.parametrize("fn, words", [
    (xsoftmax_after_a_bias, "other terms"),
    (zeroed_by_another_mask, "not the mask the scores were filled with"),
    (zeroed_after_a_small_fill, "above the lowest"),
    (filled_with_a_number_after_softmax, "not with 0"),
], ids=lambda x: getattr(x, "__name__", None))
def test_weights_filled_after_the_softmax_in_ways_attnopt_cannot_model_are_refused(fn, words):
    reason = refused_reason(fn, int_mask)
    assert "filled after the softmax" in reason and words in reason, reason


# ── 3. einsum with `...` (LongT5), what cannot be rewritten reported (Pegasus-X, MGP-STR) ───────


@pytest.mark.parametrize("equation, x_shape, y_shape", [
    ("...qhd,...khd->...hqk", (2, 3, 4, 5, 6), (2, 3, 7, 5, 6)),
    ("...hqk,...khd->...qhd", (2, 3, 5, 4, 7), (2, 3, 7, 5, 6)),
    ("...nd,...md->...nm", (3, 4, 5), (2, 3, 6, 5)),
    ("b...nd,b...md->b...nm", (2, 3, 4, 5), (2, 3, 6, 5)),
    ("...nd,md->...nm", (2, 3, 4, 5), (6, 5)),
    ("...nd,...md->nm...", (2, 4, 5), (2, 6, 5)),
])
def test_einsum_with_an_ellipsis_is_planned_as_a_matmul_that_computes_it(equation, x_shape, y_shape):
    x, y = torch.randn(x_shape), torch.randn(y_shape)
    x_order, y_order, out_order = _einsum_plan(equation, x.dim(), y.dim())
    torch.testing.assert_close(torch.matmul(x.permute(x_order), y.permute(y_order)).permute(out_order),
                               torch.einsum(equation, x, y))


BLOCKS, BLOCK = 2, SEQ // 2


def longt5_local(q, k, v, bias):
    """LongT5's blocked local attention: (B, blocks, block, H, d), einsum with `...`."""
    def blocks(t):
        return t.transpose(1, 2).reshape(BATCH, BLOCKS, BLOCK, HEADS, HEAD_DIM)

    scores = torch.einsum("...qhd,...khd->...hqk", blocks(q), blocks(k))
    scores += bias
    weights = F.softmax(scores.float(), dim=-1).type_as(scores)
    return torch.einsum("...hqk,...khd->...qhd", weights, blocks(v))


def block_bias(seed: int) -> torch.Tensor:
    """A (B, blocks, H, block, block) bias with -1e10 on masked keys, whole rows too."""
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(BATCH, BLOCKS, HEADS, BLOCK, BLOCK, generator=generator)
    blocked = torch.rand(BATCH, BLOCKS, 1, BLOCK, BLOCK, generator=generator) < 0.3
    blocked[0, 1, 0, 2] = True
    return bias + torch.where(blocked, -1e10, 0.0)


def test_einsum_attention_with_an_ellipsis_is_found_and_rewritten_exactly():
    report = assert_found_and_exact(longt5_local, block_bias)
    assert report.sites[0].form == "einsum"


def pegasus_x_local(q, k, v, mask):
    """Pegasus-X's local attention: scores of two key blocks concatenated, the weights split again."""
    k_global, k_local = k[:, :, :2], k[:, :, 2:]
    v_global, v_local = v[:, :, :2], v[:, :, 2:]
    scores = torch.cat([torch.einsum("BHNF,BHGF->BHNG", q, k_global), q @ k_local.transpose(-1, -2)], dim=-1)
    weights = F.softmax(scores + mask, dim=-1)
    return torch.einsum("BHNG,BHGF->BHNF", weights[..., :2], v_global) + weights[..., 2:] @ v_local


def token_learner(x):
    """MGP-STR's A3 module: a softmax over a 1×1-conv projection weighting the tokens."""
    hidden = x.transpose(1, 2).unsqueeze(-1)
    selected = F.conv2d(hidden, torch.ones(4, x.shape[-1], 1, 1) / x.shape[-1]).flatten(2)
    return torch.einsum("...si,...id->...sd", F.softmax(selected, dim=-1), x)


def test_attention_attnopt_cannot_rewrite_is_reported_with_the_op_it_cannot_pass():
    reason = refused_reason(pegasus_x_local, additive_rows)
    assert "`cat`" in reason, reason
    report = attnopt.inspect(Lambda(token_learner), (torch.randn(BATCH, SEQ, 16),))
    assert len(report.sites) == 1 and not report.sites[0].rewritable
    assert "`conv2d`" in report.sites[0].reason and "projection" in report.sites[0].reason


# ── 4. scales computed from symbolic sizes ────────────────────────────────────────────────────────


def head_dim_scaled(q, k, v):
    return (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).softmax(-1) @ v


def head_dim_scaled_then_biased(q, k, v, bias):
    return (torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1])) + bias).softmax(-1) @ v


def qkv(head_dim: int, n: int, seed: int, bias: bool) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(BATCH, HEADS, n, head_dim, generator=generator) for _ in range(3)]
    if bias:
        tensors.append(torch.randn(BATCH, 1, n, n, generator=generator).masked_fill(
            torch.rand(BATCH, 1, n, n, generator=generator) < 0.3, LOWEST))
    return tuple(tensors)


@pytest.mark.parametrize("fn", [head_dim_scaled, head_dim_scaled_then_biased], ids=lambda f: f.__name__)
@pytest.mark.parametrize("how", ["compile-dynamic", "rewrite"])
def test_a_scale_computed_from_symbolic_sizes_is_read_on_every_call(fn, how, exact_op_calls):
    model = Lambda(fn).eval()
    bias = fn is head_dim_scaled_then_biased
    if how == "compile-dynamic":
        run = torch.compile(model, backend="attnopt", dynamic=True)
    else:  # the wrapper: automatic dynamic shapes make the second size symbolic
        run = attnopt.rewrite(model, "exact", args=qkv(8, 6, 0, bias), inner="eager")
    # head dims 5 and 7 share a size bucket (one analysis for both): a scale frozen at the first
    # call would be wrong for the second
    for head_dim, n, seed in ((8, 6, 1), (5, 7, 2), (7, 7, 3), (16, 4, 4), (5, 7, 5)):
        args = qkv(head_dim, n, seed, bias)
        before = exact_op_calls[0]
        with torch.no_grad():
            assert_outputs_close(run(*args), model(*args), rtol=1e-5)
        assert exact_op_calls[0] > before, f"head dim {head_dim}: the exact op did not run"
    sites = attnopt.report_of(run).sites
    assert sites and all(site.rewritable and site.decision.variant == "exact" for site in sites), \
        [site.reason for site in sites]
    # the sizes of one bucket share one analysis: no call of head dim 5 or 7 needed its own
    # (a frozen scale fails the end-to-end check of the shared graph, which analyses the call anew)
    assert sum(site.shape["d"] in (5, 7) for site in sites) <= 1, [site.shape for site in sites]


@pytest.mark.parametrize("divisor", [2, 3.0, 0, 0.0, -0.0])
def test_dividing_by_a_number_the_graph_computes_is_a_product_with_its_reciprocal_even_by_zero(divisor):
    scores = torch.tensor([1.5, -2.0, 0.0])
    torch.testing.assert_close(scores * reciprocal_number(divisor), scores / divisor, equal_nan=True)


# ── the tiny transformers models themselves (tests/zoo) ──────────────────────────────────────────


@pytest.mark.slow
@pytest.mark.parametrize("model_type, outcome", [
    ("bloom", "all"), ("deberta", "all"), ("longt5", "all"), ("sew-d", "none"), ("pegasus_x", "partial"),
    ("mgp-str", "partial"),
])
def test_the_zoo_types_of_these_gaps_are_rewritten_exactly_or_reported(model_type, outcome):
    pytest.importorskip("transformers")
    from zoo.zoo import RTOL, measure

    r = measure(model_type, "eager")
    assert not r.errors and r.outcome == outcome, (r.outcome, r.errors, r.refused, r.skip_reason)
    assert r.max_rel is not None and r.max_rel <= RTOL
    assert r.silently_missed == 0, (r.left_original, r.refused)
    assert r.through_attnopt == r.rewritable  # each rewritable site's exact op ran once


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bloom", "deberta", "longt5"])
def test_the_tiny_models_are_exact_on_fresh_inputs_with_a_fully_padded_row(model_type):
    pytest.importorskip("transformers")
    from zoo.zoo import build, input_candidates, tiny_configs

    _, config = tiny_configs(model_type)[0]
    model = build(model_type, "eager", config)
    example = next(kwargs for kind, kwargs in input_candidates(model) if kind == "text")  # ids, padding mask
    rewritten = attnopt.rewrite(model, "exact", kwargs=example, inner="eager")
    sites = attnopt.report_of(rewritten).sites
    assert sites and all(site.rewritable and site.decision.variant == "exact" for site in sites), \
        [site.reason for site in sites]
    generator = torch.Generator().manual_seed(1)
    for padded in (3, example["input_ids"].shape[1]):  # some keys, then every key of row 1
        kwargs = dict(example, input_ids=torch.randint(3, 60, example["input_ids"].shape, generator=generator))
        kwargs["attention_mask"] = torch.ones_like(example["attention_mask"])
        kwargs["attention_mask"][1, -padded:] = 0
        with torch.no_grad():
            assert_outputs_close(rewritten(**kwargs), model(**kwargs), rtol=1e-5)
