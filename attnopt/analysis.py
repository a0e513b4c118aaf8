"""Run one captured graph on the call's real inputs and record what reaches each attention site.

Choosing a variant needs numbers only a real run gives: each site's q, k, v and mask in the
canonical layout (to measure each candidate's error, and to initialise mediators and calibrate
shortcuts), and the FLOPs of the whole graph (so a budget is a fraction of the whole forward,
not of attention alone). `analyse` gets both in one run: every rewritable site is replaced by a
`RecordingAttention` (attnopt's exact op, which keeps its inputs and output) and the graph runs
under FlopCounterMode. The sites were verified to be exact, so this run computes what the
original graph computes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnopt.kernels import exact_attention
from attnopt.passes.detect import SiteMatch
from attnopt.passes.rewrite import rewritten_copy

from attnopt.passes.masking import Masking
from attnopt.passes.site_call import site_call

from .numerics import END_TO_END_TOLERANCE, mismatch, tolerance
from .report import Site
from .variants import SiteInfo, mask_kind_of

FUSED_FORMS = frozenset({"sdpa", "mha", "encoder-layer"})
"""Site forms whose original attention is one fused kernel call."""


@dataclasses.dataclass
class SiteCapture:
    """What one site received on the real inputs, in the canonical (B, H, N, d) layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    causal: bool
    dropout_p: float
    output: torch.Tensor
    """The exact attention output, the reference every candidate's error is measured against."""
    softcap: float | None = None
    sinks: bool = False
    """The site's logit softcap and whether it adds attention-sink logits (passes/masking.py)."""


class RecordingAttention(nn.Module):
    """Exact attention that keeps (detached) the canonical inputs and output of its first call."""

    exact_masking = True  # computes exactly what the site computes (see attnopt.masking)

    def __init__(self) -> None:
        super().__init__()
        self.capture: SiteCapture | None = None

    def forward(self, q, k, v, *, mask=None, scale: float, causal: bool = False, dropout_p: float = 0.0, **masking):
        out = exact_attention(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, **masking)
        if self.capture is None:
            # the candidates see the mask as the reduced variants will (fills as -inf)
            reduced = Masking(mask, **masking).for_reduced_variant()
            self.capture = SiteCapture(q.detach(), k.detach(), v.detach(), None if reduced is None else reduced.detach(),
                                       float(scale), bool(causal), float(dropout_p), out.detach(),
                                       softcap=masking.get("softcap"), sinks=masking.get("sinks") is not None)
        return out


def run_graph(gm: fx.GraphModule, args: tuple[Any, ...], mutated: set[int]) -> Any:
    """Run `gm` on `args` without changing anything the caller can see.

    Inputs the graph writes to in place are cloned first, autograd is off, and the global RNG is
    forked and seeded, so two runs draw the same dropout masks and the user's RNG stream is untouched.
    Tensor inputs are detached: a view of a parameter taken under no_grad still says requires_grad
    (with no grad_fn), which FlopCounterMode's module tracker cannot hook when such a view reaches
    a site module (an attention sink `param.reshape(...).expand(...)`).
    """
    inputs = [(a.detach().clone() if i in mutated else a.detach()) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return gm(*inputs)


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a graph's output (nested tuples, lists and dicts), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flat_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in flat_tensors(item)]
    return []


def graph_outputs_compared(expected: list[torch.Tensor], actual: list[torch.Tensor],
                           exact: bool) -> tuple[str | None, float]:
    """Why a graph's outputs `actual` (flat_tensors) must not stand in for `expected` (None if they
    may) and the largest relative error over the floating ones: another structure, a changed
    integer output, non-finite values where the expected are finite, or (`exact`) an error over
    END_TO_END_TOLERANCE."""
    if len(expected) != len(actual):
        return "end-to-end check failed: the rewritten graph returns a different structure.", math.inf
    errors = []
    for e, a in zip(expected, actual):
        if not e.is_floating_point():
            if not torch.equal(e, a):
                return "end-to-end check failed: an integer output of the graph changed.", math.inf
            continue
        error = mismatch(a, e)
        if not math.isfinite(error) and bool(e.isfinite().all()):
            return "end-to-end check failed: the rewritten graph produced non-finite values.", error
        if exact and error > tolerance(END_TO_END_TOLERANCE, e.dtype):
            return (f"end-to-end check failed: the rewritten graph differs from the original by {error:.2e} "
                    "(relative)."), error
        errors.append(error)
    return None, max(errors, default=0.0)


def facts_of(site: Site, capture: SiteCapture) -> SiteInfo:
    """The site's facts, computed once from its match (form) and the tensors it really received.

    The mask kind is read from the captured mask itself (transformers' (B, 1, N, M) padding mask
    is "key_padding", not a per-query mask); a mask that is exactly causal makes the site causal.
    Logit softcapping and attention sinks are what the site's call passed the exact op.
    """
    q, k, v = capture.q, capture.k, capture.v
    mask_kind = mask_kind_of(capture.mask)
    causal = capture.causal or mask_kind == "causal"
    return SiteInfo(B=q.shape[0], H=q.shape[1], Hkv=k.shape[1], N=q.shape[2], M=k.shape[2], d=q.shape[3],
                    e=v.shape[3], causal=causal, mask_kind="causal" if causal else mask_kind,
                    dropout=capture.dropout_p, dtype=q.dtype, scale=capture.scale, device=q.device.type,
                    fused=site.form in FUSED_FORMS, softcap=capture.softcap, sinks=capture.sinks)


@dataclasses.dataclass
class Analysis:
    """One analysing run of a graph: per-site captures, the facts computed from them, the graph's
    FLOPs and its outputs (what attnopt.sensitivity measures a perturbed run against)."""

    captures: dict[int, SiteCapture]
    facts: dict[int, SiteInfo]
    total_flops: int
    outputs: list[torch.Tensor] = dataclasses.field(default_factory=list)


def analyse(canonical: fx.GraphModule, args: tuple[Any, ...], mutated: set[int],
            sites: list[tuple[Site, SiteMatch]]) -> Analysis:
    """Record every listed site while running a rewritten copy of `canonical` on the real `args`."""
    recorders = {site.id: RecordingAttention() for site, _ in sites}
    work = rewritten_copy(canonical, [(match, site_call(recorders[site.id], match.recipe, site.id),
                                       site.id) for site, match in sites])
    with FlopCounterMode(display=False) as counter:
        outputs = flat_tensors(run_graph(work, args, mutated))
    captures = {site_id: recorder.capture for site_id, recorder in recorders.items() if recorder.capture is not None}
    facts = {site.id: facts_of(site, captures[site.id]) for site, _ in sites if site.id in captures}
    return Analysis(captures, facts, counter.get_total_flops(), [o.detach() for o in outputs])
