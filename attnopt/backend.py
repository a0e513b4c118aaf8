"""The dynamo backend: every graph dynamo captures goes through find → verify → decide → rewrite.

Dynamo calls the backend once per captured graph. The backend returns a small dispatcher that
compiles the graph *per concrete input signature* on first use (so decisions are per shape, and
graphs made dynamic by dynamo still get concrete shapes), running

    canonicalize → detect → verify (random inputs) → decide (a `Decider`) → rewrite
    → end-to-end check on the call's real inputs (exact rewrites only)

All sites, rewritten or not, land in the backend's `Report`.
"""

from __future__ import annotations

import collections
import copy
import itertools
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from attnopt.passes.canonicalize import canonicalize
from attnopt.passes.detect import SiteMatch, detect
from attnopt.passes.rewrite import rewrite
from attnopt.passes.verify import relative_error, verify

from .report import Decision, Report, Site
from .site_call import SITE_CALLS

END_TO_END_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}


class AttnoptError(RuntimeError):
    """Raised by attnopt for bad input or a capture that cannot be trusted."""


class Decider(Protocol):
    """Chooses, per site, the attention module that replaces it (None keeps the original)."""

    def __call__(self, site: Site, match: SiteMatch, inputs: list[Any]) -> tuple[nn.Module, Decision] | None: ...


class ExactAttention(nn.Module):
    """attnopt's own exact softmax attention: the `exact` variant."""

    def forward(self, q, k, v, *, mask=None, scale: float, causal: bool = False, dropout_p: float = 0.0):
        from attnopt.kernels import exact_attention

        return exact_attention(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p)


def exact_decider(site: Site, match: SiteMatch, inputs: list[Any]) -> tuple[nn.Module, Decision]:
    return ExactAttention(), Decision(variant="exact", error=0.0)


def signature_of(args: tuple[Any, ...]) -> tuple:
    """What makes two calls of one graph the same for planning: shapes, dtypes, devices, ints."""
    key = []
    for value in args:
        if isinstance(value, torch.Tensor):
            key.append((tuple(value.shape), value.dtype, value.device.type))
        elif isinstance(value, (int, float, bool, str)) or value is None:
            key.append(value)
        else:
            key.append(type(value).__name__)
    return tuple(key)


def _describe(signature: tuple) -> str:
    parts = []
    for item in signature:
        if isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], tuple):
            parts.append("x".join(map(str, item[0])) or "scalar")
    return ",".join(parts)


def _propagate_meta(gm: fx.GraphModule, args: tuple[Any, ...]) -> set[int]:
    """Fill node.meta['val'] with fake tensors of the call's concrete shapes; return the
    positions of tensor inputs the graph writes to in place (their fake version moved)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    versions = [f._version if isinstance(f, torch.Tensor) else None for f in fakes]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    return {i for i, (f, v) in enumerate(zip(fakes, versions)) if isinstance(f, torch.Tensor) and f._version != v}


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flat_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flat_tensors(item)]
    return []


class AttnoptBackend:
    """A dynamo backend with a report. One instance per optimized model."""

    def __init__(self, decider: Callable | None = exact_decider, *, check: bool = True, name: str = "exact"):
        self.decider = decider
        self.check = check
        self.name = name
        self.report = Report()
        self._site_ids = itertools.count()
        self.compiled_signatures = 0
        self._known: dict[tuple, Site] = {}  # a site seen again (grad mode changed, a guard failed)
        self.options_key: int | None = None  # set for backends made by torch.compile(backend="attnopt")
        self.parameter_ids: set[int] = set()  # parameters seen in its graphs, to find its report

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **_options: Any) -> Callable:
        graph_index = self.report.graphs
        self.report.graphs += 1
        return _PerSignature(self, gm, graph_index)

    def compile_for(self, gm: fx.GraphModule, args: tuple[Any, ...], graph_index: int) -> Callable:
        """Analyse and (if a decider is set) rewrite `gm` for the concrete `args`."""
        self.compiled_signatures += 1
        signature = _describe(signature_of(args))
        work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        mutated = _propagate_meta(work, args)
        canonicalize(work)
        _propagate_meta(work, args)
        self._note_opaque_regions(work)
        replacements = []
        sites = []
        occurrences: collections.Counter = collections.Counter()
        for match in detect(work):
            # Dynamo recompiles the same code for a new grad mode or guard: same site, same id.
            identity = (match.module, match.source, match.form, signature, tuple(sorted(match.shape.items())))
            occurrences[identity] += 1
            identity += (occurrences[identity],)
            site = self._known.get(identity)
            if site is not None:
                sites.append(site)
                chosen = self.decider(site, match, list(args)) if site.decision is not None else None
                if chosen is not None:
                    replacements.append((match, SITE_CALLS[match.kind](chosen[0], match.recipe, site.id), site.id))
                continue
            site_id = next(self._site_ids)
            site = Site(id=site_id, module=match.module, source=match.source, form=match.form,
                        shape=dict(match.shape), causal=match.causal, mask=match.mask,
                        dropout=match.dropout, dtype=match.dtype, rewritable=False,
                        reason=match.reason, scale=match.scale, graph=graph_index, signature=signature)
            if match.reason is None:
                site.reason = verify(match, SITE_CALLS[match.kind](ExactAttention(), match.recipe, site_id))
            site.rewritable = site.reason is None
            self._known[identity] = site
            sites.append(site)
            self.report.sites.append(site)
            if site.rewritable and self.decider is not None:
                chosen = self.decider(site, match, list(args))
                if chosen is not None:
                    attention, decision = chosen
                    site.decision = decision
                    replacements.append((match, SITE_CALLS[match.kind](attention, match.recipe, site_id), site_id))
        if not replacements:
            return gm
        rewrite(work, replacements)
        if self.check and all(s.decision.variant == "exact" for s in sites if s.decision is not None):
            mismatch = self._end_to_end_mismatch(gm, work, args, mutated)
            if mismatch is not None:
                for site in sites:
                    if site.decision is not None:
                        site.decision = None
                        site.rewritable = False
                        site.reason = mismatch
                return gm
        return work

    def _note_opaque_regions(self, gm: fx.GraphModule) -> None:
        """Higher-order ops (torch.utils.checkpoint, cond, ...) hold subgraphs that are not
        searched: say so in the report instead of implying they contain no attention."""
        for node in gm.graph.nodes:
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                note = (f"`{node.target.name()}` region at {node.meta.get('stack_trace', '').strip().splitlines()[-2:-1] or node.name}"
                        " was not searched for attention (subgraphs of higher-order ops are not analysed).")
                if note not in self.report.notes:
                    self.report.notes.append(note)

    def _end_to_end_mismatch(self, original: fx.GraphModule, rewritten: fx.GraphModule, args: tuple[Any, ...],
                             mutated: set[int]) -> str | None:
        """Run both graphs on the call's real inputs (inputs the graph mutates are cloned)."""

        def run(gm: fx.GraphModule) -> Any:
            inputs = [a.clone() if i in mutated else a for i, a in enumerate(args)]
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return gm(*inputs)

        expected, actual = _flat_tensors(run(original)), _flat_tensors(run(rewritten))
        if len(expected) != len(actual):
            return "end-to-end check failed: the rewritten graph returns a different structure."
        for e, a in zip(expected, actual):
            if not e.is_floating_point():
                if not torch.equal(e, a):
                    return "end-to-end check failed: an integer output of the graph changed."
                continue
            error = relative_error(a, e)
            if error > END_TO_END_TOLERANCE.get(e.dtype, 1e-4):
                return f"end-to-end check failed: the rewritten graph differs from the original by {error:.2e} (relative)."
        return None


class _PerSignature:
    """What dynamo gets back for one graph: compiles per concrete input signature, lazily."""

    def __init__(self, backend: AttnoptBackend, gm: fx.GraphModule, graph_index: int):
        self.backend = backend
        self.gm = gm
        self.graph_index = graph_index
        self.compiled: dict[tuple, Callable] = {}

    def __call__(self, *args: Any) -> Any:
        key = signature_of(args)
        if key not in self.compiled:
            self.compiled[key] = self.backend.compile_for(self.gm, args, self.graph_index)
        return self.compiled[key](*args)
