"""Run a model under dynamo with an attnopt backend, and refuse to be fooled by it.

Dynamo can quietly run a frame eagerly (a recompile limit hit, an unsupported construct, an
error in a backend when `suppress_errors` is on). For attnopt that would mean reporting "no
attention" or returning a model that silently runs un-rewritten, so every call made here:

* raises the recompile limits (each optimized model has its own backend instance, which dynamo
  treats as a new cache entry) and makes hitting them an error, not a fallback;
* turns `suppress_errors` off, so backend errors surface;
* checks that a call with a new input signature produced at least one graph.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch._dynamo
from torch import nn

from .backend import AttnoptBackend, AttnoptError, signature_of

_LIMIT = 4096


@contextlib.contextmanager
def strict_dynamo() -> Iterator[None]:
    """dynamo settings under which a fallback to eager is an error, for the duration of a call."""
    with torch._dynamo.config.patch(recompile_limit=_LIMIT, accumulated_recompile_limit=_LIMIT,
                                    fail_on_recompile_limit_hit=True, suppress_errors=False):
        yield


def _graph_break_reasons() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


class CompiledCall:
    """Calls `model` compiled with `backend`, checking that dynamo really captured it."""

    def __init__(self, model: Callable, backend: AttnoptBackend, fullgraph: bool = False):
        self.backend = backend

        def run(*args: Any, **kwargs: Any) -> Any:
            return model(*args, **kwargs)

        # Compiling a closure rather than the module leaves the module itself untouched
        # (torch.compile(module) marks the module with an attribute).
        self.compiled = torch.compile(run, backend=backend, dynamic=False, fullgraph=fullgraph)
        self.seen: set[tuple] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = signature_of(tuple(args) + tuple(kwargs.values()))
        graphs_before = self.backend.report.graphs
        compiled_before = self.backend.compiled_signatures
        breaks_before = _graph_break_reasons()
        with strict_dynamo():
            out = self.compiled(*args, **kwargs)
        if key not in self.seen:
            self.seen.add(key)
            if self.backend.report.graphs == graphs_before and self.backend.compiled_signatures == compiled_before:
                raise AttnoptError(
                    "dynamo captured no graph for this call: the model ran eagerly, so attnopt saw "
                    "none of its operations. Check TORCH_LOGS='graph_breaks' for the reason.")
            for reason, count in _graph_break_reasons().items():
                if count > breaks_before.get(reason, 0):
                    self.backend.report.graph_breaks.append(reason.splitlines()[0])
        return out


def capture(model: nn.Module | Callable, args: tuple = (), kwargs: dict | None = None,
            backend: AttnoptBackend | None = None) -> AttnoptBackend:
    """Run `model(*args, **kwargs)` once through an analysing backend; return it with its report."""
    if not callable(model):
        raise AttnoptError(f"attnopt needs a callable model, got {type(model).__name__}.")
    if not isinstance(args, tuple):
        raise AttnoptError(f"`args` must be a tuple of positional inputs, got {type(args).__name__}.")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise AttnoptError(f"`kwargs` must be a dict of keyword inputs, got {type(kwargs).__name__}.")
    backend = backend or AttnoptBackend(None)
    with torch.random.fork_rng(devices=[]):
        CompiledCall(model, backend)(*args, **(kwargs or {}))
    return backend
