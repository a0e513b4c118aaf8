"""The dynamo backend: every graph dynamo captures goes through find → verify → decide → rewrite.

Dynamo calls the backend once per captured graph. The backend returns a small dispatcher that
compiles the graph *per concrete input signature* on first use (so decisions are per shape, and
graphs made dynamic by dynamo still get concrete shapes), running

    canonicalize → detect → verify (random inputs) → decide (a `Policy`, attnopt.policies) → rewrite
    → end-to-end check on the call's real inputs

Under the exact policy, whose decisions depend on no shape, the signatures of one graph with
symbolic sizes share one analysis per size bucket, or per batch-only neighbour of it
(`size_bucket`, `other_batch_of`, `_PerSignature`). Policies that
plan per instance (budgets, variants: errors measured on the weights) share a plan within a size
bucket too — every size, batch included, rounded up to a power of two, so within a factor of two
of the sizes it was priced at — when, run on the new signature's first call, its output error
is at most PLAN_SHARING × the one measured where it was planned; otherwise they plan anew. A
signature with no plan in its bucket tries, the same way, the plan of the nearest bucket that
differs from its own in the batch size only (`other_batch_of`: a leading dimension that differs
alike in every input, and the symbolic ints equal to it): every site's cost grows with the
batch alike for softmax and for its variants, so the decision holds, and the error is measured
on the call before the plan is taken. A plan that rewrote nothing is shared without a check (it
is the original graph). Ints used as
data, not sizes (a diffusion timestep), are in no signature (`value_int_positions`).

What runs a signature's graph (`inner`): the fx graph as it is by default (`"eager"`); with
`inner="inductor"` the rewritten (or untouched) graph is compiled by `compile_fx` for the call's
concrete inputs — attnopt's ops kept opaque, everything around them fused as under a plain
`torch.compile` — and checked once against the eager graph; an Inductor failure (of the forward
or, where the graph needs gradients, of the backward, compiled with it rather than at the first
backward call) or a mismatch runs the eager graph instead, with the reason in the report's
notes. `torch.compile(model, backend="attnopt")` compiles with Inductor by default (it stands in
for `torch.compile(model)`); `rewrite`/`optimize` run the fx graph by default: they stand in for
the eager model, each graph would cost 2–15 s of Inductor compile on a CPU, and a compile whose
check passed on one example is trusted for every later input of that signature, with
Inductor's numerics there.

All sites, rewritten or not, land in the backend's `Report`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import math
import os
import re
import time
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from attnopt.passes.canonicalize import canonicalize
from attnopt.passes.detect import GraphBreaks, SiteMatch, detect, unsearched_regions
from attnopt.passes.eager_paths import restore_eager_paths
from attnopt.passes.fx_utils import alias_root, lifted_module_state, mutated_by
from attnopt.passes.rewrite import rewritten_copy
from attnopt.passes.site_call import site_call
from attnopt.passes.verify import verify

from .analysis import flat_tensors, graph_outputs_compared, run_graph
from .numerics import END_TO_END_TOLERANCE, mismatch, tolerance
from .policies import Choice, Choices, GraphRequest, Policy
from .report import GraphPlan, Report, Site
from .variants import ExactAttention
from .variants.mediator import MediatorAttention



class AttnoptError(RuntimeError):
    """Raised by attnopt for bad input or a capture that cannot be trusted."""


INNERS = ("inductor", "eager")
"""What runs each signature's graph: Inductor (`compile_fx` at the call's concrete shapes) or the
fx graph itself."""

_BACKWARD_NOW = ({"force_non_lazy_backward_lowering": True}
                 if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering") else {})
"""AOTAutograd's setting that compiles a graph's backward with its forward (torch 2.13 has it)."""

INDUCTOR_SIGNATURES_PER_DYNAMIC_GRAPH = 8
"""A graph dynamo made dynamic (sizes change between calls: a decode loop) is compiled by
Inductor per concrete signature on the second call of that signature, for at most this many
signatures; others run the eager graph (a decode step seen once never pays a compile)."""
PLAN_SHARING = 1.5
"""A plan made at one signature serves another of its size bucket, or of a bucket that differs
from it in the batch size only (`other_batch_of`), while the output error there is at most this
many times the error measured where it was planned (see the module doc)."""


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


def call_key(args: tuple[Any, ...], scalars: list[int] = (), sizes: list[int] = ()) -> str:
    """A graph call's signature as a string that is the same in every process, and for a static
    and a dynamic compile of the same call: `signature_of` its inputs (parameters included) but
    the symbolic sizes of a dynamic graph (`size_positions`: the tensors' shapes say them), and
    the values of the Python numbers dynamo passes as tensors (`scalar_positions`). What a saved
    plan is keyed by (attnopt.persist)."""
    values = tuple(args[i].item() for i in scalars if i < len(args) and isinstance(args[i], torch.Tensor))
    return repr(signature_of(tuple(a for i, a in enumerate(args) if i not in sizes)) + values)


def describe_inputs(args: tuple[Any, ...]) -> str:
    """The shapes of a graph's tensor inputs other than parameters, e.g. "2x3x64x64,2x16"."""
    return ",".join("x".join(map(str, a.shape)) or "scalar" for a in args
                    if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter))


def _propagate_meta(gm: fx.GraphModule, args: tuple[Any, ...]) -> set[int]:
    """Fill node.meta['val'] with fake tensors of the call's concrete shapes; return the
    positions of tensor inputs the graph writes to in place (their fake version moved).

    One-element integer and bool inputs are fake tensors that keep their value (constants of
    the fake mode): a graph may read one as a size (`torch.arange(0, n)` with n a 0-d tensor,
    SAM 3's relative-position bias), which a fake tensor without a value cannot answer; the
    graph is analysed at the call's values, as it runs (`value_read_positions` puts the values
    dynamo read into the signature)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [_fake(mode, a) if isinstance(a, torch.Tensor) else a for a in args]
    # inference tensors (torch.inference_mode) keep no version counter: the graph says what it writes
    versions = [f._version if isinstance(f, torch.Tensor) and not f.is_inference() else None for f in fakes]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    moved = {i for i, (f, v) in enumerate(zip(fakes, versions)) if v is not None and f._version != v}
    return moved | _written_inputs(gm)


def _holds_a_number(value: torch.Tensor) -> bool:
    """A one-element integer or bool tensor (not a parameter or buffer's float): a count, a size
    or a flag a graph may read."""
    return (value.numel() == 1 and not value.is_floating_point() and not value.is_complex()
            and not isinstance(value, nn.Parameter) and value.device.type != "meta")


def _fake(mode: FakeTensorMode, value: torch.Tensor) -> torch.Tensor:
    """`value` as a fake tensor of `mode`; one that holds a number keeps its value (see
    `_propagate_meta`)."""
    if _holds_a_number(value) and not value.is_inference():
        return mode.fake_tensor_converter.from_real_tensor(mode, value, make_constant=True)
    return mode.from_tensor(value)


def _written_inputs(gm: fx.GraphModule) -> set[int]:
    """Positions of the graph inputs that some node writes to in place (through views too)."""
    placeholders = {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    written = set()
    for node in gm.graph.nodes:
        target = mutated_by(node)
        root = alias_root(target) if target is not None else None
        if root in placeholders:
            written.add(placeholders[root])
    return written


def _inductor_check(graph: Callable, compiled: Callable, args: tuple[Any, ...],
                    cloned: set[int]) -> tuple[str | None, dict[int, tuple]]:
    """Run the graph and Inductor's compile of it on `args` once each: why the compile is not
    the graph's function (to END_TO_END_TOLERANCE), or None; and, by output position, the
    graph's strides where the compile returns another layout and the graph's output is dense
    (a KV cache Inductor returns transposed, say: the next graph's dynamo guards, and the user,
    must see the layout eager gives)."""
    want, got = run_graph(graph, args, cloned), run_graph(compiled, args, cloned)
    strides = {}
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)) and len(want) == len(got):
        strides = {i: e.stride() for i, (e, a) in enumerate(zip(want, got))
                   if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor) and e.shape == a.shape
                   and e.stride() != a.stride() and torch._prims_common.is_non_overlapping_and_dense(e)}
    want, got = flat_tensors(want), flat_tensors(got)
    if len(want) != len(got):
        return "Inductor's compile returns a different structure", strides
    for e, a in zip(want, got):
        if e.shape != a.shape or e.dtype != a.dtype:
            return (f"Inductor's compile returns {tuple(a.shape)} {a.dtype} where the graph returns "
                    f"{tuple(e.shape)} {e.dtype}"), strides
        if not e.is_floating_point():
            if not torch.equal(e, a):
                return "Inductor's compile changed an integer output", strides
            continue
        error = mismatch(a, e)
        if not error <= tolerance(END_TO_END_TOLERANCE, e.dtype):
            return f"Inductor's compile differs from the graph by {error:.2e} (relative)", strides
    return None, strides


class _Relaid:
    """Inductor's compile with the outputs at `strides` copied into the graph's layout."""

    def __init__(self, compiled: Callable, strides: dict[int, tuple]):
        self.compiled = compiled
        self.strides = strides

    def __call__(self, *args: Any) -> Any:
        out = list(self.compiled(*args))
        for i, stride in self.strides.items():
            value = out[i]
            out[i] = torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device).copy_(value)
        return out


def scalar_positions(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph inputs that are Python numbers dynamo passes as 0-d tensors (floats
    it did not specialise: `dynamic=True`, or `specialize_float` off). The graph reads them with
    `.item()`, which fake tensors cannot answer; attnopt analyses each call at their values."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, node in enumerate(placeholders) if getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False)]


def specialize_scalars(gm: fx.GraphModule, args: tuple[Any, ...], positions: list[int]) -> fx.GraphModule:
    """`gm` with every `.item()` of a Python number passed as a tensor replaced by its value in
    `args`, as a static capture would have it (a float fill or scale is a constant, not data).
    The input stays (unused), so the graph is called as before. Changes `gm` in place.
    `positions`: `scalar_positions` of the graph dynamo handed over (dynamo drops the
    placeholders' metadata once its compile is done)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    changed = False
    for i in positions:
        if i >= len(args) or not isinstance(args[i], torch.Tensor) or args[i].numel() != 1:
            continue
        value = args[i].item()
        for user in list(placeholders[i].users):
            if (user.op == "call_method" and user.target == "item") or user.target is torch.ops.aten._local_scalar_dense.default:
                for consumer in list(user.users):
                    consumer.args = fx.node.map_arg(consumer.args, lambda n, user=user: value if n is user else n)
                    consumer.kwargs = fx.node.map_arg(consumer.kwargs, lambda n, user=user: value if n is user else n)
                gm.graph.erase_node(user)
                changed = True
    if changed:
        gm.recompile()
    return gm


def value_read_positions(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph inputs that are one-element integer or bool tensors whose value
    dynamo read while tracing (`torch.arange(0, n)`, n a 0-d tensor: its fake input remembers the
    number it gave). The analysis reads them at the call's values (`_propagate_meta`), so their
    values are part of a call's signature, as those of `scalar_positions` are; an integer tensor
    used as data (a diffusion timestep) was not read, and stays out."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, node in enumerate(placeholders)
            if isinstance(value := node.meta.get("example_value"), torch.Tensor) and _holds_a_number(value)
            and getattr(value, "_item_memo", None) is not None]


def value_int_positions(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph's symbolic-int inputs that size no tensor of the graph: ints used as
    data (a diffusion loop's Python-int timestep indexing an embedding), like a tensor's values.
    Every shape in the graph is the same whatever their value, so they are not part of a call's
    planning signature (`_PerSignature`): a sampler's steps share one analysis, as they do when
    the timestep is a tensor. An int that reaches any tensor's shape or strides is a size and stays
    (a view's storage offset, `weight[t]`, is not a size)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols = {i: value.node.expr for i, node in enumerate(placeholders)
               if isinstance(value := node.meta.get("example_value"), torch.SymInt)}
    if not symbols:
        return []
    sizing: set = set()
    for node in gm.graph.nodes:
        for value in torch.utils._pytree.tree_leaves(node.meta.get("example_value")):
            if isinstance(value, torch.Tensor):
                for n in (*value.shape, *value.stride()):
                    if isinstance(n, torch.SymInt):
                        sizing |= n.node.expr.free_symbols
    return [i for i, expr in symbols.items() if not (expr.free_symbols & sizing) and expr.free_symbols]


def size_positions(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph inputs that are symbolic ints (sizes of a graph dynamo made dynamic);
    read when dynamo hands the graph over, as `scalar_positions`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, node in enumerate(placeholders) if isinstance(node.meta.get("example_value"), torch.SymInt)]


def _is_dynamic(gm: fx.GraphModule) -> bool:
    """Whether dynamo traced `gm` with symbolic sizes (its calls may come with other sizes)."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor) and any(
                isinstance(n, torch.SymInt) for n in (*value.shape, *value.stride()))):
            return True
    return False


@dataclasses.dataclass
class AnalysedGraph:
    """One analysis of a graph at one input signature (one `compile_for` call): the sites found
    and the plan made, as `attnopt.save` writes them."""

    graph: int
    signature: str
    key: str
    """`call_key` of the call it was analysed for."""
    sites: list[Site]
    plan: GraphPlan | None = None


class AttnoptBackend:
    """A dynamo backend with a report. One instance per optimized model.

    `policy` decides what replaces the rewritable sites (attnopt.policies); None only inspects.
    Site ids count from 0 in the order graphs are analysed, so the same model called the same
    way gets the same ids in every process; a policy replaying a saved file names the ids of the
    sites it recognises (`site_ids`) and reserves them (`first_site_id`).
    """

    def __init__(self, policy: Policy | None = None, *, check: bool = True, inner: str = "eager"):
        if inner not in INNERS:
            raise AttnoptError(f"inner must be one of {INNERS} (what runs the rewritten graphs), got {inner!r}.")
        self.policy = policy
        self.check = check
        # inspection only runs the model once: nothing to compile
        self.inner = inner if policy is not None else "eager"
        self.inner_seconds: list[float] = []  # time of each Inductor compile
        self.report = Report()
        self._site_ids = itertools.count(getattr(policy, "first_site_id", 0))
        # site id → its attention module, once decided (or, loaded from a file, from the start)
        self._chosen: dict[int, nn.Module] = dict(getattr(policy, "site_modules", {}))
        self.analyses: list[AnalysedGraph] = []  # one per compile_for call, in order
        # the decided site of an earlier graph with the same identity (another grad mode, a guard
        # that failed): its decision is reused, and checked again, for the new graph
        self._decided: dict[tuple, tuple[Site, list[weakref.ref]]] = {}
        # the graph breaks dynamo ended graphs with, in compile order: (frames (function, line), text)
        self._breaks: list[tuple[set[tuple[str, int]], str]] = []
        self._graph_breaks: dict[int, GraphBreaks] = {}  # graph index → the breaks around it

    @property
    def name(self) -> str:
        return self.policy.name if self.policy is not None else "inspect"

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **_options: Any) -> Callable:
        graph_index = self.report.graphs
        self.report.graphs += 1
        self._graph_breaks[graph_index] = self._breaks_around(gm)
        return _PerSignature(self, gm, graph_index, per_instance=self.policy is not None and self.policy.per_instance)

    def _breaks_around(self, gm: fx.GraphModule) -> GraphBreaks:
        """The graph breaks around a graph dynamo hands over (see passes.detect.GraphBreaks): the
        one that ends it (`compile_subgraph_reason`, which dynamo sets on the graph), and the one
        it was compiled after — for a resume function (`torch_dynamo_resume_in_<f>_at_<line>`),
        the recorded break at that function and line; otherwise the break that ended the graph
        compiled just before it (a function called at a break is a frame of its own), if any."""
        reason = getattr(gm, "compile_subgraph_reason", None)
        after = None
        if reason is not None and getattr(reason, "graph_break", False):
            frames = {(frame.name, frame.lineno) for frame in getattr(reason, "user_stack", ())}
            after = describe_break(reason)
        before = None
        resumed = _resumed_at(gm)
        if resumed is not None:
            before = next((text for frames_, text in reversed(self._breaks) if resumed in frames_), None)
        elif self._breaks and self._breaks[-1][1] is not None:
            before = self._breaks[-1][1]
        self._breaks.append((frames, after) if after is not None else (set(), None))
        return GraphBreaks(before=before, after=after)

    def compile_for(self, gm: fx.GraphModule, args: tuple[Any, ...], graph_index: int,
                    state: list[torch.Tensor] = (), scalars: list[int] = (), sizes: list[int] = ()) -> Callable:
        """Analyse and (if a policy is set) rewrite `gm` for the concrete `args`: a pipeline of
        steps that return values — eager paths restored → canonicalize → detect and verify →
        decide → rewrite → check — with the report written here and nowhere else.

        `state`: the parameters and buffers the call passes when the policy plans per instance;
        `scalars`: the positions of Python numbers passed as tensors (`scalar_positions`);
        `sizes`: those of symbolic sizes (`size_positions`)."""
        signature = describe_inputs(args)
        # what eager runs where dynamo traced another path: the reference for every check, and
        # what runs when nothing is rewritten; Python floats dynamo passed as tensors are
        # constants again (at this call's values, part of the signature: `scalar_positions`)
        reference = restore_eager_paths(specialize_scalars(fx.GraphModule(gm, copy.deepcopy(gm.graph)), args, scalars))
        work, mutated = self._canonical(reference, args)
        key = call_key(args, scalars, sizes)
        found = self._sites(work, signature, graph_index, key)
        analysed = AnalysedGraph(graph_index, signature, key, [site for site, _, _ in found])
        self.analyses.append(analysed)
        rewritable = [(site, match) for site, match, _ in found if site.rewritable]
        if self.policy is None or not rewritable:
            return reference
        choices = self._decide(GraphRequest(work, args, mutated, rewritable, graph_index, signature), found, state)
        analysed.plan = choices.plan
        modules = self._record(choices, found, state)
        if not modules:
            return reference
        rewritten = rewritten_copy(work, [(match, site_call(modules[site.id], match.recipe, site.id), site.id)
                                          for site, match in rewritable if site.id in modules])
        if not self.check:
            return rewritten
        exact = all(isinstance(module, ExactAttention) for module in modules.values())
        problem = self._end_to_end(reference, rewritten, args, mutated, exact, graph_index, signature)
        if problem is None:
            return rewritten
        for site, _ in rewritable:
            self._chosen.pop(site.id, None)
            site.decision = None
            site.rewritable = False
            site.reason = problem
        return reference

    def lower(self, graph: fx.GraphModule, args: tuple[Any, ...], graph_index: int) -> Callable:
        """What runs `graph` for calls with the signature of `args`: Inductor's compile of it
        (checked once against `graph` on these inputs), or `graph` itself — with `inner="eager"`,
        or, noted in the report, when Inductor fails or its output differs."""
        if self.inner == "eager":
            return graph
        where = f"graph {graph_index} at {describe_inputs(args) or 'no tensor inputs'}"
        problems = []
        # attnopt's ops are triton_ops, kept opaque: Inductor calls them as extern kernels (their
        # fake impls promise the contiguous outputs their kernels return) and fuses what is around.
        has_sites = any(node.op == "call_module" and str(node.target).startswith("attnopt_site_") for node in graph.graph.nodes)
        # never traced into: a traced body is rounded and fused as Inductor likes, and a check on
        # one example cannot vouch for it (an fp16 row blocked by finfo.min came out wrong)
        for decompose in (False,) if has_sites else (True,):
            compiled, problem = self._inductor(graph, args, decompose)
            if problem is None:
                return compiled
            problems.append(problem)
        problem = problems[0]
        self._note(f"{where}: {problem}; this graph runs eagerly (attnopt's rewrite unchanged).")
        return graph

    def _inductor(self, graph: fx.GraphModule, args: tuple[Any, ...], decompose: bool) -> tuple[Callable | None, str | None]:
        """Inductor's compile of `graph` for `args`, checked against `graph` on them; or why not."""
        from torch._inductor.compile_fx import compile_fx

        start = time.perf_counter()
        try:
            # a copy: Inductor's passes may change the graph they get, and `graph` stays the fallback.
            # Traced as part of a torch.compile, as under dynamo: code that branches on
            # torch.compiler.is_compiling() (a data-dependent shortcut skipped when compiled)
            # takes its compiled path. The backward, where the graph needs one, is compiled now
            # rather than lazily at the first loss.backward(), where a failure would escape this
            # fallback and raise in the user's training step.
            session = getattr(torch.compiler, "_compile_session_context", contextlib.nullcontext)
            with session(), torch._functorch.config.patch(decompose_custom_triton_ops=decompose,
                                                          **_BACKWARD_NOW):
                compiled = compile_fx(fx.GraphModule(graph, copy.deepcopy(graph.graph)), list(args))
            self.inner_seconds.append(time.perf_counter() - start)
            cloned = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)}
            problem, strides = _inductor_check(graph, compiled, args, cloned)
            if strides:
                compiled = _Relaid(compiled, strides)
        except Exception as error:  # noqa: BLE001 - Inductor must never break the user's model
            first = (str(error).strip().splitlines() or [""])[0][:200]
            return None, f"Inductor failed ({type(error).__name__}: {first})"
        return (compiled, None) if problem is None else (None, problem)

    def _note(self, note: str) -> None:
        if note not in self.report.notes:
            self.report.notes.append(note)

    def _canonical(self, reference: fx.GraphModule, args: tuple[Any, ...]) -> tuple[fx.GraphModule, set[int]]:
        """A canonicalized copy of `reference` with concrete shapes on every node, and the
        positions of the inputs it writes to in place."""
        work = fx.GraphModule(reference, copy.deepcopy(reference.graph))
        mutated = _propagate_meta(work, args)
        canonicalize(work)
        _propagate_meta(work, args)
        self._note_opaque_regions(work)
        return work, mutated

    def _sites(self, work: fx.GraphModule, signature: str, graph_index: int,
               key: str) -> list[tuple[Site, SiteMatch, tuple]]:
        """Every detected site as a verified report record, with its match and its identity."""
        occurrences: collections.Counter = collections.Counter()
        matches = detect(work, subgraphs=True, breaks=self._graph_breaks.get(graph_index))
        return [(self._site_for(match, site_id, signature, graph_index), match,
                 _identity(match, signature, occurrences))
                for site_id, match in zip(self._ids(matches, key), matches)]

    def _ids(self, matches: list[SiteMatch], key: str) -> list[int]:
        """The ids of a graph's sites: the policy's where it knows them (a loaded file), else the next ones."""
        named = getattr(self.policy, "site_ids", None)
        ids = named(key, matches) if named is not None else None
        return list(ids) if ids is not None else [next(self._site_ids) for _ in matches]

    def _decide(self, request: GraphRequest, found: list[tuple[Site, SiteMatch, tuple]],
                state: list[torch.Tensor]) -> Choices:
        """The policy's choices for the graph's rewritable sites — or, when every one of them has
        the identity of a site decided in an earlier graph for the same instance (another grad
        mode, a failed guard), those decisions again, without planning anew."""
        earlier = {site.id: self._earlier(identity, state) for site, _, identity in found if site.rewritable}
        if not all(prior is not None for prior in earlier.values()):
            start = time.perf_counter()
            choices = self.policy.choose(request)
            if choices.plan is not None:
                choices.plan.planning_seconds = time.perf_counter() - start
            return choices
        return Choices(sites={site_id: Choice(prior.decision, self._chosen.get(prior.id))
                              for site_id, prior in earlier.items()},
                       facts={site_id: prior.facts for site_id, prior in earlier.items() if prior.facts is not None})

    def _record(self, choices: Choices, found: list[tuple[Site, SiteMatch, tuple]],
                state: list[torch.Tensor]) -> dict[int, nn.Module]:
        """Write the choices into the report; return site id → attention module to rewrite with."""
        for site, _, identity in found:
            choice = choices.sites.get(site.id)
            if not site.rewritable or choice is None:
                continue
            site.decision = choice.decision
            site.facts = choices.facts.get(site.id, site.facts)
            if choice.module is not None:
                self._chosen[site.id] = choice.module
            if identity not in self._decided:
                self._decided[identity] = (site, [weakref.ref(t) for t in state])
        if choices.plan is not None:
            self.report.add_plan(choices.plan)
        return {site.id: self._chosen[site.id] for site, _, _ in found if site.id in self._chosen}

    def _earlier(self, identity: tuple, state: list[torch.Tensor]) -> Site | None:
        """The site decided in an earlier graph with this identity, for these same weights."""
        entry = self._decided.get(identity)
        if entry is None:
            return None
        site, refs = entry
        if not _same_tensors(refs, state):
            return None
        return site if site.rewritable and site.decision is not None else None

    def _site_for(self, match: SiteMatch, site_id: int, signature: str, graph_index: int) -> Site:
        """A new, verified Site for a match. Every compiled graph (a recompile for another grad
        mode or a failed guard included) and every shape gets its own sites and decisions, so
        the report describes exactly what each running graph does."""
        site = Site(id=site_id, module=match.module, source=match.source, form=match.form,
                    shape=dict(match.shape), causal=match.causal, mask=match.mask,
                    dropout=match.dropout, dtype=match.dtype, rewritable=False,
                    reason=match.reason, scale=match.scale, graph=graph_index, signature=signature)
        if match.reason is None:
            site.reason = verify(match, site_call(ExactAttention(), match.recipe, site_id))
        site.rewritable = site.reason is None
        self.report.sites.append(site)
        return site

    def _note_opaque_regions(self, gm: fx.GraphModule) -> None:
        """Higher-order ops whose subgraphs are not searched (cond, while_loop, ...; checkpoint and
        wrap bodies are searched): say so in the report instead of implying they hold no attention."""
        for node in unsearched_regions(gm, subgraphs=True):
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                note = (f"`{node.target.name()}` region at {node.meta.get('stack_trace', '').strip().splitlines()[-2:-1] or node.name}"
                        " was not searched for attention (subgraphs of higher-order ops are not analysed).")
                if note not in self.report.notes:
                    self.report.notes.append(note)

    def _end_to_end(self, original: fx.GraphModule, rewritten: fx.GraphModule, args: tuple[Any, ...],
                    mutated: set[int], exact: bool, graph_index: int, signature: str) -> str | None:
        """Run both graphs on the call's real inputs; return why the rewrite must be dropped, or None.

        Exact rewrites must match within END_TO_END_TOLERANCE. Other variants change the output by
        design: their measured output error goes into the graph's plan, and the rewrite is dropped
        only when it breaks the output (another structure, a changed integer output, non-finite
        values where the original is finite).
        """
        problem, error = compare_outputs(original, rewritten, args, mutated, exact)
        if problem is None:
            for plan in reversed(self.report.plans):
                if plan.graph == graph_index and plan.signature == signature:
                    plan.output_error = error
                    break
        return problem


_RESUME = re.compile(r"torch_dynamo_resume_in_(\w+)_at_(\d+)\b")


def _resumed_at(gm: fx.GraphModule) -> tuple[str, int] | None:
    """(function, line) of the graph break a graph resumes after, when dynamo compiled it from a
    resume function (its nodes' stack traces name `torch_dynamo_resume_in_<function>_at_<line>`)."""
    for node in gm.graph.nodes:
        found = _RESUME.search(node.meta.get("stack_trace") or "")
        if found is not None:
            return found.group(1), int(found.group(2))
    return None


def describe_break(reason: Any) -> str:
    """dynamo's reason for a graph break (its first line) and where it happened, innermost frame:
    "<reason> at <file>:<line> in <function>"."""
    text = (str(getattr(reason, "reason", "")).strip().splitlines() or ["graph break"])[0]
    stack = list(getattr(reason, "user_stack", ()) or ())
    if not stack:
        return text
    frame = stack[-1]
    return f"{text} at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"


def _identity(match: SiteMatch, signature: str, occurrences: collections.Counter) -> tuple:
    """What makes a site of one graph the same as a site of another compile of the same code."""
    identity = (match.module, match.source, match.form, signature, tuple(sorted(match.shape.items())), match.dropout)
    occurrences[identity] += 1
    return identity + (occurrences[identity],)


def compare_outputs(original: fx.GraphModule, rewritten: fx.GraphModule, args: tuple[Any, ...], mutated: set[int],
                    exact: bool) -> tuple[str | None, float]:
    """Run both graphs on `args`: why the rewrite must be dropped (None if it may stay) and the
    largest relative error over the floating outputs (see AttnoptBackend._end_to_end)."""
    expected, actual = flat_tensors(run_graph(original, args, mutated)), flat_tensors(run_graph(rewritten, args, mutated))
    return graph_outputs_compared(expected, actual, exact)


def _same_tensors(refs: list[weakref.ref], tensors: list[torch.Tensor]) -> bool:
    """Whether weakly held `refs` are, one for one, these very tensors (an instance's weights)."""
    return len(refs) == len(tensors) and all(ref() is tensor for ref, tensor in zip(refs, tensors))


def model_state_positions(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph inputs that are a module's parameters or buffers (dynamo lifts
    them to inputs, so one graph can serve several instances of a class)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [index for index, node in enumerate(placeholders) if lifted_module_state(node)]


class _PerSignature:
    """What dynamo gets back for one graph: compiles per concrete input signature, lazily.

    With `per_instance` (policies whose decisions depend on the weights: measured errors), the
    parameters and buffers the call passes are part of the key, by identity: another instance
    of the same class is planned and checked for its own weights, never handed another's plan.

    Size buckets (`shares_sizes`: policies whose decisions depend on neither weights nor shape —
    exact, and inspection): a graph dynamo compiled with symbolic sizes (a decode loop, whose
    KV length grows every step) is analysed once per size bucket (`size_bucket`: every tensor
    size and integer input rounded up to a power of two). A new signature of an analysed bucket
    (or, where its bucket has none, of the nearest bucket differing from it in the batch size
    only) reuses that bucket's graph once it passes the end-to-end check on its own first call (exact
    rewrites must match the original there; `check=False` skips it); if it does not, it is
    analysed on its own.

    Each signature's graph (analysed or shared) runs through `_Lowered`: Inductor compiles it
    for that signature (`AttnoptBackend.lower`) — on its first call, or on its second in a graph
    with symbolic sizes, at most INDUCTOR_SIGNATURES_PER_DYNAMIC_GRAPH of those.
    """

    def __init__(self, backend: AttnoptBackend, gm: fx.GraphModule, graph_index: int, per_instance: bool):
        self.backend = backend
        self.gm = gm
        self.graph_index = graph_index
        self.state_positions = model_state_positions(gm) if per_instance else []
        self.compiled: dict[tuple, list[tuple[list[weakref.ref], Callable]]] = {}
        self.shares_sizes = not per_instance and (backend.policy is None or getattr(backend.policy, "shares_sizes", False))
        self.by_bucket: dict[tuple, Callable] = {}
        # per-instance policies: per size bucket, (weights, graph, plan) of each signature planned there
        self.planned: dict[tuple, list[tuple[list[weakref.ref], fx.GraphModule, GraphPlan | None]]] = (
            collections.defaultdict(list))
        self._reference: fx.GraphModule | None = None
        self.scalar_positions = scalar_positions(gm)
        self.value_read_positions = value_read_positions(gm)
        self.size_positions = size_positions(gm)
        self.value_ints = value_int_positions(gm)
        # a graph with symbolic sizes meets many signatures: Inductor compiles one on its second call
        self.dynamic = _is_dynamic(gm)
        self.inductor_compiles = 0

    def __call__(self, *args: Any) -> Any:
        state = [args[i] for i in self.state_positions if i < len(args) and isinstance(args[i], torch.Tensor)]
        # the values of Python numbers passed as tensors are part of the signature: analysed as constants
        # ints used as data (value_int_positions) are not: one analysis serves all their values
        signature = signature_of(tuple("int" if i in self.value_ints else arg for i, arg in enumerate(args)))
        signature += tuple(args[i].item() for i in (*self.scalar_positions, *self.value_read_positions)
                           if i < len(args) and isinstance(args[i], torch.Tensor))
        entries = self.compiled.setdefault(signature, [])
        for refs, compiled in entries:
            if _same_tensors(refs, state):
                return compiled(*args)
        entries[:] = [(refs, compiled) for refs, compiled in entries if all(ref() is not None for ref in refs)]
        graph = self._shared(signature, args) if self.shares_sizes else self._planned_nearby(signature, args, state)
        if graph is None:
            analyses = len(self.backend.analyses)
            graph = self.backend.compile_for(self.gm, args, self.graph_index, state, self.scalar_positions,
                                             self.size_positions)
            if self.shares_sizes:
                self.by_bucket.setdefault(size_bucket(signature), graph)
            elif len(self.backend.analyses) > analyses:
                self.planned[size_bucket(signature)].append(
                    ([weakref.ref(tensor) for tensor in state], graph, self.backend.analyses[-1].plan))
        compiled = _Lowered(self, graph, first=not self.dynamic)
        entries.append(([weakref.ref(tensor) for tensor in state], compiled))
        return compiled(*args)

    def lower(self, graph: fx.GraphModule, args: tuple[Any, ...]) -> Callable:
        """Inductor's compile of `graph` for these args (see AttnoptBackend.lower), within the
        limit of compiles per graph with symbolic sizes."""
        if self.backend.inner == "eager":
            return graph
        if self.dynamic and self.inductor_compiles >= INDUCTOR_SIGNATURES_PER_DYNAMIC_GRAPH:
            self.backend._note(f"graph {self.graph_index} has symbolic sizes and met more than "
                               f"{INDUCTOR_SIGNATURES_PER_DYNAMIC_GRAPH} input signatures: later ones run "
                               "their graph eagerly, without Inductor.")
            return graph
        self.inductor_compiles += 1
        return self.backend.lower(graph, args, self.graph_index)

    def _planned_nearby(self, signature: tuple, args: tuple[Any, ...],
                        state: list[torch.Tensor]) -> fx.GraphModule | None:
        """For per-instance policies (measured plans): the graph planned for this instance at
        another signature of the same size bucket — or, if that bucket has none, of the nearest
        bucket differing from it in the batch size only — if it holds here (`PLAN_SHARING`)."""
        bucket = size_bucket(signature)
        mine = [entry for entry in self.planned.get(bucket, ()) if _same_tensors(entry[0], state)]
        if not mine:
            mine = [entry for other in nearest_other_batches(bucket, self.planned) for entry in self.planned[other]
                    if _same_tensors(entry[0], state)][:1]
        for _, graph, plan in mine[:1]:
            if plan is None or plan.output_error is None:  # nothing rewritten: the original graph
                if plan is not None:
                    plan.shared_with.append(describe_inputs(args))
                return graph
            problem, error = self._compared_here(graph, args, exact=False)
            if problem is None and error <= PLAN_SHARING * plan.output_error + 1e-6:
                plan.shared_with.append(describe_inputs(args))
                return graph
        return None

    def _compared_here(self, graph: fx.GraphModule, args: tuple[Any, ...], exact: bool) -> tuple[str | None, float]:
        """`compare_outputs` of `graph`, made for another signature, against the original graph on
        this call's inputs; a graph that cannot run at these sizes is a problem too."""
        if self._reference is None:
            self._reference = restore_eager_paths(fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph)))
        # every tensor input but the weights is cloned: whichever the graph writes to stays untouched
        cloned = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)}
        try:
            return compare_outputs(self._reference, graph, args, cloned, exact)
        except Exception as failed:  # noqa: BLE001 - analysed or planned anew, by the caller
            return f"it does not run at these sizes: {failed}", math.inf

    def _shared(self, signature: tuple, args: tuple[Any, ...]) -> fx.GraphModule | None:
        """The graph analysed for this signature's size bucket — or, if it has none, for the
        nearest bucket differing from it in the batch size only — if it passes the end-to-end
        check here."""
        if not self.shares_sizes:
            return None
        bucket = size_bucket(signature)
        compiled = self.by_bucket.get(bucket)
        if compiled is None:
            nearest = nearest_other_batches(bucket, self.by_bucket)
            compiled = self.by_bucket[nearest[0]] if nearest else None
        if compiled is None or not self.backend.check:
            return compiled
        problem, _ = self._compared_here(compiled, args, exact=True)
        return compiled if problem is None else None


class _Lowered:
    """One signature's graph as it runs: the fx graph until Inductor compiles it — on the first
    call (`first`) or on the second (graphs with symbolic sizes) — then Inductor's compile (or
    the fx graph, where Inductor was refused; see AttnoptBackend.lower).

    Mediator sites read the call's context (mediator_count, mediator_timestep) when they run; a
    compiled graph holds the count it was traced at, so each count gets its own compile."""

    def __init__(self, owner: _PerSignature, graph: fx.GraphModule, first: bool):
        self.owner = owner
        self.graph = graph
        self.first = first
        self.mediators = [m for m in graph.modules() if isinstance(m, MediatorAttention)]
        self.runs: dict[tuple, Callable] = {}
        self.calls: collections.Counter = collections.Counter()

    def __call__(self, *args: Any) -> Any:
        context = tuple(m.config.count() for m in self.mediators)
        run = self.runs.get(context)
        if run is None:
            self.calls[context] += 1
            if self.first or self.calls[context] > 1:
                run = self.runs[context] = self.owner.lower(self.graph, args)
            else:
                run = self.graph
        return run(*args)


def other_batch_of(bucket: tuple, other: tuple) -> tuple[int, int] | None:
    """(this batch, the other's) when two size buckets differ in the batch size only: every
    tensor that differs, differs in its leading dimension alone and by the same pair of sizes,
    and every other differing item is an int equal to those sizes (a symbolic batch size);
    None otherwise, or when they do not differ."""
    if len(bucket) != len(other):
        return None
    pair = None
    for mine, theirs in zip(bucket, other):
        if mine == theirs:
            continue
        if isinstance(mine, tuple) and isinstance(theirs, tuple):  # a tensor: (shape, dtype, device)
            if (len(mine) != len(theirs) or mine[1:] != theirs[1:] or len(mine[0]) != len(theirs[0])
                    or not mine[0] or mine[0][1:] != theirs[0][1:]):
                return None
            sizes = (mine[0][0], theirs[0][0])
        elif isinstance(mine, int) and isinstance(theirs, int) and not isinstance(mine, bool):
            sizes = (mine, theirs)
        else:
            return None
        if pair is not None and sizes != pair:
            return None
        pair = sizes
    return pair


def nearest_other_batches(bucket: tuple, others: Any) -> list[tuple]:
    """The buckets among `others` that differ from `bucket` in the batch size only
    (`other_batch_of`), the nearest batch size first."""
    found = [(other, pair) for other in others if (pair := other_batch_of(bucket, other)) is not None and min(pair) > 0]
    found.sort(key=lambda item: abs(math.log2(item[1][1] / item[1][0])))
    return [other for other, _ in found]


def size_bucket(signature: tuple) -> tuple:
    """`signature` with every tensor size and integer above 1 rounded up to a power of two: the
    signatures one analysis serves under a policy whose decisions do not depend on shape."""
    def up(n: Any) -> Any:
        return n if isinstance(n, bool) or not isinstance(n, int) or n <= 1 else 1 << (n - 1).bit_length()

    return tuple((tuple(up(n) for n in item[0]),) + item[1:] if isinstance(item, tuple) else up(item)
                 for item in signature)
