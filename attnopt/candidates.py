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
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

from attnopt.kernels import exact_attention

from . import costmodel
from .analysis import SiteCapture
from .numerics import output_error
from .planner import Candidate, never_chosen
from .report import KEPT
from .variants import (
    ExactConfig,
    SiteInfo,
    build_site_module,
    refusal,
    spec_for,
    specs,
)
from .variants.heads import (
    HeadSplit,
    HeadSplitAttention,
    head_indices,
    per_head_errors,
    select_heads,
    split_sites,
)

EXACT = spec_for(ExactConfig())
"""The spec whose formula prices the model's own attention."""


def default_candidates(info: SiteInfo, calibrated: bool = False) -> list[Any]:
    """The variant configs `optimize` tries at a site when the caller gives none: every registered
    variant's own grid (its spec's `candidates`), in registration order. Measured error then
    decides which of them is faithful enough for this model.

    With calibration data (`calibrated`), a spec whose `candidates` takes a `calibrated` keyword
    is asked with calibrated=True: it may add configs only calibration makes worth trying (linear
    attention's learned feature map)."""
    return [config for spec in specs() for config in (
        spec.candidates(info, calibrated=True) if calibrated and _takes_calibrated(spec.candidates)
        else spec.candidates(info))]


def _takes_calibrated(function: Callable) -> bool:
    try:
        return "calibrated" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


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
    kernel_calls: int = 0
    """Kernels its module launched on the capture (what its price's per-call term counts)."""
    build: Callable[[], nn.Module] | None = None
    """Builds the module when it was priced without one (a split read off its full variant's output)."""
    output: torch.Tensor | None = None
    """Its output on the capture, kept by `evaluate` (uncalibrated) only until evaluate_site has
    ranked its heads by it."""

    def built(self) -> nn.Module | None:
        """Its module (None when refused), built now if it was priced without one."""
        if self.module is None and self.build is not None and self.candidate is not None:
            self.module, self.build = self.build(), None
        return self.module


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


class CandidateRow(dict):
    """A candidate's report row whose `pays_off_from_N` is solved the first time it is read.

    Solving a break-even length (costmodel.break_even_length) takes sympy tens of milliseconds,
    and only the report's explain(), its JSON or a caller reading the row needs it: planning
    never does. Reading that key, or the whole row (items, values, copies, comparison, printing,
    JSON, dataclasses.asdict), solves it first, once.
    """

    def __init__(self, *args: Any, solve: Callable[[], int | None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._solve = solve
        if solve is not None:
            dict.setdefault(self, "pays_off_from_N", None)

    def _resolved(self) -> CandidateRow:
        if self._solve is not None:
            solve, self._solve = self._solve, None
            dict.__setitem__(self, "pays_off_from_N", solve())
        return self

    def __getitem__(self, key: str) -> Any:
        return dict.__getitem__(self._resolved() if key == "pays_off_from_N" else self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "pays_off_from_N":
            self._solve = None
        dict.__setitem__(self, key, value)

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self._resolved() if key == "pays_off_from_N" else self, key, default)

    def items(self):
        return dict.items(self._resolved())

    def values(self):
        return dict.values(self._resolved())

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        return dict.__eq__(self._resolved(), other._resolved() if isinstance(other, CandidateRow) else other)

    def __repr__(self) -> str:
        return dict.__repr__(self._resolved())

    def __or__(self, other: Any) -> dict[str, Any]:
        return dict(self.items()) | other

    def __iter__(self):  # overridden so dict(row) and {**row} read through __getitem__, not the raw storage
        return dict.__iter__(self)

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:  # pickled and copied as the plain, solved dict
        return dict, (dict(self.items()),)


def _would_not_pay(formula: costmodel.CostFormula, info: SiteInfo, profile: costmodel.DeviceProfile,
                   base: Candidate) -> tuple[float, int] | None:
    """(predicted seconds, FLOPs) of a candidate that cannot beat the site's baseline, else None.

    Before building, its kernel count is unknown (counted on the built module), but every module
    launches at least one: priced with one, the seconds are a lower bound. A candidate whose lower
    bound is above the baseline's (or equal, with no fewer FLOPs) is never allowed by the planner,
    under any budget (planner.never_chosen), so it is not built and measured.
    """
    lower = costmodel.estimate_seconds(formula.with_kernel_calls(1), info.shape, profile, info.dtype)
    flops = costmodel.flops(formula, info.shape)
    if not never_chosen(lower, flops, base):
        return None
    return max(lower, costmodel.estimate_seconds(formula, info.shape, profile, info.dtype)), flops


def _exact_output(capture: SiteCapture, info: SiteInfo) -> tuple[torch.Tensor, ...]:
    """(the captured output,) where it is the exact attention a variant's calibration fits to —
    plain softmax attention of the captured (q, k, v, mask) at the site's scale — so each candidate
    need not compute it again; else ()."""
    plain = (not capture.causal and capture.dropout_p == 0 and capture.softcap is None and not capture.sinks
             and capture.scale == info.softmax_scale)
    return (capture.output,) if plain else ()


def evaluate(config: Any, info: SiteInfo, capture: SiteCapture, device: Any,
             base: Candidate | None = None, calibration: Any = None) -> Evaluated:
    """Refuse `config` at the site, or build it from the capture, measure its error and price it.

    With the site's baseline candidate `base`, a config predicted no faster than it (see _would_not_pay) is
    refused before it is built; without one (a requested variant) it is always built.

    With `calibration` (attnopt.calibration.LazySiteData: the site's calibration captures), the built
    module's calibration parameters are fitted on the training batches and its error is measured on
    the held-out ones, for every candidate alike (fitted or not), instead of on the call's capture.
    """
    spec = spec_for(config)
    params = dataclasses.asdict(config)
    row = CandidateRow({"variant": spec.name, "params": params, "shown": spec.shown_params(config)})
    profile = costmodel.resolve_profile(device, info.dtype)
    reason = refusal(config, info)
    module = None
    if reason is None and base is not None:
        formula = spec.formula(config, info)
        hopeless = _would_not_pay(formula, info, profile, base)
        if hopeless is not None:
            seconds, flops = hopeless
            return Evaluated(config, None, None, CandidateRow(
                row, est_seconds=seconds, flops=flops, error=None, refused=(
                    f"not built: predicted no faster than softmax here (at least {seconds * 1e3:.3g} ms against "
                    f"{base.est_seconds * 1e3:.3g} ms), so it cannot help meet a budget."),
                solve=lambda: costmodel.break_even_length(formula, info.shape, profile, info.dtype)))
    if reason is None:
        example = (capture.q, capture.k, capture.v, capture.mask) + _exact_output(capture, info)
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
    if reason is None and calibration is not None:
        # fitted on the calibration batches (if it has parameters to fit), measured on the held-out ones;
        # outside the try above: calibration data that cannot be used is an AttnoptError, not a refusal
        try:
            error = calibration.calibrate(module, config)
        except ValueError as refused:  # e.g. a mask in the calibration data it cannot follow
            reason, module = f"on the calibration data: {refused}", None
    if reason is not None:
        return Evaluated(config, None, None, CandidateRow(row, refused=reason))
    if error == float("inf"):
        return Evaluated(config, None, None, CandidateRow(
            row, refused="it produced non-finite values where softmax attention does not."))
    cost = spec.formula(config, info).with_kernel_calls(counter.calls)
    seconds, flops = _price(cost, info, profile)
    candidate = Candidate(variant=spec.name, params=params, est_seconds=seconds, flops=flops, error=error)
    row = CandidateRow(row, est_seconds=seconds, flops=flops, error=error, refused=None,
                       solve=lambda: costmodel.break_even_length(cost, info.shape, profile, info.dtype))
    return Evaluated(config, module, candidate, row, counter.calls, output=output if calibration is None else None)


def head_splits(evaluated: Evaluated, info: SiteInfo,
                capture: SiteCapture) -> tuple[list[HeadSplit], torch.Tensor | None]:
    """Per-head alternatives to a built variant: its worst kv heads (by their share of its measured
    error on the capture) kept exact — the worst one, a quarter and half of them; and the
    variant's output on the capture they were ranked by."""
    if evaluated.module is None or evaluated.candidate is None or not evaluated.candidate.error or info.Hkv < 2:
        return [], None
    output = evaluated.output  # what `evaluate` measured its error on, when it kept it
    if output is None:
        with torch.no_grad():
            output = evaluated.module(capture.q, capture.k, capture.v, mask=capture.mask, scale=capture.scale,
                                      causal=capture.causal, dropout_p=capture.dropout_p)
    shares = per_head_errors(output, capture.output, info.Hkv)
    worst = sorted(range(info.Hkv), key=lambda kv: -shares[kv])
    counts = sorted({1, info.Hkv // 4, info.Hkv // 2} - {0})
    return [HeadSplit(evaluated.config, tuple(sorted(worst[:count]))) for count in counts if count < info.Hkv], output


def evaluate_head_split(split: HeadSplit, info: SiteInfo, capture: SiteCapture, device: Any,
                        calibration: Any = None, full: tuple[Evaluated, torch.Tensor] | None = None,
                        exact_calls: Callable[[], int] | None = None) -> Evaluated:
    """The variant of `split` built for the heads it takes, the exact op on the others: error
    measured on the whole site, priced as the two calls it makes (each at its heads' shape).

    With `full` (the variant built for every head, and its output on the capture) and a variant
    whose heads are independent (its spec's `heads_independent`), nothing is run: the split's
    output is the full one with the kept heads' exact output put back, and the variant's kernel
    count is the full module's; without calibration only (which may fit shared parameters).
    `exact_calls` gives the kernels of the exact op on the kept heads (the same for every split of
    a site: evaluate_site counts them once), counted here when not given."""
    spec = spec_for(split.config)
    exact_info, rest_info = split_sites(split, info)
    exact_heads = list(split.query_heads(info))
    params = dataclasses.asdict(split.config) | {"exact_heads": exact_heads}
    row = CandidateRow({"variant": spec.name, "params": params,
                        "shown": spec.shown_params(split.config) | {"exact_heads": exact_heads}})
    profile = costmodel.resolve_profile(device, info.dtype)
    indices = head_indices(split, info)
    call = dict(scale=capture.scale, causal=capture.causal, dropout_p=capture.dropout_p)

    def rest_inputs() -> dict[str, torch.Tensor | None]:
        """The capture's q, k, v and mask at the heads the variant takes."""
        return {name: select_heads(tensor, indices["rest_q" if name in ("q", "mask") else "rest_kv"], count)
                for name, tensor, count in (("q", capture.q, info.H), ("k", capture.k, info.Hkv),
                                            ("v", capture.v, info.Hkv), ("mask", capture.mask, info.H))}

    def build_parts(rest: dict[str, torch.Tensor | None]) -> tuple[nn.Module, nn.Module]:
        """The variant built on `rest`, and the split module running it beside the exact op."""
        variant = build_site_module(split.config, rest_info, (rest["q"], rest["k"], rest["v"], rest["mask"]))
        module: nn.Module = HeadSplitAttention(variant, split, info)
        return variant, (CausalMaskAttention(module) if info.causal and not capture.causal else module)

    def build() -> nn.Module:
        return build_parts(rest_inputs())[1]

    module: nn.Module | None = None
    try:
        if full is not None and calibration is None and spec.heads_independent:
            # priced off the full variant's output; built only if the plan takes it (mediator
            # k-means, agent selection and shortcut fits are most of a split's cost)
            full_evaluated, full_output = full
            exact_q = torch.tensor(split.query_heads(info), device=full_output.device)
            output = full_output.index_copy(1, exact_q, capture.output.index_select(1, exact_q).to(full_output.dtype))
            variant_calls = full_evaluated.kernel_calls
            kept_calls = exact_calls() if exact_calls is not None else exact_kernel_calls(capture)
        else:
            rest = rest_inputs()
            variant, module = build_parts(rest)
            with torch.no_grad(), KernelCounter() as counter:
                output = module(capture.q, capture.k, capture.v, mask=capture.mask, **call)
            with torch.no_grad(), KernelCounter() as variant_counter:
                (variant if not isinstance(module, CausalMaskAttention) else CausalMaskAttention(variant))(
                    rest["q"], rest["k"], rest["v"], mask=rest["mask"], **call)
            variant_calls = variant_counter.calls
            kept_calls = max(1, counter.calls - variant_counter.calls)
        error = output_error(output, capture.output)
        if calibration is not None:
            error = calibration.calibrate(module, split)
    except ValueError as refused:
        return Evaluated(split, None, None, CandidateRow(row, refused=str(refused)))
    except RuntimeError as failed:
        return Evaluated(split, None, None, CandidateRow(
            row, refused=f"building or running it failed: {type(failed).__name__}: {failed}"))
    if error == float("inf"):
        return Evaluated(split, None, None, CandidateRow(
            row, refused="it produced non-finite values where softmax attention does not."))
    exact_cost = EXACT.formula(ExactConfig(), exact_info)
    rest_cost = spec.formula(split.config, rest_info).with_kernel_calls(variant_calls)
    exact_cost = exact_cost.with_kernel_calls(kept_calls)
    seconds = (costmodel.estimate_seconds(exact_cost, exact_info.shape, profile, info.dtype)
               + costmodel.estimate_seconds(rest_cost, rest_info.shape, profile, info.dtype))
    flops = costmodel.flops(exact_cost, exact_info.shape) + costmodel.flops(rest_cost, rest_info.shape)
    candidate = Candidate(variant=spec.name, params=params, est_seconds=seconds, flops=flops, error=error)
    return Evaluated(split, module, candidate, CandidateRow(row, est_seconds=seconds, flops=flops, error=error,
                                                            refused=None, pays_off_from_N=None),
                     build=None if module is not None else build)


def exact_kernel_calls(capture: SiteCapture) -> int:
    """Kernels the exact op launches for a split's kept heads (counted on the first kv head and its
    first query head: as many as for any heads) plus the split's own gathers and the
    concatenation putting the heads back in order."""
    one_q = one_kv = torch.zeros(1, dtype=torch.long, device=capture.q.device)
    mask = capture.mask
    if mask is not None and mask.dim() == 4 and mask.shape[1] == capture.q.shape[1]:
        mask = mask.index_select(1, one_q)
    q, k, v = capture.q.index_select(1, one_q), capture.k.index_select(1, one_kv), capture.v.index_select(1, one_kv)
    with torch.no_grad(), KernelCounter() as counter:
        exact_attention(q, k, v, mask, scale=capture.scale, causal=capture.causal, dropout_p=capture.dropout_p)
    return counter.calls + SPLIT_GATHERS


SPLIT_GATHERS = 8
"""Kernels HeadSplitAttention adds around its two calls: six head gathers (q, k, v of each part),
the concatenation and the reordering gather."""


def evaluate_site(info: SiteInfo, capture: SiteCapture, configs: Sequence[Any] | None, device: Any,
                  calibration: Any = None, per_head: bool = True) -> tuple[Evaluated, list[Evaluated]]:
    """The site's baseline and every candidate config evaluated at it (calibrated, with errors
    measured on held-out calibration batches, when `calibration` is given: see `evaluate`).

    With `per_head`, each built variant predicted faster than the baseline also gives per-head
    candidates (`head_splits`: its worst heads kept exact), kept where still predicted faster."""
    configs = default_candidates(info, calibrated=calibration is not None) if configs is None else list(configs)
    base = baseline(info, device)
    exact_calls = functools.cache(lambda: exact_kernel_calls(capture))  # counted once per site, if needed
    evaluated, derived = [], []
    for config in configs:  # each config's head splits right after it: its output is kept only meanwhile
        full = evaluate(config, info, capture, device, base.candidate, calibration)
        evaluated.append(full)
        if per_head and full.candidate is not None and full.candidate.est_seconds < base.candidate.est_seconds:
            splits, full_output = head_splits(full, info, capture)
            for split in splits:
                split_evaluated = evaluate_head_split(split, info, capture, device, calibration, (full, full_output),
                                                      exact_calls=exact_calls)
                if (split_evaluated.candidate is None
                        or split_evaluated.candidate.est_seconds < base.candidate.est_seconds):
                    derived.append(split_evaluated)
        full.output = None
    return base, evaluated + derived
