"""Attention that attnopt cannot capture whole is reported with a reason, never missed silently.

Issue 10's last silent misses in the transformers zoo were LED's and Longformer's encoder
attention: sliding-window chunks whose scores are written into a fresh tensor and whose weights
are padded and re-chunked before the product with values, which no matcher reads. The same
promise covers attention that a dynamo graph break cuts in two: a break between the score
product and the softmax (the softmax's graph gets the scores as an input), or between the
softmax and the product with values (the weights leave the graph at the break). Each is a site
refused with the reason, dynamo's break reason and where it happened included; a softmax that is
not attention (a router, a classifier head), or a graph break elsewhere, gives no such entry.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt

from .support import assert_outputs_close

UNCHANGED_RTOL = 1e-6
BATCH, SEQ, HEADS, HEAD_DIM = 2, 6, 2, 8
WIDTH = HEADS * HEAD_DIM
SPLIT = "attention split by a graph break"
ITEM_BREAK = "Unsupported Tensor.item() call"
LOGGING_BREAK = "logging.Logger method not supported"

log = logging.getLogger(__name__ + ".quiet")
log.addHandler(logging.NullHandler())
log.propagate = False


class BrokenAttention(nn.Module):
    """Multi-head attention with a dynamo graph break `where`: "scores" (a data-dependent branch on
    the padding mask, `.item()`, between the score product and the softmax), "weights" (a log
    call between the softmax and the product with values) or "elsewhere" (a log call after the
    attention)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        if self.where == "scores" and bool((~keep).any().item()):
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        if self.where == "weights":
            log.warning("attention weights computed")
        out = weights @ v
        if self.where == "elsewhere":
            log.warning("attention done")
        return self.out(out.transpose(1, 2).reshape(batch, length, WIDTH))


class RoutedHead(nn.Module):
    """Not attention, with graph breaks around its softmaxes: a router whose softmax weights leave
    the graph at a break before they scale the experts, and a classifier head whose softmax runs
    on logits that come in from before a break and then meet a weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(WIDTH, 4)
        self.experts = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.head = nn.Linear(WIDTH, 5)
        self.embedding = nn.Parameter(torch.randn(5, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x).softmax(dim=-1)
        log.warning("routed")
        mixed = sum(gates[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))
        logits = self.head(mixed)
        log.warning("classified")
        return logits.softmax(dim=-1) @ self.embedding


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Each query attends to the keys at most `window` positions away, computed on a band of
    2·window + 1 scores per query: the full scores are skewed into the band (row i shifted left by
    i), and the band's weights skewed back before the product with values — attention assembled
    through pads, flattenings and slices, as sliding-window implementations do."""
    *lead, length, _ = q.shape
    span = 2 * window + 1
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    padded = F.pad(scores, (window, window), value=float("-inf"))  # column c holds key c - window
    flat = F.pad(padded.flatten(-2), (0, length), value=float("-inf"))
    band = flat[..., : length * (length + 2 * window + 1)].view(*lead, length, length + 2 * window + 1)[..., :span]
    weights = band.softmax(dim=-1)
    spread = F.pad(weights, (0, length + 2 * window + 1 - span)).flatten(-2)[..., : length * (length + 2 * window)]
    full = spread.view(*lead, length, length + 2 * window)[..., window : window + length]
    return full @ v


class BandedAttention(nn.Module):
    def __init__(self, window: int = 2) -> None:
        super().__init__()
        self.window = window
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return banded_attention(q, k, v, self.window).transpose(1, 2).reshape(batch, length, WIDTH)


def padding_keep() -> torch.Tensor:
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[1, -2:] = False
    return keep


def reported_unchanged(model: nn.Module, args: tuple) -> attnopt.Report:
    """The model's inspect report, after checking that its exact rewrite changes no output."""
    model.eval()
    with torch.no_grad():
        expected = model(*args)
        report = attnopt.inspect(model, args)
        rewritten = attnopt.rewrite(model, "exact", args=args)
        actual = rewritten(*args)
    assert_outputs_close(actual, expected, rtol=UNCHANGED_RTOL)
    assert not attnopt.report_of(rewritten).rewritten, str(attnopt.report_of(rewritten))
    return report


def test_a_break_between_the_score_product_and_the_softmax_is_reported():
    report = reported_unchanged(BrokenAttention("scores"), (torch.randn(BATCH, SEQ, WIDTH), padding_keep()))
    assert any(ITEM_BREAK in b for b in report.graph_breaks), report.graph_breaks
    (site,) = report.sites
    assert not site.rewritable and site.reason.startswith(f"{SPLIT} ({ITEM_BREAK}"), site.reason
    assert "test_graph_breaks.py:" in site.reason and "in forward" in site.reason, "where the break happened"
    assert "scores come into this graph as an input" in site.reason
    assert (site.shape["N"], site.shape["M"], site.shape["e"]) == (SEQ, SEQ, HEAD_DIM)


def test_a_break_between_the_softmax_and_the_value_product_is_reported():
    report = reported_unchanged(BrokenAttention("weights"), (torch.randn(BATCH, SEQ, WIDTH), padding_keep()))
    assert any(LOGGING_BREAK in b for b in report.graph_breaks), report.graph_breaks
    (site,) = report.sites
    assert not site.rewritable and site.reason.startswith(f"{SPLIT} ({LOGGING_BREAK}"), site.reason
    assert "test_graph_breaks.py:" in site.reason and "weights leave this graph" in site.reason


def test_a_graph_break_elsewhere_gives_no_split_entry():
    """Ordinary models with graph breaks: the attention is captured whole, and softmaxes that are
    not attention (a router's, a classifier's) are no site, whichever side of a break they are."""
    x = torch.randn(BATCH, SEQ, WIDTH)
    model = BrokenAttention("elsewhere").eval()
    report = attnopt.inspect(model, (x, padding_keep()))
    assert any(LOGGING_BREAK in b for b in report.graph_breaks), report.graph_breaks
    (site,) = report.sites
    assert site.rewritable, site.reason
    with torch.no_grad():
        expected = model(x, padding_keep())
        rewritten = attnopt.rewrite(model, "exact", args=(x, padding_keep()))
        assert_outputs_close(rewritten(x, padding_keep()), expected)
    assert len(attnopt.report_of(rewritten).rewritten) == 1

    report = reported_unchanged(RoutedHead(), (x,))
    assert len(report.graph_breaks) >= 1 and report.graphs >= 3, str(report)
    assert report.sites == [], str(report)


def test_attention_assembled_from_sliding_chunks_is_refused_with_a_reason():
    """A banded attention computed on skewed chunks (the pattern of Longformer's and LED's
    encoders) is a site refused with the ops attnopt does not follow, in one graph."""
    model = BandedAttention(window=2).eval()
    x = torch.randn(BATCH, SEQ, WIDTH)
    # the premise: it is attention, restricted to a band of keys
    q, k, v = model.qkv(x).view(BATCH, SEQ, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    offsets = torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None, :]
    banded = F.scaled_dot_product_attention(q, k, v, attn_mask=offsets.abs() <= 2)
    assert_outputs_close(banded_attention(q, k, v, 2), banded)

    report = reported_unchanged(model, (x,))
    assert report.graph_breaks == [] and report.graphs == 1, str(report)
    (site,) = report.sites
    assert not site.rewritable and "assembled in a way attnopt does not model" in site.reason, site.reason
    assert "`pad`" in site.reason and site.shape == {"M": 5}, str(report)


def test_scores_the_caller_passes_are_not_claimed_as_attention():
    """A softmax of a graph input with no graph break before it: the scores come from the caller,
    not known to be attention, so no site (as before)."""

    class Weighted(nn.Module):
        def forward(self, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return scores.softmax(dim=-1) @ values

    args = (torch.randn(BATCH, HEADS, SEQ, SEQ), torch.randn(BATCH, HEADS, SEQ, HEAD_DIM))
    assert reported_unchanged(Weighted(), args).sites == []
