"""What is not plain attention is never rewritten wrongly: it is refused with a reason, or not a site.

Three kinds of cases: attention whose weights escape (a site, refused), softmax-shaped code that is
not attention (no rewritable site), and odd-but-valid attention (bound exactly, or refused)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt

from .idioms import BATCH, HEAD_DIM, HEADS, SEQ, bhsd
from .support import assert_outputs_close, relative_error, tensors_of

UNCHANGED_RTOL = 1e-6


def scores_of(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


class WeightsReturned(nn.Module):
    def forward(self, q, k, v):
        weights = scores_of(q, k).softmax(dim=-1)
        return weights @ v, weights


class WeightsStoredOnSelf(nn.Module):
    def forward(self, q, k, v):
        weights = scores_of(q, k).softmax(dim=-1)
        self.last_weights = weights
        return weights @ v


class WeightsReusedForEntropy(nn.Module):
    def forward(self, q, k, v):
        weights = scores_of(q, k).softmax(dim=-1)
        entropy = -(weights * torch.log(weights + 1e-9)).sum(dim=-1, keepdim=True)
        return weights @ v + entropy


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return scores_of(q, k).softmax(dim=-2) @ v


class SoftmaxOverHeads(nn.Module):
    def forward(self, q, k, v):
        return scores_of(q, k).softmax(dim=1) @ v


class ClassifierSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(HEAD_DIM, 5)

    def forward(self, q, k, v):
        return self.head(q).softmax(dim=-1)


class SigmoidAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.sigmoid(scores_of(q, k)) @ v


class ReluAttention(nn.Module):
    def forward(self, q, k, v):
        return F.relu(scores_of(q, k)) @ v / k.shape[-2]


class PerHeadScaleParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_scale = nn.Parameter(torch.rand(1, HEADS, 1, 1) + 0.1)

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * self.head_scale).softmax(dim=-1) @ v


class PerHeadDivisorInput(nn.Module):
    """Inductor's 'tensor factor' case: the divisor is an input, one value per head."""

    def forward(self, q, k, v, divisor):
        return torch.matmul(q, k.transpose(-2, -1)).div(divisor).softmax(dim=-1).matmul(v)


class BatchHeadSwappedKeys(nn.Module):
    """Query (b, h) attends to the keys of (h, b): valid attention, K = k.transpose(0, 1)."""

    def forward(self, q, k, v):
        return (q @ k.permute(1, 0, 3, 2) * HEAD_DIM**-0.5).softmax(dim=-1) @ v


class KeysReshapedNotTransposed(nn.Module):
    """(B, H, M, d) reshaped (not transposed) to (B, H, d, M): valid, but K is scrambled."""

    def forward(self, q, k, v):
        return (q @ k.reshape(k.shape[0], k.shape[1], k.shape[3], k.shape[2]) * HEAD_DIM**-0.5).softmax(dim=-1) @ v


class IntegerMaskAdded(nn.Module):
    """Inductor's unsupported-mask case: an integer tensor added to the scores."""

    def forward(self, q, k, v, mask):
        return torch.softmax(scores_of(q, k) + mask, dim=-1) @ v


class ConstantAdded(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(scores_of(q, k) + 2.0, dim=-1) @ v


class MaskFromScores(nn.Module):
    """The mask depends on the scores themselves."""

    def forward(self, q, k, v):
        scores = scores_of(q, k)
        keep = (scores > scores.mean(dim=-1, keepdim=True)) | torch.eye(scores.shape[-2], scores.shape[-1], dtype=torch.bool)
        return scores.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v


class QueryDependentBias(nn.Module):
    """A relative-position term q·Rᵀ added to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.relative = nn.Parameter(torch.randn(SEQ, HEAD_DIM) * 0.1)

    def forward(self, q, k, v):
        scores = scores_of(q, k) + torch.einsum("bhnd,md->bhnm", q, self.relative)
        return scores.softmax(dim=-1) @ v


class ValuesContractedOverQueries(nn.Module):
    """Weights normalised over keys but contracted over queries: (Wᵀ V), not attention's W V."""

    def forward(self, q, k, v):
        return torch.einsum("bhnm,bhnd->bhmd", scores_of(q, k).softmax(dim=-1), v)


def inputs_with(make_extra):
    """q, k, v and one more input, all drawn after the caller seeds the generator."""
    return lambda: (*bhsd(), make_extra())


def run(model_class, inputs):
    torch.manual_seed(0)
    model, args = model_class().eval(), inputs()
    with torch.no_grad():
        expected = model(*args)
    return model, args, expected


def rewrite_and_run(model, args):
    rewritten = attnopt.rewrite(model, "exact", args=args)
    with torch.no_grad():
        return rewritten, rewritten(*args)


@pytest.mark.parametrize("model_class", [WeightsReturned, WeightsStoredOnSelf, WeightsReusedForEntropy], ids=lambda c: c.__name__)
def test_attention_whose_weights_escape_is_refused_with_a_reason(model_class):
    model, args, expected = run(model_class, bhsd)
    report = attnopt.inspect(model, args)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert not site.rewritable
    assert isinstance(site.reason, str) and site.reason.strip()
    rewritten, actual = rewrite_and_run(model, args)
    assert_outputs_close(actual, expected, rtol=UNCHANGED_RTOL)
    sites = attnopt.report_of(rewritten).sites
    assert sites and all(not site.rewritable and site.decision is None for site in sites), str(attnopt.report_of(rewritten))


NON_KEY_SOFTMAXES = [(SoftmaxOverQueries, 1), (SoftmaxOverHeads, 1), (ClassifierSoftmax, 0)]


@pytest.mark.parametrize("model_class, refused_sites", NON_KEY_SOFTMAXES, ids=[c.__name__ for c, _ in NON_KEY_SOFTMAXES])
def test_softmax_over_a_non_key_dimension_is_not_a_rewritable_site(model_class, refused_sites):
    """A softmax over QKᵀ along another dimension is a site refused with that reason; a
    classifier's softmax is no site at all."""
    model, args, expected = run(model_class, bhsd)
    report = attnopt.inspect(model, args)
    assert len(report.sites) == refused_sites, str(report)
    for site in report.sites:
        assert not site.rewritable and "not over the keys" in site.reason, str(report)
    _, actual = rewrite_and_run(model, args)
    assert_outputs_close(actual, expected, rtol=UNCHANGED_RTOL)


@pytest.mark.parametrize("model_class", [SigmoidAttention, ReluAttention], ids=lambda c: c.__name__)
def test_attention_without_softmax_is_no_site(model_class):
    model, args, expected = run(model_class, bhsd)
    assert attnopt.inspect(model, args).sites == []
    _, actual = rewrite_and_run(model, args)
    assert_outputs_close(actual, expected, rtol=UNCHANGED_RTOL)


def integer_mask():
    return torch.randint(-2, 3, (BATCH, HEADS, SEQ, SEQ), dtype=torch.int32)


# Each case with the outcome it gets: bound exactly ("rewritten"), or left alone with a reason.
UNUSUAL_BUT_VALID = [
    (PerHeadScaleParameter, bhsd, "rewritten"),
    (PerHeadDivisorInput, inputs_with(lambda: torch.rand(HEADS, 1, 1) + 0.5), "rewritten"),
    (BatchHeadSwappedKeys, bhsd, "rewritten"),
    (KeysReshapedNotTransposed, bhsd, "rewritten"),
    (IntegerMaskAdded, inputs_with(integer_mask), "rewritten"),
    (ConstantAdded, bhsd, "rewritten"),
    (MaskFromScores, bhsd, "refused"),
    (QueryDependentBias, bhsd, "rewritten"),
    (ValuesContractedOverQueries, bhsd, "refused"),
]


@pytest.mark.parametrize("model_class, inputs, outcome", UNUSUAL_BUT_VALID, ids=[c.__name__ for c, _, _ in UNUSUAL_BUT_VALID])
def test_unusual_attention_is_rewritten_exactly_or_refused_with_a_reason(model_class, inputs, outcome):
    assert BATCH == HEADS, "BatchHeadSwappedKeys needs as many heads as batch entries"
    model, args, expected = run(model_class, inputs)
    report = attnopt.inspect(model, args)
    assert len(report.sites) == 1, "a softmax over QKᵀ must be reported, if only to say why it is left alone"
    site = report.sites[0]
    if outcome == "rewritten":
        assert site.rewritable, site.reason
    else:
        assert not site.rewritable and isinstance(site.reason, str) and site.reason.strip(), str(report)
    rewritten, actual = rewrite_and_run(model, args)
    assert_outputs_close(actual, expected)
    decisions = [site.decision and site.decision.variant for site in attnopt.report_of(rewritten).sites]
    assert decisions and set(decisions) == ({"exact"} if outcome == "rewritten" else {None}), str(attnopt.report_of(rewritten))


def test_mis_bound_keys_would_change_the_output():
    """Premise of the swapped-keys case: binding K as the plain transpose gives another result."""
    torch.manual_seed(0)
    q, k, v = bhsd()
    correct = BatchHeadSwappedKeys()(q, k, v)
    naive = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(dim=-1) @ v
    assert relative_error(naive, correct) > 0.1
    scrambled = KeysReshapedNotTransposed()(q, k, v)
    assert relative_error(naive, scrambled) > 0.1
    assert all(t.isfinite().all() for t in tensors_of((correct, scrambled)))
