"""How far an error at one attention site moves the graph's output: each site's output gain.

The planner picks, under a budget, the plan with the least total error. Summing the sites' own
relative errors treats every site alike, but they are not: in all-MiniLM-L6-v2 the same agent
rewrite costs the sentence embedding 36× more (1 − cosine) at layer 1 than at layer 5
(bench/minilm_sensitivity.py), and a model may scale a block's attention output by a small gate
(DiT's adaLN) before it reaches the output. Measured here, once per site and graph:

    gain = relative error of the graph's outputs / relative error at the site,

with the site's output off by a real candidate's error δ (the probe: that candidate's output
minus the exact one, on the analysed call) and every other site exact. The plan then minimises
Σ gain × error, a first-order estimate of the error of the graph's output (errors of different
sites add at most linearly), and the report shows each site's gain beside its error.

One extra run of the graph per site with a candidate to weigh. A probe whose run makes the
graph's output non-finite where the original's is finite gives an infinite gain: the site is
then kept (attnopt.policies), never rewritten on a guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from attnopt.kernels import exact_attention
from attnopt.passes.rewrite import rewritten_copy
from attnopt.passes.site_call import site_call

from .analysis import Analysis, flat_tensors, graph_outputs_compared, run_graph
from .numerics import output_error


class PerturbedAttention(nn.Module):
    """Exact attention plus a fixed error `delta` (the probe's), on the call it was captured from."""

    exact_masking = True  # computes what the site computes (see attnopt.masking), then adds delta

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = delta

    def forward(self, q, k, v, *, mask=None, scale: float, causal: bool = False, dropout_p: float = 0.0, **masking):
        out = exact_attention(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, **masking)
        if out.shape != self.delta.shape:
            raise ValueError(f"the probe's error has shape {tuple(self.delta.shape)}, the site's output "
                             f"{tuple(out.shape)}")
        return out + self.delta.to(out.dtype)


def graph_output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest relative error over the floating outputs, as the backend's end-to-end check
    measures a plan's output error (analysis.graph_outputs_compared); inf where that check would
    drop the rewrite (non-finite values where the reference is finite, a changed structure)."""
    problem, error = graph_outputs_compared(reference, outputs, exact=False)
    return math.inf if problem is not None else error


def output_gains(request, analysis: Analysis, probes: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """Site id → its output gain (see the module doc), for each site of `request` (a
    policies.GraphRequest) with a probe output; a site whose probe is exact gets none."""
    gains = {}
    for site, match in request.sites:
        probe, capture = probes.get(site.id), analysis.captures.get(site.id)
        if probe is None or capture is None:
            continue
        site_error = output_error(probe, capture.output)
        if not (site_error > 0 and math.isfinite(site_error)):
            continue
        finite_rows = capture.output.isfinite().all(-1, keepdim=True)
        delta = torch.where(finite_rows, probe.to(capture.output.dtype) - capture.output, 0)
        work = rewritten_copy(request.canonical, [(match, site_call(PerturbedAttention(delta), match.recipe, site.id),
                                                   site.id)])
        outputs = flat_tensors(run_graph(work, request.args, request.mutated))
        gains[site.id] = graph_output_error(outputs, analysis.outputs) / site_error
    return gains


__all__ = ["PerturbedAttention", "graph_output_error", "output_gains"]
