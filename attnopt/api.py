"""The public verbs: inspect, rewrite, report_of, and the `attnopt` torch.compile backend."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .backend import AttnoptBackend, AttnoptError, exact_decider
from .capture import CompiledCall, capture
from .report import Report

_DECIDERS: dict[str, Callable] = {"exact": exact_decider}


def inspect(model: nn.Module | Callable, args: tuple = (), kwargs: dict | None = None) -> Report:
    """Find every softmax attention in `model` as it runs on `args`/`kwargs`; change nothing."""
    return capture(model, args, kwargs).report


class AttnoptModule(nn.Module):
    """`model` with its attention sites rewritten; same call signature and outputs.

    The original module is held, not copied: parameters are shared and the original is not
    modified. Graphs are compiled per input signature on first use (decisions are per shape).
    """

    def __init__(self, model: nn.Module, backend: AttnoptBackend):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_attnopt_backend", backend)
        object.__setattr__(self, "_attnopt_call", CompiledCall(model, backend))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._attnopt_call(*args, **kwargs)


def rewrite(model: nn.Module, variant: str = "exact", args: tuple = (), kwargs: dict | None = None,
            **variant_params: Any) -> AttnoptModule:
    """Rewrite every rewritable site of `model` into `variant` (e.g. "exact").

    `args`/`kwargs` are example inputs: the model is run on them once, so the returned module's
    report is filled and its first shape is compiled.
    """
    if variant not in _DECIDERS:
        raise AttnoptError(f"unknown variant {variant!r}; known: {', '.join(sorted(_DECIDERS))}.")
    if not isinstance(model, nn.Module):
        raise AttnoptError(f"attnopt.rewrite needs an nn.Module, got {type(model).__name__}.")
    decider = _DECIDERS[variant]
    if variant_params:
        decider = functools.partial(decider, **variant_params)
    wrapped = AttnoptModule(model, AttnoptBackend(decider=decider, name=variant))
    if args or kwargs:
        with torch.random.fork_rng(devices=[]):
            wrapped(*args, **(kwargs or {}))
    return wrapped


_RECENT: list[AttnoptBackend] = []


def report_of(module: Any) -> Report:
    """The report of a module returned by `rewrite`/`optimize` or compiled with backend="attnopt"."""
    backend = getattr(module, "_attnopt_backend", None)
    if backend is not None:
        return backend.report
    original = getattr(module, "_orig_mod", None)
    if original is not None and _RECENT:
        owned = {id(p) for p in original.parameters()}
        for backend in reversed(_RECENT):
            if backend.parameter_ids & owned:
                return backend.report
        return _RECENT[-1].report
    raise AttnoptError(f"{type(module).__name__} was not produced by attnopt, so it has no report.")


def attnopt_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict | None = None) -> Callable:
    """`torch.compile(model, backend="attnopt", options={...})`: exact rewrite by default."""
    options = dict(options or {})
    variant = options.pop("variant", "exact")
    if variant not in _DECIDERS:
        raise AttnoptError(f"unknown variant {variant!r}; known: {', '.join(sorted(_DECIDERS))}.")
    key = hash((variant, tuple(sorted((k, repr(v)) for k, v in options.items()))))
    parameter_ids = {id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)}
    backend = None
    for candidate in reversed(_RECENT):
        if candidate.options_key == key and (candidate.parameter_ids & parameter_ids or not parameter_ids):
            backend = candidate
            break
    if backend is None:
        decider = _DECIDERS[variant]
        backend = AttnoptBackend(decider=functools.partial(decider, **options) if options else decider, name=variant)
        backend.options_key = key
        _RECENT.append(backend)
        del _RECENT[:-64]
    backend.parameter_ids |= parameter_ids
    return backend(gm, example_inputs)
