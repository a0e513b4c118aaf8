"""The public verbs: inspect, rewrite, optimize, report_of, and the `attnopt` torch.compile backend."""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect as python_inspect
import types
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .backend import AttnoptBackend, AttnoptError
from .calibration import calibrator_for
from .capture import CompiledCall, capture, check_inputs, compiling_context, own_region
from .evaluation_cache import EvaluationCache
from .loops import plan_for_loop
from .planner import Budget, BudgetNotMetWarning
from .policies import BudgetPolicy, ExactPolicy, Policy, VariantPolicy
from .report import Report
from .variants import ExactConfig, config_for, mediator_timestep


def inspect(model: nn.Module | Callable, args: tuple = (), kwargs: dict | None = None) -> Report:
    """Find every softmax attention in `model` as it runs on `args`/`kwargs`; change nothing."""
    return capture(model, args, kwargs).report


class AttnoptModule(nn.Module):
    """`model` with its attention sites rewritten; same call signature and outputs.

    The original module is held, not copied: parameters are shared and the original is not
    modified. Graphs are compiled per input signature on first use (decisions are per shape;
    see `attnopt.backend._PerSignature` for the size buckets exact rewrites share, and dynamo
    compiles sizes that change between calls, e.g. a decode loop's KV length, symbolically).
    When the model's forward takes a `timestep` argument (diffusers), each call runs inside
    `mediator_timestep(timestep)`, so mediator sites follow their schedule.

    It stands in for the model: any attribute it does not have itself is the model's
    (`config`, `device`, `dtype`, user attributes), and the model's methods run with a `self`
    whose calls (`self(...)`, `self.__call__`) go through the rewrite, so `generate` and other
    loops over the model's forward run the rewritten attention. That `self` shares the model's
    attributes (what a method sets is set on the model) and is an instance of a subclass of the
    model's class.

    The attention modules attnopt put at the sites (calibrated feature maps, mediator tokens,
    V shortcuts, hybrid mixing weights) are its own: in `parameters()` and `state_dict()` as
    `attnopt_sites.<site id>.<name>`, next to the model's keys, which are the model's own (no
    `model.` prefix). So `load_state_dict` takes the model's own state dict (the sites keep
    their values) as well as a full one of a rewrite (the sites' keys load into them).

    `copy.deepcopy` and pickling (`torch.save`) give a module that owns its copy of the model
    and plans anew, for that copy's weights, on its first call (the report starts empty); a copy
    of a module `attnopt.load` returned holds copies of the file's site modules and applies its
    decisions again. `attnopt.save` writes the plans and site modules themselves.
    Hooks registered on the model's modules after the rewrite run: the call recompiles.
    """

    def __init__(self, model: nn.Module, backend: AttnoptBackend, timestep_arg: str | None = "timestep"):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_attnopt_call", CompiledCall(backend))
        object.__setattr__(self, "_timestep_arg", timestep_arg if _takes(model, timestep_arg) else None)
        self.register_load_state_dict_pre_hook(_into_model)

    @property
    def _attnopt_backend(self) -> AttnoptBackend:
        return self._attnopt_call.backend

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        timestep = self._timestep(args, kwargs)
        if timestep is None:
            return self._attnopt_call(self.model, *args, **kwargs)
        with mediator_timestep(timestep), _int_traced_symbolically(self._timestep_source(args, kwargs, timestep)):
            return self._attnopt_call(self.model, *args, **kwargs)

    def _timestep(self, args: tuple, kwargs: dict) -> Any:
        if self._timestep_arg is None:
            return None
        try:
            bound = python_inspect.signature(self.model.forward).bind_partial(*args, **kwargs)
        except TypeError:
            return None
        return bound.arguments.get(self._timestep_arg)

    def _timestep_source(self, args: tuple, kwargs: dict, timestep: Any) -> str | None:
        """Dynamo's name for a Python-int timestep in the compiled call (`_run(model, *args,
        **kwargs)`), or None for any other timestep. A sampling loop passes a new int every step;
        traced as a constant, each step would compile (and analyse) its own graph."""
        if not isinstance(timestep, int) or isinstance(timestep, bool):
            return None
        if self._timestep_arg in kwargs:
            return f"L['kwargs']['{self._timestep_arg}']"
        try:
            position = list(python_inspect.signature(self.model.forward).parameters).index(self._timestep_arg)
        except (TypeError, ValueError):
            return None
        return f"L['args'][{position}]" if position < len(args) and args[position] is timestep else None

    def __getattr__(self, name: str) -> Any:
        """The model's attribute, for names neither nn.Module nor this class resolve.

        Dunder names and this class's own are never forwarded (copy, pickle and the module's
        half-built states during __init__ and unpickling ask for them), and the model is read
        from `_modules` directly, so no lookup here can recurse."""
        try:
            return super().__getattr__(name)
        except AttributeError as missing:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name in _OWN_NAMES or (name.startswith("__") and name.endswith("__")):
                raise missing from None
        try:
            found = python_inspect.getattr_static(model, name)
        except AttributeError:
            found = None
        if isinstance(found, types.FunctionType) and name not in model.__dict__:
            return types.MethodType(found, _rewritten_self(model, self))  # a method of the model's class
        return getattr(model, name)

    def attnopt_site_modules(self) -> list[tuple[int, nn.Module]]:
        """(site id, attention module) of every module attnopt put at a site, by id, each once: a
        module serving several sites (a graph recompiled for another grad mode reuses its
        decisions) is listed under its first id. They are not submodules (the compiled graphs
        hold them), so `state_dict` and `named_parameters` add them by hand."""
        seen: set[int] = set()
        listed = []
        for site_id, module in sorted(self._attnopt_backend._chosen.items()):
            if id(module) not in seen:
                seen.add(id(module))
                listed.append((site_id, module))
        return listed

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The model's state dict with its own keys (no `model.` prefix), then each site module's
        state as `attnopt_sites.<site id>.<name>` (none for the exact op, which has no state)."""
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (*args, *(destination, prefix, keep_vars)[len(args):])
        state = self.model.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for site_id, module in self.attnopt_site_modules():
            module.state_dict(destination=state, prefix=f"{prefix}{SITES}.{site_id}.", keep_vars=keep_vars)
        return state

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:
        """The model's parameters (as `model.`...), then those of the attention modules attnopt put
        at its sites — calibrated feature maps, mediator tokens, hybrid mixing weights — as
        `attnopt_sites.<site id>.<name>`, so `parameters()` hands an optimizer everything the
        rewritten forward learns."""
        seen: set[int] = set()
        for name, parameter in super().named_parameters(prefix, recurse, remove_duplicate):
            seen.add(id(parameter))
            yield name, parameter
        if not recurse:
            return
        for site_id, module in self.attnopt_site_modules():
            for name, parameter in module.named_parameters(remove_duplicate=remove_duplicate):
                if remove_duplicate and id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                yield f"{prefix}{'.' if prefix else ''}{SITES}.{site_id}.{name}", parameter

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> AttnoptModule:
        """`.to()`, `.half()`, `.double()`, `.cuda()`, `.cpu()` (all `_apply`): the model's and the
        site modules' tensors alike, so `parameters()` keeps one device and dtype. (A call with
        another dtype or device is a new signature, planned and checked for it.)"""
        super()._apply(fn, recurse)
        if recurse:
            for _, module in self.attnopt_site_modules():
                module._apply(fn)
        return self

    def train(self, mode: bool = True) -> AttnoptModule:
        """The model's and the site modules' training mode alike."""
        super().train(mode)
        for _, module in self.attnopt_site_modules():
            module.train(mode)
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict as `state_dict()` gives it: the model's keys into the model, the
        `attnopt_sites.<site id>.` keys into those sites' modules.

        The model's own state dict (no site keys) loads as into the model; the site modules keep
        their current parameters then. A site whose keys are given must be given whole; under
        `strict`, keys of a site this module does not have are unexpected, as any unknown key."""
        sites = {key: value for key, value in state_dict.items() if key.startswith(f"{SITES}.")}
        rest = collections.OrderedDict((key, value) for key, value in state_dict.items() if key not in sites)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            rest._metadata = metadata  # type: ignore[attr-defined]
        loaded = self.model.load_state_dict(rest, strict=False, assign=assign)
        missing, unexpected = list(loaded.missing_keys), list(loaded.unexpected_keys)
        self._load_sites(sites, "", missing, unexpected, assign)
        if strict and (missing or unexpected):
            problems = [f"{what} key(s) in state_dict: {', '.join(repr(key) for key in keys)}."
                        for what, keys in (("Unexpected", unexpected), ("Missing", missing)) if keys]
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self.model).__name__}:\n\t"
                               + "\n\t".join(problems))
        return _IncompatibleKeys(missing, unexpected)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Loaded as part of a larger module: the sites' keys into the sites (the model's keys move
        under `model.` in the `_into_model` pre-hook, for the model's own modules to load)."""
        sites = {key: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(f"{prefix}{SITES}.")]}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._load_sites(sites, prefix, missing_keys, unexpected_keys,
                         local_metadata.get("assign_to_params_buffers", False))

    def _load_sites(self, sites: dict[str, Any], prefix: str, missing: list, unexpected: list, assign: bool) -> None:
        """Load `<prefix>attnopt_sites.<id>.<name>` keys into the site modules; note the keys of
        unknown sites as unexpected, and those a given site lacks or does not have as such."""
        chosen = self._attnopt_backend._chosen
        per_site: dict[int, dict[str, Any]] = collections.defaultdict(dict)
        for key, value in sites.items():
            site, _, name = key[len(prefix) + len(SITES) + 1:].partition(".")
            if not site.isdigit() or int(site) not in chosen or not name:
                unexpected.append(key)
                continue
            per_site[int(site)][name] = value
        for site, state in per_site.items():
            loaded = chosen[site].load_state_dict(state, strict=False, assign=assign)
            missing.extend(f"{prefix}{SITES}.{site}.{name}" for name in loaded.missing_keys)
            unexpected.extend(f"{prefix}{SITES}.{site}.{name}" for name in loaded.unexpected_keys)


@contextlib.contextmanager
def _int_traced_symbolically(source: str | None) -> Any:
    """Dynamo traces the int at `source` (a dynamo source name) as a symbolic int from its first
    compile on, instead of as a constant, so one graph serves every value (None: no change)."""
    if source is None:
        yield
        return
    known = torch.compiler.config.dynamic_sources
    with torch.compiler.config.patch(dynamic_sources=f"{known},{source}" if known else source):
        yield


SITES = "attnopt_sites"
"""The prefix of the site modules' parameters and state in an AttnoptModule: `attnopt_sites.<id>.<name>`."""

_OWN_NAMES = frozenset({"model", "_attnopt_call", "_timestep_arg", "_attnopt_backend"})


def _into_model(module: AttnoptModule, state_dict: dict, prefix: str, *_: Any) -> None:
    """Load pre-hook for a rewrite inside a larger module (whose load reaches it only through
    `_load_from_state_dict`): its keys are the model's, so they are moved under `model.`."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


@functools.cache
def _rewritten_class(cls: type) -> type:
    """A subclass of the model's class whose calls go through the rewrite holding it."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._attnopt_rewrite(*args, **kwargs)

    namespace = {"__slots__": ("_attnopt_rewrite",), "__call__": __call__, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    return type(cls.__name__, (cls,), namespace)


def _rewritten_self(model: nn.Module, rewrite: AttnoptModule) -> nn.Module:
    """`model` as the `self` of its methods called through `rewrite`: the same attributes (one
    shared __dict__), but calling it calls `rewrite`. Made per access, never stored, so copies
    and pickles of the rewrite never see it."""
    view = object.__new__(_rewritten_class(type(model)))
    object.__setattr__(view, "__dict__", model.__dict__)
    object.__setattr__(view, "_attnopt_rewrite", rewrite)
    return view


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


def _variant_policy(variant: str, params: dict[str, Any], calibration: Any = None) -> Policy:
    try:
        config = config_for(variant, **params)
    except KeyError as unknown:
        raise AttnoptError(str(unknown.args[0])) from None
    except (TypeError, ValueError) as bad:
        raise AttnoptError(f"bad parameters for the {variant} variant: {bad}") from None
    # the exact op stands in for any site unmeasured: no analysing run, no per-instance plans
    if isinstance(config, ExactConfig):
        return ExactPolicy()
    # a default config (no parameters given) is not applied where it is predicted slower than softmax
    return VariantPolicy(config, calibration=calibration, keep_slower=not params)


def _wrap(model: nn.Module, policy: Policy, args: tuple, kwargs: dict | None, timestep_arg: str | None,
          inner: str = "eager") -> AttnoptModule:
    check_inputs(args, kwargs)
    wrapped = AttnoptModule(model, AttnoptBackend(policy, inner=inner), timestep_arg)
    if args or kwargs:
        with torch.random.fork_rng(devices=[]):
            wrapped(*args, **(kwargs or {}))
    return wrapped


def rewrite(model: nn.Module, variant: str = "exact", args: tuple = (), kwargs: dict | None = None, *,
            calibration: Any = None, inner: str = "eager", **variant_params: Any) -> AttnoptModule:
    """Rewrite every rewritable site of `model` into `variant` ("exact", "agent", "linear", "mediator").

    `variant_params` are the variant's config fields (e.g. agent_fraction=0.1). A site the
    variant cannot stand in for keeps its softmax, with the reason in its decision. Without
    `variant_params` (the variant's default config), so does a site where the cost model
    predicts the variant no faster than the site's softmax (e.g. 64 agents for 32 tokens);
    given parameters are applied wherever the variant can run.
    `args`/`kwargs` are example inputs: the model is run on them once, so the returned module's
    report is filled and its first shape is compiled (and, for agent and mediator, calibrated).
    `calibration`: batches of model inputs (tuples, dicts, a DataLoader) or an
    `attnopt.calibration.Calibration`: each site's module is fitted on them (learned linear feature
    maps, mediators, hybrid's mix, agents' per-head stage temperatures) and its error measured on
    held-out batches (attnopt.calibration).
    `inner`: what runs the rewritten graphs — "eager" (default: the rewritten fx graph) or
    "inductor" (Inductor compiles each input signature's graph, fusing everything around
    attention, attnopt's ops called as extern kernels; an Inductor failure or a mismatch on the
    first call runs the graph eagerly, noted in the report). Under "inductor", everything outside
    attnopt's ops — sites left as softmax included — has Inductor's numerics, exactly as
    `torch.compile(model)` gives them; these can differ from eager's (fp16 rows whose every key
    is masked with finfo.min: bench/RESULTS.md), which is why "eager" is the default here: the
    returned module stands in for the eager model. (`torch.compile(model, backend="attnopt")`
    stands in for `torch.compile(model)` and defaults to "inductor".)
    """
    _check_model(model, "rewrite")
    policy = _variant_policy(variant, variant_params, calibrator_for(model, calibration))
    return _wrap(model, policy, args, kwargs, "timestep", inner)


def optimize(model: nn.Module, budget: Budget | float, args: tuple = (), kwargs: dict | None = None, *,
             candidates: Sequence[Any] | None = None, strict: bool = False, device: Any = None,
             timestep_arg: str | None = "timestep", calibration: Any = None,
             inner: str = "eager", loop: Callable[[nn.Module], Any] | None = None,
             output_gains: bool = False) -> AttnoptModule:
    """Rewrite `model`'s attention so its whole forward meets `budget` at the least measured error.

    budget: a fraction of the original's predicted forward time (0.5 = twice as fast), or an
        `attnopt.Budget(time=, flops=, max_error=)`.
    candidates: variant configs to choose from at each site (default: attnopt.candidates.default_candidates).
    strict: raise `BudgetError` when the budget cannot be met (else warn and take the fastest plan).
    device: a device or `costmodel.DeviceProfile` to price candidates for (default: where the inputs are).
    timestep_arg: the forward argument holding a diffusion timestep, for mediator schedules.
    calibration: batches of model inputs (tuples, dicts, a DataLoader) or an
        `attnopt.calibration.Calibration`: candidates with parameters are fitted on them, every
        candidate's error is measured on held-out batches, and the learned linear map is tried.
    inner: what runs the rewritten graphs: "eager" (default) or "inductor" (see `rewrite`).
    loop: a short run of the loop the model serves (e.g. a 20-step sampler): called with a model,
        it returns the loop's final output (the final latent). With `Budget(loop_error=...)`, the
        error of that output against the original's is measured, and sites are held to tighter
        per-call errors, planning again, until it is within `loop_error` (attnopt.loops); the report's
        `loop` shows it beside the per-call errors. Later rounds plan from the first's candidate
        evaluations where their sites receive the same inputs (no candidate built or measured again).
    output_gains: measure how far each site's error moves the model's output (one more run of the
        graph per site; attnopt.sensitivity) and plan the least estimated output error instead of
        the least sum of site errors. Worth it where blocks reach the output with very different
        weights (gated blocks, e.g. DiT's adaLN); the report then shows each site's gain and the
        plan's predicted output error beside the measured one.

    Each new input signature is planned on its first call, on that call's inputs: their q, k, v
    at every site measure each candidate's error. The report (`report_of`) lists every decision
    and the plan per shape. When the budget cannot be met, `BudgetNotMetWarning` is warned at
    most once per returned model (a decode loop plans every step's new KV length).
    """
    _check_model(model, "optimize")
    budget, calibrator = _budget(budget), calibrator_for(model, calibration)

    def build(per_call: Budget, evaluations: EvaluationCache | None = None, strict: bool = strict) -> AttnoptModule:
        # a loop's planning rounds share `evaluations` (attnopt.loops): later rounds reuse the candidates measured
        policy = _ModelBudgetPolicy(per_call, candidates, strict=strict, device=device, calibration=calibrator,
                                    output_gains=output_gains, evaluations=evaluations)
        return _wrap(model, policy, args, kwargs, timestep_arg, inner)

    if loop is not None:
        if not callable(loop):
            raise AttnoptError(f"`loop` must be a callable taking a model, got {type(loop).__name__}.")
        return plan_for_loop(functools.partial(build, strict=False), model, loop, budget, strict=strict)
    if budget.loop_error is not None:
        raise AttnoptError("Budget.loop_error bounds a loop's final output: give the loop too, "
                           "optimize(model, budget, loop=run) with run(model) returning the loop's final output.")
    return build(budget)


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
    """The report of a module returned by `rewrite`/`optimize` or compiled with backend="attnopt":
    `torch.compile(model, backend="attnopt")`'s result, or `model` itself after
    `model.compile(backend="attnopt")` (which compiles the module in place)."""
    if isinstance(module, AttnoptModule):
        return module._attnopt_backend.report
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        if _is_attnopt(torch._dynamo.eval_frame.innermost_backend(module.dynamo_ctx.callback)):
            return _report_of_context(module.dynamo_ctx)
        if isinstance(module._orig_mod, AttnoptModule):
            return module._orig_mod._attnopt_backend.report
    context = _context_of_compiled_call(module)
    if context is not None and _is_attnopt(torch._dynamo.eval_frame.innermost_backend(context.callback)):
        return _report_of_context(context)
    raise AttnoptError(f"{type(module).__name__} was not produced by attnopt, so it has no report.")


def _report_of_context(context: Any) -> Report:
    backend = getattr(context, "_attnopt_backend", None)
    if backend is None:
        raise AttnoptError("this model was compiled with backend=\"attnopt\" but has not run yet: "
                           "its report is filled by its first call.")
    return backend.report


def _context_of_compiled_call(module: Any) -> Any:
    """The dynamo context of `module.compile(...)` (kept in the module's `_compiled_call_impl`) or of
    a function `torch.compile` returned: the `self` its compile wrapper closes over; else None."""
    call = module.__dict__.get("_compiled_call_impl") if isinstance(module, nn.Module) else module
    if not isinstance(call, types.FunctionType) or not hasattr(call, "_torchdynamo_orig_callable"):
        return None
    cells = dict(zip(call.__code__.co_freevars, call.__closure__ or ()))
    context = cells["self"].cell_contents if "self" in cells else None
    return context if isinstance(context, torch._dynamo.eval_frame._TorchDynamoContext) else None


def _is_attnopt(wrapper: Any) -> bool:
    return isinstance(wrapper, torch._TorchCompileWrapper) and wrapper.compiler_fn is attnopt_backend


def _policy_from_options(options: dict[str, Any]) -> Policy:
    """A policy from torch.compile options: {"budget": 0.5, "candidates": [...], "strict": True,
    "device": ..., "output_gains": True} plans; {"variant": "agent", **params} rewrites one variant; {} is exact."""
    options = dict(options)
    if "budget" in options:
        if "variant" in options:
            raise AttnoptError("give either a budget or a variant in the attnopt options, not both.")
        budget = _budget(options.pop("budget"))
        if budget.loop_error is not None:
            raise AttnoptError("Budget.loop_error needs the loop it bounds: use attnopt.optimize(model, budget, "
                               "loop=run); torch.compile's options cannot take one.")
        known = {"candidates", "strict", "device", "output_gains"}
        if set(options) - known:
            raise AttnoptError(f"unknown attnopt options {sorted(set(options) - known)}; with a budget: {sorted(known)}.")
        return _ModelBudgetPolicy(budget, **options)
    variant = options.pop("variant", "exact")
    return _variant_policy(variant, options)


class _ModelBudgetPolicy(BudgetPolicy):
    """The budget policy of one model (one `optimize` or torch.compile call): it plans each new
    input signature, but warns `BudgetNotMetWarning` at most once — a decode loop plans a new
    signature per step, and one warning says what each of them would."""

    _warned = False

    def choose(self, request: Any) -> Any:
        if not self._warned:
            choices = super().choose(request)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BudgetNotMetWarning)
                choices = super().choose(request)
        if choices.plan is not None and choices.plan.budget_met is False:
            self._warned = True
        return choices


COMPILE_INNER = "inductor"
"""What runs the rewritten graphs under `torch.compile(model, backend="attnopt")` unless the options
say otherwise: Inductor, as a plain `torch.compile(model)` would (`rewrite`/`optimize`: eager)."""


def attnopt_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict | None = None,
                    mode: str | None = None, _backend: weakref.ref[AttnoptBackend] | None = None) -> Callable:
    """`torch.compile(model, backend="attnopt", options={...})`: exact rewrite by default, under Inductor.

    Options: {"budget": 0.5 or attnopt.Budget(...), "candidates", "strict", "device", "output_gains"} plans under
    a budget; {"variant": "agent", **params} rewrites into one variant. The rewritten graphs are
    compiled by Inductor (the default, "inner": "inductor"): everything around attention is fused
    as under a plain `torch.compile(model)`, attnopt's ops are extern kernels Inductor calls, and
    outside them the numerics are Inductor's, as the user had them before switching backends (an
    Inductor failure runs the graph eagerly, noted in the report). At a site attnopt rewrites
    exactly, its op keeps eager PyTorch's result, also where Inductor's own lowering of that
    attention differs: rows whose every key is masked (NaN in eager for −inf masks, eager's fp16
    arithmetic for −1e4 ones; bench/RESULTS.md, the soak against plain torch.compile). {"inner": "eager"} runs the
    rewritten graphs as they are instead — eager PyTorch's numerics, no Inductor compile (2–15 s a
    graph on a CPU). `rewrite` and `optimize`, which return a drop-in replacement for the eager
    model, default to "eager" for the same reason. Each torch.compile call
    gets its own backend and report (`report_of(compiled)`; after `model.compile(backend=
    "attnopt")`, `report_of(model)`), kept across its recompiles, and its own dynamo region, so
    separately compiled instances of one class never share compiled code.

    torch.compile's other arguments: `mode` is accepted and ignored — its presets
    ("reduce-overhead", "max-autotune", ...) configure inductor (CUDA graphs, autotuning), which
    this backend runs with its default settings: attnopt's ops pick their own kernels, and the
    rewrite is the same in every mode (torch.compile takes either `mode` or `options`, so with a
    mode the rewrite is exact). `fullgraph`, `dynamic` and `disable` are dynamo's and act as for
    any backend: graphs dynamo makes dynamic are still analysed at the concrete shapes of their
    calls (Python floats it passes as tensors at their values).
    """
    del mode  # inductor's presets: nothing to configure here (see above)
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
    options = dict(options or {})
    inner = options.pop("inner", COMPILE_INNER)
    backend = AttnoptBackend(_policy_from_options(options), inner=inner)
    context._attnopt_backend = backend
    wrapper.kwargs = {**wrapper.kwargs, "_backend": weakref.ref(backend)}
    own_region(context)
    return backend
