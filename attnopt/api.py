"""The public verbs: inspect, rewrite, optimize, report_of, and the `attnopt` torch.compile backend."""

from __future__ import annotations

import inspect as python_inspect
import weakref
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from .backend import AttnoptBackend, AttnoptError
from .capture import CompiledCall, capture, check_inputs, compiling_context, own_region
from .planner import Budget
from .policies import BudgetPolicy, ExactPolicy, Policy, VariantPolicy
from .report import Report
from .variants import ExactConfig, config_for, mediator_timestep


def inspect(model: nn.Module | Callable, args: tuple = (), kwargs: dict | None = None) -> Report:
    """Find every softmax attention in `model` as it runs on `args`/`kwargs`; change nothing."""
    return capture(model, args, kwargs).report


class AttnoptModule(nn.Module):
    """`model` with its attention sites rewritten; same call signature and outputs.

    The original module is held, not copied: parameters are shared and the original is not
    modified. Graphs are compiled per input signature on first use (decisions are per shape).
    When the model's forward takes a `timestep` argument (diffusers), each call runs inside
    `mediator_timestep(timestep)`, so mediator sites follow their schedule.

    `copy.deepcopy` and pickling (`torch.save`) give a module that owns its copy of the model
    and plans anew, for that copy's weights, on its first call (the report starts empty).
    Hooks registered on the model's modules after the rewrite run: the call recompiles.
    """

    def __init__(self, model: nn.Module, backend: AttnoptBackend, timestep_arg: str | None = "timestep"):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_attnopt_call", CompiledCall(backend))
        object.__setattr__(self, "_timestep_arg", timestep_arg if _takes(model, timestep_arg) else None)

    @property
    def _attnopt_backend(self) -> AttnoptBackend:
        return self._attnopt_call.backend

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        timestep = self._timestep(args, kwargs)
        if timestep is None:
            return self._attnopt_call(self.model, *args, **kwargs)
        with mediator_timestep(timestep):
            return self._attnopt_call(self.model, *args, **kwargs)

    def _timestep(self, args: tuple, kwargs: dict) -> Any:
        if self._timestep_arg is None:
            return None
        try:
            bound = python_inspect.signature(self.model.forward).bind_partial(*args, **kwargs)
        except TypeError:
            return None
        return bound.arguments.get(self._timestep_arg)


def _takes(model: nn.Module, name: str | None) -> bool:
    if name is None:
        return False
    try:
        return name in python_inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _check_model(model: Any, verb: str) -> None:
    if not isinstance(model, nn.Module):
        raise AttnoptError(f"attnopt.{verb} needs an nn.Module, got {type(model).__name__}.")


def _variant_policy(variant: str, params: dict[str, Any]) -> Policy:
    try:
        config = config_for(variant, **params)
    except KeyError as unknown:
        raise AttnoptError(str(unknown.args[0])) from None
    except (TypeError, ValueError) as bad:
        raise AttnoptError(f"bad parameters for the {variant} variant: {bad}") from None
    # the exact op stands in for any site unmeasured: no analysing run, no per-instance plans
    return ExactPolicy() if isinstance(config, ExactConfig) else VariantPolicy(config)


def _wrap(model: nn.Module, policy: Policy, args: tuple, kwargs: dict | None, timestep_arg: str | None) -> AttnoptModule:
    check_inputs(args, kwargs)
    wrapped = AttnoptModule(model, AttnoptBackend(policy), timestep_arg)
    if args or kwargs:
        with torch.random.fork_rng(devices=[]):
            wrapped(*args, **(kwargs or {}))
    return wrapped


def rewrite(model: nn.Module, variant: str = "exact", args: tuple = (), kwargs: dict | None = None,
            **variant_params: Any) -> AttnoptModule:
    """Rewrite every rewritable site of `model` into `variant` ("exact", "agent", "linear", "mediator").

    `variant_params` are the variant's config fields (e.g. agent_fraction=0.1). A site the
    variant cannot stand in for keeps its softmax, with the reason in its decision.
    `args`/`kwargs` are example inputs: the model is run on them once, so the returned module's
    report is filled and its first shape is compiled (and, for agent and mediator, calibrated).
    """
    _check_model(model, "rewrite")
    return _wrap(model, _variant_policy(variant, variant_params), args, kwargs, "timestep")


def optimize(model: nn.Module, budget: Budget | float, args: tuple = (), kwargs: dict | None = None, *,
             candidates: Sequence[Any] | None = None, strict: bool = False, device: Any = None,
             timestep_arg: str | None = "timestep") -> AttnoptModule:
    """Rewrite `model`'s attention so its whole forward meets `budget` at the least measured error.

    budget: a fraction of the original's predicted forward time (0.5 = twice as fast), or an
        `attnopt.Budget(time=, flops=, max_error=)`.
    candidates: variant configs to choose from at each site (default: attnopt.candidates.default_candidates).
    strict: raise `BudgetError` when the budget cannot be met (else warn and take the fastest plan).
    device: a device or `costmodel.DeviceProfile` to price candidates for (default: where the inputs are).
    timestep_arg: the forward argument holding a diffusion timestep, for mediator schedules.

    Each new input signature is planned on its first call, on that call's inputs: their q, k, v
    at every site measure each candidate's error. The report (`report_of`) lists every decision
    and the plan per shape.
    """
    _check_model(model, "optimize")
    policy = BudgetPolicy(_budget(budget), candidates, strict=strict, device=device)
    return _wrap(model, policy, args, kwargs, timestep_arg)


def _budget(budget: Any) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise AttnoptError(f"budget must be a number (a fraction of the original's time) or an attnopt.Budget, "
                           f"got {type(budget).__name__}.")
    try:
        return Budget(time=float(budget))
    except ValueError as bad:
        raise AttnoptError(str(bad)) from None


def report_of(module: Any) -> Report:
    """The report of a module returned by `rewrite`/`optimize` or compiled with backend="attnopt"."""
    if isinstance(module, AttnoptModule):
        return module._attnopt_backend.report
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        if _is_attnopt(torch._dynamo.eval_frame.innermost_backend(module.dynamo_ctx.callback)):
            backend = getattr(module.dynamo_ctx, "_attnopt_backend", None)
            if backend is None:
                raise AttnoptError("this model was compiled with backend=\"attnopt\" but has not run yet: "
                                   "its report is filled by its first call.")
            return backend.report
        if isinstance(module._orig_mod, AttnoptModule):
            return module._orig_mod._attnopt_backend.report
    raise AttnoptError(f"{type(module).__name__} was not produced by attnopt, so it has no report.")


def _is_attnopt(wrapper: Any) -> bool:
    return isinstance(wrapper, torch._TorchCompileWrapper) and wrapper.compiler_fn is attnopt_backend


def _policy_from_options(options: dict[str, Any]) -> Policy:
    """A policy from torch.compile options: {"budget": 0.5, "candidates": [...], "strict": True,
    "device": ...} plans; {"variant": "agent", **params} rewrites one variant; {} is exact."""
    options = dict(options)
    if "budget" in options:
        if "variant" in options:
            raise AttnoptError("give either a budget or a variant in the attnopt options, not both.")
        budget = _budget(options.pop("budget"))
        known = {"candidates", "strict", "device"}
        if set(options) - known:
            raise AttnoptError(f"unknown attnopt options {sorted(set(options) - known)}; with a budget: {sorted(known)}.")
        return BudgetPolicy(budget, **options)
    variant = options.pop("variant", "exact")
    return _variant_policy(variant, options)


def attnopt_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict | None = None,
                    mode: str | None = None, _backend: weakref.ref[AttnoptBackend] | None = None) -> Callable:
    """`torch.compile(model, backend="attnopt", options={...})`: exact rewrite by default.

    Options: {"budget": 0.5 or attnopt.Budget(...), "candidates", "strict", "device"} plans under
    a budget; {"variant": "agent", **params} rewrites into one variant. Each torch.compile call
    gets its own backend and report (`report_of(compiled)`), kept across its recompiles, and its
    own dynamo region, so separately compiled instances of one class never share compiled code.
    """
    if mode is not None:
        raise AttnoptError(f"the attnopt backend takes options={{...}}, not mode={mode!r}.")
    backend = _backend() if _backend is not None else _backend_of_this_compile(options)
    return backend(gm, example_inputs)


def _backend_of_this_compile(options: dict | None) -> AttnoptBackend:
    """A new backend for the torch.compile call compiling now (its first compile).

    The call's dynamo context holds it (for report_of). Its backend wrapper gets a weak reference
    to it, which dynamo passes back as `_backend` on recompiles and which makes the wrapper unequal
    to those of other calls: dynamo reuses cache entries across calls whose backends compare
    equal. (Dynamo keeps every wrapper until torch._dynamo.reset(), hence the weak reference.)
    """
    context = compiling_context()
    wrapper = torch._dynamo.eval_frame.innermost_backend(context.callback) if context is not None else None
    if not _is_attnopt(wrapper):
        raise AttnoptError('use the attnopt backend through torch.compile(model, backend="attnopt", options={...}).')
    backend = AttnoptBackend(_policy_from_options(options or {}))
    context._attnopt_backend = backend
    wrapper.kwargs = {**wrapper.kwargs, "_backend": weakref.ref(backend)}
    own_region(context)
    return backend
