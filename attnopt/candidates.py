"""Turn a captured site into priced, measured candidates for the planner.

For each variant config: refuse it (with the variant's own sentence) or build its site module
from the captured example, measure its relative error against the exact output at that site,
and price it with its spec's cost formula — predicted seconds, FLOPs and the sequence length
from which it pays off. The site's original attention is the baseline: error 0, priced by the
exact spec's formula — fused when the model called a fused kernel (SDPA, MultiheadAttention),
as three kernels when it wrote the matmuls out — and shown as `report.KEPT` ("softmax").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

from . import costmodel
from .analysis import SiteCapture
from .numerics import output_error
from .planner import Candidate
from .report import KEPT
from .variants import (
    ExactConfig,
    SiteInfo,
    build_site_module,
    refusal,
    spec_for,
    specs,
)

EXACT = spec_for(ExactConfig())
"""The spec whose formula prices the model's own attention."""


def default_candidates(info: SiteInfo) -> list[Any]:
    """The variant configs `optimize` tries at a site when the caller gives none: every registered
    variant's own grid (its spec's `candidates`), in registration order. Measured error then
    decides which of them is faithful enough for this model."""
    return [config for spec in specs() for config in spec.candidates(info)]


class CausalMaskAttention(nn.Module):
    """Calls a variant with causal=True where the site spelled causality as a tril mask.

    Matmul sites hand their causal mask over as a mask only; variants that handle causality
    (linear attention's running sums) need to be told, and still receive the mask for padding.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, q, k, v, *, mask=None, scale: float, causal: bool = False, dropout_p: float = 0.0):
        return self.attention(q, k, v, mask=mask, scale=scale, causal=True, dropout_p=dropout_p)


class KernelCounter(TorchDispatchMode):
    """Counts the aten ops that compute something (views and metadata ops excluded).

    The cost model's per-call term is only honest with the number of kernels a module really
    launches, which its formula can only guess; counting them on the built module measures it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        definition = _maybe_get_opdef(func) if func.namespace == "attnopt" else None
        if definition is not None:  # attnopt's own ops: count the kernels their body launches
            with self:
                return definition._init_fn(*args, **kwargs)
        if not _is_metadata(func):
            self.calls += 1
        return func(*args, **kwargs)


def _is_metadata(func: Any) -> bool:
    return func.is_view or func.__name__.split(".")[0] in _METADATA_OPS


_METADATA_OPS = frozenset({"view", "_unsafe_view", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze",
                           "detach", "alias", "slice", "select", "as_strided", "lift_fresh", "sym_size", "sym_stride",
                           "sym_numel", "empty", "empty_like", "_to_copy_noop", "is_same_size"})


@dataclasses.dataclass
class Evaluated:
    """One candidate at one site: its module (None when refused), planner entry and report row."""

    config: Any
    module: nn.Module | None
    candidate: Candidate | None
    row: dict[str, Any]


def _price(cost: costmodel.CostFormula, info: SiteInfo, device: Any) -> tuple[float, int]:
    """Predicted seconds and FLOPs of one call costing `cost` at the site."""
    return costmodel.estimate_seconds(cost, info.shape, device, info.dtype), costmodel.flops(cost, info.shape)


def baseline(info: SiteInfo, device: Any) -> Evaluated:
    """The site's own softmax attention: error 0, priced by how the model computed it."""
    params = {"fused": info.fused}
    seconds, flops = _price(EXACT.cost(**params), info, device)
    candidate = Candidate(variant=KEPT, params=params, est_seconds=seconds, flops=flops, error=0.0)
    row = {"variant": KEPT, "params": params, "shown": params, "est_seconds": seconds, "flops": flops, "error": 0.0,
           "pays_off_from_N": None, "refused": None}
    return Evaluated(None, None, candidate, row)


def evaluate(config: Any, info: SiteInfo, capture: SiteCapture, device: Any) -> Evaluated:
    """Refuse `config` at the site, or build it from the capture, measure its error and price it."""
    spec = spec_for(config)
    params = dataclasses.asdict(config)
    row: dict[str, Any] = {"variant": spec.name, "params": params, "shown": spec.shown_params(config)}
    reason = refusal(config, info)
    module = None
    if reason is None:
        example = (capture.q, capture.k, capture.v, capture.mask)
        try:
            module = build_site_module(config, info, example)
            if info.causal and not capture.causal:
                module = CausalMaskAttention(module)
            with torch.no_grad(), KernelCounter() as counter:
                output = module(capture.q, capture.k, capture.v, mask=capture.mask, scale=capture.scale,
                                causal=capture.causal, dropout_p=capture.dropout_p)
            error = output_error(output, capture.output)
        except ValueError as refused:  # e.g. too few example queries for the mediators, a mask it cannot follow
            reason, module = str(refused), None
        except RuntimeError as failed:  # e.g. out of memory at this size: the candidate is out, the plan goes on
            reason, module = f"building or running it failed: {type(failed).__name__}: {failed}", None
    if reason is not None:
        return Evaluated(config, None, None, row | {"refused": reason})
    if error == float("inf"):
        return Evaluated(config, None, None, row | {"refused": "it produced non-finite values where softmax attention does not."})
    cost = spec.formula(config, info).with_kernel_calls(counter.calls)
    seconds, flops = _price(cost, info, device)
    pays_off = costmodel.break_even_length(cost, info.shape, device, info.dtype)
    candidate = Candidate(variant=spec.name, params=params, est_seconds=seconds, flops=flops, error=error)
    row |= {"est_seconds": seconds, "flops": flops, "error": error, "pays_off_from_N": pays_off, "refused": None}
    return Evaluated(config, module, candidate, row)


def evaluate_site(info: SiteInfo, capture: SiteCapture, configs: Sequence[Any] | None, device: Any
                  ) -> tuple[Evaluated, list[Evaluated]]:
    """The site's baseline and every candidate config evaluated at it."""
    configs = default_candidates(info) if configs is None else list(configs)
    return baseline(info, device), [evaluate(config, info, capture, device) for config in configs]
