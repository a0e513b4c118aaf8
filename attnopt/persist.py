"""Save and load: an optimized module's plans, decisions and site parameters in one file.

Calibration costs minutes and is done once: `save(optimized, path)` writes everything that was
decided, and `load(model, path)` gives the optimized module again for `model` without planning or
calibrating the shapes the file holds.

What the file holds (`torch.save` of plain containers — dicts, lists, tuples, str, numbers,
tensors — read back with `torch.load(weights_only=True)`; attnopt's dataclasses are written as
tagged dicts of their fields):

- `format` ("attnopt.plans") and `version` (FORMAT_VERSION): a newer or unknown version is refused;
- the policy (exact, one variant with its config, or the budget with its candidates, strictness
  and device), what runs the graphs (`inner`) and the timestep argument;
- the model's weights by name: shape, dtype and a checksum (a model of another structure is
  refused; other weights are warned about, where approximate decisions were measured on them);
- one entry per analysed graph and input signature (each `compile_for` call): the call's key
  (`backend.call_key`: input shapes, dtypes, devices, numbers), every site found (identity:
  module, form, shape, mask, causality, dropout, dtype, scale, source; rewritable or why not;
  the analysed facts; the decision with its measured error and every candidate) and the plan;
- every site module — what it is (variant config and site facts, per-head split, causal-mask
  wrapper) and its state dict (calibrated feature maps, mediator tokens, V shortcuts, hybrid
  mixing weights) — and which site ids it serves.

What `load` does: it checks the model's weights against the file's (names and shapes: another
structure is an AttnoptError; other values a warning, where approximate decisions were measured
on the saved ones), builds every site module from the file at once (so `parameters()` and
`state_dict()` hold them before the first call), and wraps the model with a `LoadedPolicy`.
On the first call with each saved signature, dynamo captures the graph and the backend detects
and verifies its sites as always; a graph whose call key and sites equal a saved entry's (same
count, and per site the same module, form, shape, mask, causality, dropout, dtype and scale —
source lines are shown, not compared) takes its saved ids, decisions and modules: no recording
run, no candidates built or measured, no calibration, no knapsack. The end-to-end check runs as
for any rewrite (an exact rewrite must match the original on the call's inputs; an approximate
one's output error is measured again); the saved errors stay in the report, each decision and
plan marked `loaded_from`. Any other graph is planned as the saved policy plans (the same
budget, candidates and device) — with calibration only when `load(..., calibration=batches)` is
given, since the batches are not saved. A site at a module and form the file knows, but with
heads, head dims or a scale the file never saw there, is an AttnoptError naming the difference:
the model is another one (batch and sequence sizes may change between calls; those cannot).

The file is not the device profile cache (costmodel's measured rates, kept per machine): it
holds decisions, and the predicted seconds in them are those of the machine that saved it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import itertools
import math
import numbers
import os
import pickle
import warnings
from typing import IO, Any

import torch
from torch import nn

from .api import AttnoptModule, _check_model, _ModelBudgetPolicy
from .backend import AttnoptBackend, AttnoptError
from .calibration import calibrator_for
from .candidates import CausalMaskAttention
from .capture import check_inputs
from .policies import BudgetPolicy, Choice, Choices, ExactPolicy, GraphRequest, Policy, VariantPolicy
from .report import GraphPlan, Site
from .variants import ExactAttention, ExactConfig, SiteInfo, spec_for
from .variants.heads import HeadSplitAttention

FORMAT = "attnopt.plans"
FORMAT_VERSION = 1
"""The version `save` writes; `load` reads it and every older one."""

_DATACLASS, _DTYPE, _DEVICE = "__attnopt_dataclass__", "__attnopt_dtype__", "__attnopt_device__"


# ---------------------------------------------------------------- plain containers


def _encode(value: Any) -> Any:
    """`value` as plain containers torch.load(weights_only=True) reads: attnopt's dataclasses as
    tagged dicts of their fields, dtypes and devices as tagged strings, tensors detached."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # a str subclass (torch's version) would be a global to unpickle
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {_DEVICE: str(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("attnopt."):
            raise AttnoptError(f"attnopt.save cannot write a {cls.__qualname__} (only attnopt's own records).")
        return {_DATACLASS: f"{cls.__module__}:{cls.__qualname__}",
                "fields": {field.name: _encode(getattr(value, field.name)) for field in dataclasses.fields(value)
                           if field.init}}
    if isinstance(value, dict):  # a report row solves its lazy entries here (items())
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_encode(item) for item in value)
    if isinstance(value, list):
        return [_encode(item) for item in value]
    raise AttnoptError(f"attnopt.save cannot write a value of type {type(value).__name__}: {value!r}.")


def _decode(value: Any) -> Any:
    """The inverse of `_encode`; only dataclasses of attnopt's own modules are made."""
    if isinstance(value, dict):
        if _DTYPE in value:
            dtype = getattr(torch, str(value[_DTYPE]), None)
            if not isinstance(dtype, torch.dtype):
                raise AttnoptError(f"the file names a dtype {value[_DTYPE]!r} torch does not have.")
            return dtype
        if _DEVICE in value:
            return torch.device(value[_DEVICE])
        if _DATACLASS in value:
            return _make(value[_DATACLASS], {name: _decode(item) for name, item in value["fields"].items()})
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_decode(item) for item in value)
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def _make(name: str, fields: dict[str, Any]) -> Any:
    module_name, _, qualname = name.partition(":")
    if not module_name.startswith("attnopt."):
        raise AttnoptError(f"the file names a record type {name!r} that is not attnopt's.")
    try:
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"{name} is not a record type")
        return cls(**fields)
    except (ImportError, AttributeError, TypeError, ValueError) as bad:
        raise AttnoptError(f"the file holds a {qualname} this attnopt cannot make ({bad}); it was written by "
                           f"another attnopt version: save it again with this one.") from None


# ---------------------------------------------------------------- site modules


def _describe(module: nn.Module) -> dict[str, Any]:
    """What a site module is, as `_rebuild` makes it again (its state is saved apart)."""
    if isinstance(module, CausalMaskAttention):
        return {"kind": "causal_mask", "inner": _describe(module.attention)}
    if isinstance(module, HeadSplitAttention):
        return {"kind": "head_split", "split": _encode(module.split), "heads": module.heads,
                "kv_heads": module.kv_heads, "inner": _describe(module.attention)}
    config = ExactConfig() if isinstance(module, ExactAttention) else getattr(module, "config", None)
    try:
        spec_for(config)
    except TypeError:
        raise AttnoptError(f"attnopt.save cannot write the site module {type(module).__name__}: it is no "
                           f"registered variant's module.") from None
    site_info = getattr(module, "site_info", None)
    if site_info is None and not isinstance(module, ExactAttention):
        raise AttnoptError(f"attnopt.save cannot write the site module {type(module).__name__}: it keeps no "
                           f"`site_info` to build it again from.")
    return {"kind": "variant", "config": _encode(config), "site_info": _encode(site_info)}


def _rebuild(description: dict[str, Any]) -> nn.Module:
    """The site module `description` says, with fresh parameters (the saved state loads into it)."""
    kind = description["kind"]
    if kind == "causal_mask":
        return CausalMaskAttention(_rebuild(description["inner"]))
    if kind == "head_split":
        # HeadSplitAttention reads the site's head counts only
        heads = SiteInfo(B=1, H=description["heads"], Hkv=description["kv_heads"], N=1, M=1, d=1, e=1)
        return HeadSplitAttention(_rebuild(description["inner"]), _decode(description["split"]), heads)
    if kind == "variant":
        config = _decode(description["config"])
        return spec_for(config).build(config, _decode(description["site_info"]), None)
    raise AttnoptError(f"the file holds a site module of unknown kind {kind!r}; save it again with this attnopt.")


def _check_rebuilt(module: nn.Module, description: dict[str, Any]) -> None:
    """Raise AttnoptError when `_rebuild(description)` would differ from `module` in a setting
    kept outside its state dict (e.g. a hybrid mix set by hand): the file would not be it."""
    rebuilt = _rebuild(description)
    for (name, mine), (_, theirs) in zip(module.named_modules(), rebuilt.named_modules()):
        for attribute, value in vars(mine).items():
            if attribute.startswith("_") or not isinstance(value, (bool, int, float, str, tuple)):
                continue
            if getattr(theirs, attribute, None) != value:
                raise AttnoptError(f"attnopt.save cannot write the site module {type(module).__name__}: its "
                                   f"{(name + '.' if name else '') + attribute} = {value!r} is not what its config "
                                   f"builds ({getattr(theirs, attribute, None)!r}), and only its state dict is saved.")


# ---------------------------------------------------------------- policies


def _policy_record(policy: Policy | None) -> dict[str, Any]:
    if isinstance(policy, LoadedPolicy):
        return policy.policy_record
    if isinstance(policy, ExactPolicy):
        return {"kind": "exact"}
    if isinstance(policy, VariantPolicy):
        return {"kind": "variant", "config": _encode(policy.config), "device": _encode(policy.device),
                "calibrated": policy.calibration is not None, "keep_slower": policy.keep_slower}
    if isinstance(policy, BudgetPolicy):
        return {"kind": "budget", "budget": _encode(policy.budget),
                "candidates": None if policy.candidates is None else _encode(list(policy.candidates)),
                "strict": policy.strict, "device": _encode(policy.device),
                "calibrated": policy.calibration is not None, "output_gains": policy.output_gains}
    raise AttnoptError(f"attnopt.save cannot write the decisions of a {type(policy).__name__} policy.")


def _policy_from(record: dict[str, Any], model: nn.Module, calibration: Any) -> Policy:
    """The policy that saved the file, for the shapes the file does not hold."""
    kind = record["kind"]
    if kind == "exact":
        return ExactPolicy()
    calibrator = calibrator_for(model, calibration)
    if kind == "variant":
        return VariantPolicy(_decode(record["config"]), device=_decode(record["device"]), calibration=calibrator,
                             keep_slower=record.get("keep_slower", False))
    if kind == "budget":
        candidates = record["candidates"]
        return _ModelBudgetPolicy(_decode(record["budget"]), None if candidates is None else _decode(candidates),
                                  strict=record["strict"], device=_decode(record["device"]), calibration=calibrator,
                                  output_gains=record.get("output_gains", False))
    raise AttnoptError(f"the file's policy is of unknown kind {kind!r}; save it again with this attnopt.")


# ---------------------------------------------------------------- the model


def _weights(model: nn.Module) -> dict[str, tuple]:
    """Name → (shape, dtype, checksum) of every tensor in the model's state dict."""
    weights = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor):
                continue
            values = tensor.detach().double() if not tensor.is_meta else None
            checksum = None if values is None or values.numel() == 0 else (
                float(values.sum()), float(values.square().sum()))
            weights[name] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), checksum)
    return weights


def _check_structure(model: nn.Module, saved: dict[str, tuple], where: str) -> list[str]:
    """Raise AttnoptError unless the model has the saved model's weights (names and shapes); return
    the names of those whose values differ."""
    current = _weights(model)
    lacking = [name for name in saved if name not in current]
    extra = [name for name in current if name not in saved]
    reshaped = [f"{name} {current[name][0]} (saved: {saved[name][0]})" for name in saved
                if name in current and tuple(current[name][0]) != tuple(saved[name][0])]
    problems = [f"{len(names)} {what}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                for what, names in (("weights of the saved model it lacks", lacking),
                                    ("weights the saved model does not have", extra),
                                    ("weights of another shape", reshaped)) if names]
    if problems:
        raise AttnoptError(f"attnopt.load: {type(model).__name__} is not the model saved in {where}: "
                           + "; ".join(problems) + ". Load the file into the model it was saved from, "
                           "or optimize this one anew.")
    return [name for name in saved if not _same_checksum(saved[name][2], current[name][2])]


def _same_checksum(saved: Any, current: Any) -> bool:
    if saved is None or current is None:
        return saved is current
    return all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(saved, current))


# ---------------------------------------------------------------- matching sites


_COMPARED = ("module", "form", "shape", "causal", "mask", "dropout", "dtype", "scale")
"""What must be the same for a detected site to take a saved one's decision (not the source line:
an edited comment moves it)."""

_HEADS = (("shape", "scale"), ("H", "Hkv", "d", "e"))
"""What no call of the same model changes at a site (its batch and sequence sizes may change)."""


def _differences(saved: Site, found: Any, fields: tuple[str, ...] = _COMPARED,
                 dims: tuple[str, ...] | None = None) -> list[str]:
    """How the detected site `found` (a SiteMatch) differs from the saved one in `fields` (of its
    shape: `dims`, None for all), in words."""
    differences = []
    for name in fields:
        before, now = getattr(saved, name), getattr(found, name)
        if name == "shape":
            keys = dims if dims is not None else sorted(set(before) | set(now))
            changed = [f"{key}={now.get(key)} (saved {before.get(key)})" for key in keys if before.get(key) != now.get(key)]
            if changed:
                differences.append("shape " + ", ".join(changed))
        elif name in ("scale", "dropout") and before is not None and now is not None:
            if not math.isclose(float(before), float(now), rel_tol=1e-6):
                differences.append(f"{name} {now} (saved {before})")
        elif before != now:
            differences.append(f"{name} {now!r} (saved {before!r})")
    return differences


def _where(site: Any) -> str:
    return f"{site.module or '-'} ({site.form}{', ' + site.source if site.source else ''})"


@dataclasses.dataclass
class SavedGraph:
    """One saved analysis of a graph at one call key: its sites (with their saved ids and
    decisions) and plan, and the record it was read from (written again by a later save)."""

    key: str
    signature: str
    sites: list[Site]
    plan: GraphPlan | None
    record: dict[str, Any]

    def matches(self, found: list[Any]) -> bool:
        return len(found) == len(self.sites) and not any(
            _differences(saved, match) for saved, match in zip(self.sites, found))


class LoadedPolicy:
    """The decisions and site modules of a saved file, then `inner` (the policy that saved it)
    for the calls the file does not hold. See the module doc."""

    def __init__(self, inner: Policy, record: dict[str, Any], source: str, site_modules: dict[int, nn.Module]):
        self.inner = inner
        self.name = inner.name
        self.per_instance = inner.per_instance
        self.shares_sizes = getattr(inner, "shares_sizes", False)
        self.source = source
        self.policy_record = record["policy"]
        self.graphs = [SavedGraph(graph["key"], graph["signature"], _decode(graph["sites"]),
                                  _decode(graph["plan"]), graph) for graph in record["graphs"]]
        self.site_modules = dict(site_modules)
        self._graph_of_site = {site.id: graph for graph in self.graphs for site in graph.sites}
        self.first_site_id = max(self._graph_of_site, default=-1) + 1
        self._claimed: set[int] = set()  # indices of the saved graphs a compiled graph took

    def __getstate__(self) -> dict[str, Any]:  # a copy's backend starts afresh: nothing claimed
        return {**self.__dict__, "_claimed": set()}

    def site_ids(self, key: str, matches: list[Any]) -> list[int] | None:
        """The saved ids of a graph's sites, claiming the first unclaimed saved graph with this call
        key and the same sites; None for a call the file does not hold (or a further compile of a
        saved one: another grad mode or instance). AttnoptError when a site is where the file has
        one (module and form) but with heads, head dims or scale the file never saw there."""
        self._check_heads(matches)
        for index, graph in enumerate(self.graphs):
            if graph.key == key and index not in self._claimed and graph.matches(matches):
                self._claimed.add(index)
                return [site.id for site in graph.sites]
        return None

    def _check_heads(self, matches: list[Any]) -> None:
        """Raise AttnoptError naming every detected site whose head layout (H, Hkv, d, e, scale) is
        none the file saw at its module and form: the model is another one (batch and sequence
        sizes may change between calls; those cannot)."""
        saved: dict[tuple, list[Site]] = {}
        for graph in self.graphs:
            for site in graph.sites:
                saved.setdefault((site.module, site.form), []).append(site)
        problems = []
        for match in matches:
            known = saved.get((match.module, match.form))
            if known and all(_differences(site, match, *_HEADS) for site in known):
                problems.append(f"  the site at {_where(match)}: {'; '.join(_differences(known[0], match, *_HEADS))};")
        if problems:
            raise AttnoptError("\n".join([f"attnopt.load: the model's attention does not match what {self.source} "
                                          "saved:", *problems,
                                          "Load the file into the model it was saved from, or optimize this "
                                          "model anew."]))

    def choose(self, request: GraphRequest) -> Choices:
        """The saved decisions, modules and plan for a graph whose sites took saved ids; else the
        inner policy's choices."""
        graph = self._graph_of_site.get(request.sites[0][0].id) if request.sites else None
        if graph is None:
            return self.inner.choose(request)
        saved = {site.id: site for site in graph.sites}
        choices, facts = {}, {}
        for site, _ in request.sites:
            record = saved[site.id]
            if record.facts is not None:
                facts[site.id] = record.facts
            if record.decision is None:  # not rewritten when saved (its graph's end-to-end check failed)
                continue
            decision = dataclasses.replace(record.decision, loaded_from=self.source)
            module = None if decision.kept else self.site_modules.get(site.id)
            if not decision.kept and module is None:
                raise AttnoptError(f"{self.source} holds no module for site {site.id}, which it says was "
                                   f"rewritten into {decision.variant}: the file is damaged; save it again.")
            choices[site.id] = Choice(decision, module)
        plan = None if graph.plan is None else dataclasses.replace(
            graph.plan, graph=request.graph, output_error=None, shared_with=[], loaded_from=self.source)
        return Choices(choices, plan, facts)

    def unclaimed(self) -> list[dict[str, Any]]:
        """The records of the saved graphs no compiled graph took (a later save writes them again)."""
        return [graph.record for index, graph in enumerate(self.graphs) if index not in self._claimed]


# ---------------------------------------------------------------- save and load


def save(module: AttnoptModule, path: str | os.PathLike | IO[bytes]) -> None:
    """Write `module`'s plans per graph and input signature, its decisions, the measured errors
    and every site module's parameters (calibrated or not) to `path` (see the module doc).

    `module` is what `rewrite`, `optimize` or `load` returned; what it has not run yet is not in
    the file (run it on the shapes you will serve first). `attnopt.load(model, path)` gives it back."""
    if not isinstance(module, AttnoptModule):
        raise AttnoptError(f"attnopt.save takes a module returned by attnopt.rewrite, optimize or load, got "
                           f"{type(module).__name__} (torch.compile(..., backend='attnopt') keeps no plans to save).")
    backend = module._attnopt_backend
    graphs = [{"graph": analysed.graph, "signature": analysed.signature, "key": analysed.key,
               "sites": _encode(analysed.sites), "plan": _encode(analysed.plan)} for analysed in backend.analyses]
    if isinstance(backend.policy, LoadedPolicy):
        graphs += backend.policy.unclaimed()
    modules, site_modules, index_of = [], {}, {}
    for site_id, site_module in sorted(backend._chosen.items()):
        if id(site_module) not in index_of:
            index_of[id(site_module)] = len(modules)
            description = _describe(site_module)
            _check_rebuilt(site_module, description)
            modules.append({"module": description, "state": _encode(dict(site_module.state_dict()))})
        site_modules[site_id] = index_of[id(site_module)]
    record = {
        "format": FORMAT, "version": FORMAT_VERSION, "attnopt": _version(), "torch": str(torch.__version__),
        "model": {"class": f"{type(module.model).__module__}.{type(module.model).__qualname__}",
                  "weights": _weights(module.model)},
        "policy": _policy_record(backend.policy), "inner": backend.inner, "timestep_arg": module._timestep_arg,
        "graphs": graphs, "modules": modules, "site_modules": site_modules,
        "loop": _encode(getattr(backend.report, "loop", None)),
    }
    torch.save(record, path)


def load(model: nn.Module, path: str | os.PathLike | IO[bytes], args: tuple = (), kwargs: dict | None = None, *,
         calibration: Any = None, inner: str | None = None) -> AttnoptModule:
    """The module `save` wrote, for `model`: its saved decisions and site parameters, applied
    without planning or calibrating the input signatures the file holds (see the module doc).

    model: the original model (not a rewrite), with the weights and structure it was saved with
        (another structure is an AttnoptError at once; a site that differs from the file's, on the
        first call with its signature).
    args/kwargs: example inputs, run once (as for `optimize`), which fills the report.
    calibration: batches for the signatures the file does not hold, which the saved policy plans
        (without them, such a signature is planned without calibration).
    inner: what runs the graphs, "eager" or "inductor" (default: as saved).
    """
    _check_model(model, "load")
    if isinstance(model, AttnoptModule):
        raise AttnoptError("attnopt.load takes the original model, not a module attnopt returned.")
    check_inputs(args, kwargs)
    where = str(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "the file")
    record = _read(path, where)
    changed = _check_structure(model, record["model"]["weights"], where)
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    built = []
    for index, saved in enumerate(record["modules"]):
        try:
            site_module = _rebuild(saved["module"])
            site_module.load_state_dict(saved["state"], strict=True)
        except (TypeError, ValueError, RuntimeError) as bad:
            raise AttnoptError(f"attnopt.load: site module {index} of {where} cannot be built again "
                               f"({type(bad).__name__}: {bad}); save it again with this attnopt.") from None
        built.append(site_module.to(device))
    policy = LoadedPolicy(_policy_from(record["policy"], model, calibration), record, where,
                          {site_id: built[index] for site_id, index in record["site_modules"].items()})
    approximate = [site for graph in policy.graphs for site in graph.sites if site.decision is not None
                   and not site.decision.kept and site.decision.variant != "exact"]
    if changed and approximate:
        warnings.warn(f"attnopt.load: {len(changed)} weight(s) of {type(model).__name__} differ from those saved in "
                      f"{where} ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): its approximate "
                      "decisions and calibrated parameters were measured on the saved weights.", stacklevel=2)
    backend = AttnoptBackend(policy, inner=inner or record["inner"])
    decided = sum(1 for graph in policy.graphs for site in graph.sites if site.decision is not None)
    backend.report.notes.append(
        f"{decided} decision(s) loaded from {where}, for {len(policy.graphs)} graph(s) and input signature(s): "
        "applied without planning or calibration where a call's signature and sites match the file's (errors "
        "as measured when saved; the end-to-end check runs again); other calls are planned by the saved policy"
        + (" without calibration (the batches are not saved: pass load(..., calibration=batches))."
           if record["policy"].get("calibrated") and calibration is None else "."))
    if record.get("loop") is not None and hasattr(backend.report, "loop"):
        backend.report.loop = _decode(record["loop"])
    wrapped = AttnoptModule(model, backend, record["timestep_arg"])
    if args or kwargs:
        with torch.random.fork_rng(devices=[]):
            wrapped(*args, **(kwargs or {}))
    return wrapped


def _read(path: Any, where: str) -> dict[str, Any]:
    """The file's record, checked to be an attnopt plans file of a version this attnopt reads."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as bad:
        lines = [line.strip() for line in str(bad).splitlines() if line.strip()]
        why = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise AttnoptError(f"attnopt.load: {where} is not a file attnopt.save wrote ({type(bad).__name__}: "
                           f"{why}).") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AttnoptError(f"attnopt.load: {where} is not a file attnopt.save wrote (no {FORMAT!r} format entry; "
                           "a state dict loads with module.load_state_dict).")
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise AttnoptError(f"attnopt.load: {where} has format version {version!r}, which this attnopt "
                           f"({_version()}) cannot read (it reads versions 1 to {FORMAT_VERSION}): it was written by "
                           f"another attnopt ({record.get('attnopt', 'unknown')}); load it with that one, or save "
                           "it again with this one.")
    return record


def _version() -> str:
    try:
        return importlib.metadata.version("attnopt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__all__ = ["FORMAT", "FORMAT_VERSION", "LoadedPolicy", "SavedGraph", "load", "save"]
