"""Run a model under dynamo with an attnopt backend, and refuse to be fooled by it.

Dynamo can quietly run a frame eagerly (a recompile limit hit, an unsupported construct, an
error in a backend when `suppress_errors` is on). For attnopt that would mean reporting "no
attention" or returning a model that silently runs un-rewritten, so every call made here:

* raises the recompile limits and makes hitting them an error, not a fallback;
* turns `suppress_errors` off, so backend errors surface;
* checks that a call with a new input signature ran at least one compiled graph.

Dynamo keeps compiled code in a cache on each code object it compiled, the user's included.
Every attnopt compile therefore gets a dynamo region of its own (`isolate_recompiles`): its
entries never count against the recompile limits of other compiles of the same code (the
user's own `torch.compile` included), and they are invalidated when the compile is garbage
collected; the empty slots torch leaves behind are cleared when attnopt next compiles.
"""

from __future__ import annotations

import contextlib
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch._dynamo
from torch import nn
from torch._C._dynamo.eval_frame import (
    _debug_get_cache_entry_list,
    _get_cache_entries_for_region,
    reset_code,
    set_eval_frame_isolate_recompiles_id,
)
from torch._dynamo import eval_frame
from torch._dynamo.convert_frame import input_codes
from torch._dynamo.guards import DeletedGuardManagerWrapper

from .backend import AttnoptBackend, AttnoptError, signature_of

_LIMIT = 4096


_STRICT_DYNAMO = torch._dynamo.config.patch(recompile_limit=_LIMIT, accumulated_recompile_limit=_LIMIT,
                                            fail_on_recompile_limit_hit=True, suppress_errors=False,
                                            specialize_float=True)


def strict_dynamo() -> contextlib.AbstractContextManager:
    """dynamo settings under which a fallback to eager is an error, for the duration of a call.

    Python floats stay constants (`specialize_float`): dynamo would otherwise turn a float that
    differs between compiles of the same code (another instance's mask fill or scale) into a
    tensor input, and a fill held in a tensor is data, which detection must refuse.

    One patch object serves every call (torch's config patches keep their saved values on a
    per-context stack, so nested and concurrent uses restore correctly): building a patch
    defines a class, which cost a visible share of a decode step when done per call."""
    return _STRICT_DYNAMO


def check_inputs(args: Any, kwargs: Any) -> None:
    """Raise AttnoptError unless `args` is a tuple and `kwargs` a dict or None."""
    if not isinstance(args, tuple):
        raise AttnoptError(f"`args` must be a tuple of positional inputs, e.g. args=(x,); got {type(args).__name__}.")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise AttnoptError(f"`kwargs` must be a dict of keyword inputs, got {type(kwargs).__name__}.")


_dropped_regions: set[int] = set()
"""Dynamo regions of garbage-collected attnopt compiles whose invalidated entries may remain."""


def _compiled_codes() -> Iterator[types.CodeType]:
    for ref in list(input_codes.seen):
        code = ref()
        if code is not None:
            yield code


def release_region(region: int) -> None:
    """Invalidate every cache entry of a dropped dynamo region, as dynamo does for an entry whose
    guarded object died: its compiled code, guards and backend are freed at once."""
    _dropped_regions.add(region)
    for code in _compiled_codes():
        for entry in _get_cache_entries_for_region(code, region):
            manager = entry.guard_manager
            if not isinstance(manager, DeletedGuardManagerWrapper):
                manager.extra_state.invalidate(manager.cache_entry, DeletedGuardManagerWrapper(
                    "the attnopt model compiled into this entry was garbage collected"))


def clear_dropped_regions() -> None:
    """Reset dynamo's cache of every code whose entries all come from dropped attnopt regions.

    Torch cannot remove a single invalidated entry, and such entries still count towards
    `accumulated_recompile_limit`; a code holding nothing else is as if never compiled. Run
    only from attnopt's entry points, never from a finalizer: dynamo may be using the cache then.
    """
    if not _dropped_regions or torch.compiler.is_compiling():
        return
    remaining = set()
    for code in _compiled_codes():
        regions = {entry.isolate_recompiles_id for entry in _debug_get_cache_entry_list(code)}
        if regions and regions <= _dropped_regions:
            reset_code(code)
        else:
            remaining |= regions
    _dropped_regions.intersection_update(remaining)


def own_region(context: Any) -> None:
    """Put a torch.compile call (its dynamo context) in a dynamo region of its own, from the
    compile running now on, and release that region when the context is garbage collected."""
    if context._isolate_recompiles_id < 0:
        context._isolate_recompiles_id = next(eval_frame._next_isolate_recompiles_id)
        set_eval_frame_isolate_recompiles_id(context._isolate_recompiles_id)
    weakref.finalize(context, release_region, context._isolate_recompiles_id)


def compiling_context() -> Any:
    """The dynamo context (one per torch.compile call) whose compile is running now, or None.

    Dynamo does not tell a backend which torch.compile call it compiles for; the context is a
    local of the `compile_wrapper` frame that entered dynamo, the nearest one up the stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename == eval_frame.__file__:
            context = frame.f_locals.get("self")
            return context if isinstance(context, eval_frame._TorchDynamoContext) else None
        frame = frame.f_back
    return None


def _graph_break_reasons() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def _run(model: Callable, /, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def _counting(backend: AttnoptBackend, runs: list[int]) -> Callable:
    """`backend`, with every run of a graph it compiled counted in runs[0]. It holds the backend
    weakly: dynamo keeps every backend it was given until torch._dynamo.reset()."""
    backend_ref = weakref.ref(backend)

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        compiled = backend_ref()(gm, example_inputs)

        def run_graph(*args: Any) -> Any:
            runs[0] += 1
            return compiled(*args)

        return run_graph

    return compile_graph


class CompiledCall:
    """Calls a model compiled with `backend`, checking that dynamo really ran a graph of it.

    The model is an argument, not captured, so the call belongs to no model. Each instance
    compiles its own copy of `_run`'s code in its own dynamo region (see the module doc).
    Dynamo's automatic dynamic shapes are on (`dynamic=None`): a size that changed between calls
    (a decode loop's KV length) is traced symbolically from then on, instead of one dynamo
    compile per size; the backend still analyses each graph at its calls' concrete sizes.
    A copy or an unpickled instance compiles anew for a fresh backend with the same policy:
    it plans on its first call, for the weights of the model it is called with.
    """

    def __init__(self, backend: AttnoptBackend, fullgraph: bool = False):
        clear_dropped_regions()
        self.backend = backend
        self.fullgraph = fullgraph
        self._graph_runs = [0]
        run = types.FunctionType(_run.__code__.replace(), _run.__globals__, _run.__name__)
        compile_graph = _counting(backend, self._graph_runs)
        self.compiled = torch.compile(run, backend=compile_graph, dynamic=None, fullgraph=fullgraph,
                                      isolate_recompiles=True)
        self.seen: set[tuple] = set()
        weakref.finalize(self, _forget_call, self.compiled._isolate_recompiles_id, compile_graph)

    def __reduce__(self) -> tuple:
        return _fresh_call, (self.backend.policy, self.backend.check, self.fullgraph, self.backend.inner)

    # Under a torch.compile applied on top of attnopt's module, dynamo would otherwise trace into
    # this call: the settings patch below breaks its graph and skips the whole frame, and without
    # it dynamo inlines the original model, ignoring attnopt's backend — the rewrite silently gone.
    # Disabled here, the call is one explicit graph break of the outer compile: it compiles the
    # code around the model, and the model runs attnopt's own compiled graphs (Inductor's).
    @torch._dynamo.disable(reason="attnopt runs its own compiled graphs of the model")
    def __call__(self, model: Callable, *args: Any, **kwargs: Any) -> Any:
        key = signature_of(tuple(args) + tuple(kwargs.values()))
        runs_before = self._graph_runs[0]
        new = key not in self.seen
        breaks_before = _graph_break_reasons() if new else None
        with strict_dynamo():
            out = self.compiled(model, *args, **kwargs)
        if new:
            self.seen.add(key)
            if self._graph_runs[0] == runs_before:
                raise AttnoptError(
                    "dynamo ran this call eagerly: no compiled graph of the model ran, so attnopt saw "
                    "none of its operations. Check TORCH_LOGS='graph_breaks' for the reason.")
            for reason, count in _graph_break_reasons().items():
                if count > breaks_before.get(reason, 0):
                    self.backend.report.graph_breaks.append(reason.splitlines()[0])
        return out


def _forget_call(region: int, compile_graph: Callable) -> None:
    """Drop what a garbage-collected CompiledCall left in dynamo: its region's cache entries and
    dynamo's reference to its backend."""
    release_region(region)
    for key, kept in list(eval_frame.cached_backends.items()):
        if getattr(kept, "compiler_fn", None) is compile_graph:
            del eval_frame.cached_backends[key]


def _fresh_call(policy: Any, check: bool, fullgraph: bool, inner: str = "inductor") -> CompiledCall:
    return CompiledCall(AttnoptBackend(policy, check=check, inner=inner), fullgraph)


def capture(model: nn.Module | Callable, args: tuple = (), kwargs: dict | None = None,
            backend: AttnoptBackend | None = None) -> AttnoptBackend:
    """Run `model(*args, **kwargs)` once through an analysing backend; return it with its report."""
    if not callable(model):
        raise AttnoptError(f"attnopt needs a callable model, got {type(model).__name__}.")
    check_inputs(args, kwargs)
    backend = backend or AttnoptBackend(None)
    with torch.random.fork_rng(devices=[]):
        CompiledCall(backend)(model, *args, **(kwargs or {}))
    return backend
