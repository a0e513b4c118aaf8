"""`torch.nn.attention.flex_attention` (issue 10): found with its score_mod and block mask when
attnopt's exact op computes them, rewritten exactly, and otherwise reported with the reason.

torch 2.13 runs flex_attention on CPU (eagerly: its reference, the scores materialised, the
block mask's mask_mod evaluated at every position), so every exact rewrite here is compared with
the model itself on fresh inputs — a later call with another bias, another block mask or other
document ids included — to 1e-5 relative in fp32, and must really call attnopt's exact op.
flex_attention has no backward on CPU, so no gradients are compared."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)

import attnopt

from .support import assert_outputs_close, reference_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, N, D = 2, 2, 32, 8
HQ, HKV = 4, 2


def qkv(seed: int, heads: int = H, kv_heads: int = H, n: int = N) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, n, D, generator=generator)
    k, v = (torch.randn(B, kv_heads, n, D, generator=generator) for _ in range(2))
    return q, k, v


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 8)


def causal_block_mask(n: int = N) -> BlockMask:
    return create_block_mask(causal, None, None, n, n, device="cpu")


class Flex(nn.Module):
    """Calls flex_attention(q, k, v, *extra) through `fn(self, q, k, v, *extra)`."""

    def __init__(self, fn, **parameters: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in parameters.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, *args):
        return self.fn(self, *args)


def flex_site(report: attnopt.Report) -> attnopt.report.Site:
    sites = [site for site in report.sites if site.form == "flex"]
    assert len(sites) == 1, str(report)
    return sites[0]


def rewritten_exactly(model: nn.Module, make_args, exact_op_calls, seeds=(1, 2)) -> tuple[attnopt.Report, nn.Module]:
    """Rewrite on the arguments of seed 0; on each later seed's fresh arguments the rewrite must
    equal the model and run attnopt's exact op. Returns the report and the rewritten module."""
    with torch.no_grad():
        fast = attnopt.rewrite(model, "exact", args=make_args(0))
        report = attnopt.report_of(fast)
        site = flex_site(report)
        assert site.rewritable, site.reason
        assert site.decision is not None and site.decision.variant == "exact"
        for seed in seeds:
            args = make_args(seed)
            before = exact_op_calls[0]
            actual = fast(*args)
            assert exact_op_calls[0] > before, "the exact op did not run"
            assert_outputs_close(actual, model(*args))
    assert not any("flex_attention" in note for note in report.notes), report.notes
    return report, fast


def refused(model: nn.Module, args: tuple, *words: str) -> attnopt.report.Site:
    """The rewrite finds the flex site and refuses it with a reason naming `words` (and
    flex_attention, unless verification refused it), leaving the model's output as it was."""
    with torch.no_grad():
        fast = attnopt.rewrite(model, "exact", args=args)
        assert_outputs_close(fast(*args), model(*args))
    site = flex_site(attnopt.report_of(fast))
    assert not site.rewritable and site.decision is None
    assert site.reason is not None, str(attnopt.report_of(fast))
    assert "flex_attention" in site.reason or site.reason.startswith("verification"), site.reason
    for word in words:
        assert word in site.reason, site.reason
    return site


# ── (a) no score_mod, no block mask ──────────────────────────────────────────────────────────────


def test_plain_flex_attention_is_found_and_rewritten_exactly(exact_op_calls):
    model = Flex(lambda m, q, k, v: flex_attention(q, k, v))
    report, fast = rewritten_exactly(model, qkv, exact_op_calls)
    site = flex_site(report)
    assert site.shape == {"B": B, "H": H, "Hkv": H, "N": N, "M": N, "d": D, "e": D}
    assert site.mask is None and not site.causal
    assert site.scale == pytest.approx(D**-0.5)
    assert "tests/detection/test_flex_attention.py:" in site.source  # the caller's line, not torch's wrapper
    with torch.no_grad():
        assert_outputs_close(fast(*qkv(3)), reference_attention(*qkv(3)))


# ── (b) block masks, given as inputs or made in the forward ──────────────────────────────────────


def test_a_causal_block_mask_given_as_input_is_found_and_a_later_block_mask_too(exact_op_calls):
    model = Flex(lambda m, q, k, v, block_mask: flex_attention(q, k, v, block_mask=block_mask))
    report, fast = rewritten_exactly(model, lambda seed: (*qkv(seed), causal_block_mask()), exact_op_calls)
    site = flex_site(report)
    assert site.causal and site.mask == "causal"
    # another mask_mod: another graph, found and rewritten exactly too
    window = create_block_mask(sliding_window, None, None, N, N, device="cpu", BLOCK_SIZE=8)
    with torch.no_grad():
        for seed in (4, 5):
            before = exact_op_calls[0]
            assert_outputs_close(fast(*qkv(seed), window), model(*qkv(seed), window))
            assert exact_op_calls[0] > before
    sites = attnopt.report_of(fast).sites
    assert len(sites) == 2 and all(site.rewritable for site in sites), str(attnopt.report_of(fast))
    assert [site.mask for site in sites] == ["causal", "boolean"]


def test_a_document_mask_made_in_the_forward_reads_each_calls_document_ids(exact_op_calls):
    def documents(m, q, k, v, doc):
        def same_document(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(same_document, B, None, q.shape[-2], k.shape[-2], device="cpu")
        return flex_attention(q, k, v, block_mask=block_mask)

    def make(seed):
        ids = torch.randint(0, 4, (B, N), generator=torch.Generator().manual_seed(seed + 50))
        return (*qkv(seed), ids.sort(dim=-1).values)

    report, _ = rewritten_exactly(Flex(documents), make, exact_op_calls, seeds=(1, 2, 3))
    assert flex_site(report).mask == "boolean"


def test_rows_the_mask_mod_blocks_entirely_give_zero_as_in_flex_attention(exact_op_calls):
    def some_rows_empty(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx % 4 != 1)

    def fn(m, q, k, v):
        block_mask = create_block_mask(some_rows_empty, None, None, N, N, device="cpu")
        return flex_attention(q, k, v, block_mask=block_mask)

    _, fast = rewritten_exactly(Flex(fn), qkv, exact_op_calls)
    with torch.no_grad():
        out = fast(*qkv(1))
    assert torch.equal(out[:, :, 1::4], torch.zeros_like(out[:, :, 1::4]))
    assert out[:, :, 0::4].abs().min() > 0


class KeepMask(nn.Module):
    """A mask_mod reading a bool keep-mask given as input (rows with no key kept included)."""

    def forward(self, q, k, v, keep):
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: keep[b, q_idx, kv_idx], B, None, N, N, device="cpu")
        return flex_attention(q, k, v, block_mask=block_mask)


def keep_mask(seed: int) -> torch.Tensor:
    keep = torch.rand(B, N, N, generator=torch.Generator().manual_seed(seed + 20)) < 0.6
    keep[0, 3] = False
    return keep


def test_a_mask_mod_reading_a_keep_mask_input_reads_each_calls_mask(exact_op_calls):
    _, fast = rewritten_exactly(KeepMask(), lambda seed: (*qkv(seed), keep_mask(seed)), exact_op_calls)
    with torch.no_grad():
        assert torch.equal(fast(*qkv(1), keep_mask(1))[0, :, 3], torch.zeros(H, D))


def test_verification_refuses_a_flex_rewrite_that_gets_fully_masked_rows_wrong(monkeypatch):
    """Fresh random keep-masks with whole rows blocked: a rewrite giving NaN there (torch.softmax's
    rule) instead of flex_attention's 0 never reaches the model."""
    import dataclasses

    from attnopt.passes import site_call

    right = site_call.flex_masking
    monkeypatch.setattr(site_call, "flex_masking", lambda *a: dataclasses.replace(right(*a), zero_empty_rows=False))
    site = refused(KeepMask(), (*qkv(0), keep_mask(0)))
    assert site.reason.startswith("verification failed")


def test_a_block_mask_whose_blocks_disagree_with_its_mask_mod_follows_the_mask_mod_as_torch_does(exact_op_calls):
    """torch's reference (eager flex_attention, and the captured graph attnopt verifies against)
    reads the mask_mod at every position and never the blocks; the rewrite computes the same."""
    blocks = create_block_mask(sliding_window, None, None, N, N, device="cpu", BLOCK_SIZE=8)
    mismatched = BlockMask.from_kv_blocks(blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks,
                                          blocks.full_kv_indices, BLOCK_SIZE=8, mask_mod=causal, seq_lengths=(N, N))
    model = Flex(lambda m, q, k, v, block_mask: flex_attention(q, k, v, block_mask=block_mask))
    rewritten_exactly(model, lambda seed: (*qkv(seed), mismatched), exact_op_calls)
    q, k, v = qkv(7)
    with torch.no_grad():
        assert_outputs_close(model(q, k, v, mismatched), reference_attention(q, k, v, causal=True))


# ── (c) score_mods adding a bias ─────────────────────────────────────────────────────────────────


def test_a_bias_tensor_given_as_input_is_read_on_every_call(exact_op_calls):
    def fn(m, q, k, v, bias, block_mask):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + bias[b, h, q_idx, kv_idx],
                              block_mask=block_mask)

    def make(seed):
        bias = torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(seed + 10))
        return (*qkv(seed), bias, causal_block_mask())

    report, _ = rewritten_exactly(Flex(fn), make, exact_op_calls)
    site = flex_site(report)
    assert site.mask == "additive" and site.causal


def test_a_bias_parameter_and_relative_positions_are_found_and_rewritten_exactly(exact_op_calls):
    def fn(m, q, k, v):
        table = m.table
        return flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx:
                              s + table[h, q_idx - kv_idx + N - 1] - 0.5 + (q_idx - kv_idx) * 0.01)

    model = Flex(fn, table=torch.randn(H, 2 * N - 1))
    report, _ = rewritten_exactly(model, qkv, exact_op_calls)
    assert flex_site(report).mask == "additive"


def test_relative_positions_alone_are_found_and_rewritten_exactly(exact_op_calls):
    model = Flex(lambda m, q, k, v: flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + (q_idx - kv_idx)))
    rewritten_exactly(model, qkv, exact_op_calls)


def test_a_score_mod_masking_with_minus_inf_is_a_mask(exact_op_calls):
    def fn(m, q, k, v):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx:
                              torch.where(q_idx >= kv_idx, s, -float("inf")))

    report, _ = rewritten_exactly(Flex(fn), qkv, exact_op_calls)
    assert flex_site(report).causal


# ── (d) softcapping ──────────────────────────────────────────────────────────────────────────────


def test_a_tanh_softcap_with_a_bias_and_a_causal_block_mask_is_rewritten_exactly(exact_op_calls):
    def fn(m, q, k, v, block_mask):
        bias = m.bias
        return flex_attention(q, k, v, block_mask=block_mask, score_mod=lambda s, b, h, q_idx, kv_idx:
                              2.0 * torch.tanh(s / 2.0) + bias[h])

    model = Flex(fn, bias=torch.randn(H))
    report, _ = rewritten_exactly(model, lambda seed: (*qkv(seed), causal_block_mask()), exact_op_calls)
    assert flex_site(report).causal


def test_a_softcap_alone_is_rewritten_exactly(exact_op_calls):
    model = Flex(lambda m, q, k, v: flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx:
                                                   30 * torch.tanh(s / 30)))
    rewritten_exactly(model, qkv, exact_op_calls)


# ── (e) scale and grouped-query attention; layouts ───────────────────────────────────────────────


def test_scale_and_enable_gqa_are_found_and_rewritten_exactly(exact_op_calls):
    model = Flex(lambda m, q, k, v: flex_attention(q, k, v, scale=0.3, enable_gqa=True))
    report, _ = rewritten_exactly(model, lambda seed: qkv(seed, HQ, HKV), exact_op_calls)
    site = flex_site(report)
    assert site.scale == pytest.approx(0.3)
    assert (site.shape["H"], site.shape["Hkv"]) == (HQ, HKV)


@pytest.mark.slow
def test_heads_split_from_a_projection_keep_their_layout(exact_op_calls):
    def fn(m, x):
        q, k, v = (t.view(B, x.shape[1], H, D).transpose(1, 2) for t in m.proj(x).chunk(3, dim=-1))
        out = flex_attention(q, k, v, block_mask=create_block_mask(causal, None, None, N, N, device="cpu"))
        return out.transpose(1, 2).reshape(B, x.shape[1], H * D)

    model = Flex(fn)
    model.proj = nn.Linear(H * D, 3 * H * D)
    rewritten_exactly(model, lambda seed: (torch.randn(B, N, H * D, generator=torch.Generator().manual_seed(seed)),),
                      exact_op_calls)


@pytest.mark.slow
def test_another_sequence_length_is_rewritten_exactly_too(exact_op_calls):
    model = Flex(lambda m, q, k, v: flex_attention(q, k, v))
    with torch.no_grad():
        fast = attnopt.rewrite(model, "exact", args=qkv(0))
        for n in (48, 16):
            before = exact_op_calls[0]
            assert_outputs_close(fast(*qkv(n, n=n)), model(*qkv(n, n=n)))
            assert exact_op_calls[0] > before
    assert all(site.rewritable for site in attnopt.report_of(fast).sites), str(attnopt.report_of(fast))


# ── (f) return_lse, kernel options ───────────────────────────────────────────────────────────────


def test_return_lse_with_the_lse_unused_is_rewritten_exactly(exact_op_calls):
    def lse_unused(m, q, k, v):
        out, _ = flex_attention(q, k, v, return_lse=True)
        return out

    rewritten_exactly(Flex(lse_unused), qkv, exact_op_calls)


def test_return_lse_with_the_lse_used_is_refused_with_its_reason():
    site = refused(Flex(lambda m, q, k, v: flex_attention(q, k, v, return_lse=True)), qkv(0), "logsumexp")
    assert site.shape["N"] == N


def test_kernel_options_that_only_tune_the_kernel_are_rewritten_and_prescaling_is_refused(exact_op_calls):
    options = {"BLOCK_M": 16, "BLOCK_N": 16, "fwd_num_warps": 4, "ROWS_GUARANTEED_SAFE": False}
    rewritten_exactly(Flex(lambda m, q, k, v: flex_attention(q, k, v, kernel_options=options)), qkv, exact_op_calls)
    refused(Flex(lambda m, q, k, v: flex_attention(q, k, v, kernel_options={"PRESCALE_QK": True})), qkv(0),
            "PRESCALE_QK")


# ── refused score_mods ───────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("score_mod, words", [
    (lambda s, b, h, q_idx, kv_idx: s * 2, ["`mul`"]),
    (lambda s, b, h, q_idx, kv_idx: s * (h + 1), ["`mul`"]),
    (lambda s, b, h, q_idx, kv_idx: 5.0 * torch.tanh((s + q_idx) / 5.0), ["`mul`"]),
    (lambda s, b, h, q_idx, kv_idx: torch.where(s > 0, s, -float("inf")), ["`where`"]),
    (lambda s, b, h, q_idx, kv_idx: torch.where(q_idx >= kv_idx, s, -1e4), ["other than -inf"]),
    (lambda s, b, h, q_idx, kv_idx: s + s.exp(), ["computed from it"]),
    (lambda s, b, h, q_idx, kv_idx: q_idx - s, ["subtracts the score"]),
    (lambda s, b, h, q_idx, kv_idx: (q_idx - kv_idx).float(), ["replaces it"]),
], ids=["scaled", "per-head-scale", "softcap-of-biased", "score-dependent-mask", "finite-fill", "score-of-score",
        "negated", "constant"])
def test_score_mods_attnopt_cannot_compute_are_reported_with_their_reason(score_mod, words):
    refused(Flex(lambda m, q, k, v: flex_attention(q, k, v, score_mod=score_mod)), qkv(0), *words)


def test_flex_attention_is_never_reported_as_an_unsearched_region():
    model = Flex(lambda m, q, k, v: flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s * 2))
    with torch.no_grad():
        report = attnopt.inspect(model, args=qkv(0))
    assert not report.notes, report.notes
    assert "flex_attention" in flex_site(report).reason
    assert "flex_attention" in report.to_json()
