"""Calibration: fit each candidate's own parameters to the site's exact attention on real data.

`rewrite(..., calibration=batches)` and `optimize(..., calibration=batches)` take an iterable of
model inputs (tuples or lists of positional inputs, dicts of keyword inputs, a bare tensor as one
positional input — a DataLoader works), or a `Calibration` holding them with the fitting settings.

How activations are collected
-----------------------------
Calibration batches are inputs of the whole model, while planning works per dynamo graph. The
batches are run through the *original* model compiled a second time (its own dynamo region) with
a recording backend: every verified site of every graph is replaced by attnopt's exact op, which
also records the site's canonical (q, k, v, mask, exact output) when that site is the one being
collected. So each site sees what it sees in the original model — never the output of an earlier
rewritten site — and graph breaks are no concern: whichever graph holds the site records it.

A site of the graph being planned is matched with the recorded ones by its identity (`site_key`):
the parameters and buffers its graph receives (by object identity: two instances of one block
class, which dynamo runs through one graph, are told apart), the site's module path, source line
and form, its head counts and dims (H, Hkv, d, e; never batch or sequence lengths, which may differ
between the example and the calibration data), and its occurrence among sites alike in the graph.
If no recorded site has that exact key but exactly one has the same key but for the weights, that
one is taken (a model whose weights reach its graphs another way); otherwise AttnoptError says the
calibration data never reaches the site.

Memory: sites are collected one at a time — all calibration batches are run once per site being
planned, recording only that site (one forward per batch per site). At most one site's
activations over all batches are held, and they are dropped when the site is decided. The batches
themselves are kept (materialised once: an iterable is read once, so a shuffling DataLoader still
gives one fixed split). Fitted parameters and held-out errors are cached per (site, config), so a
new input signature planned later reuses them instead of collecting and fitting again.

Held-out rule
-------------
Batch i (0-based) is held out when (i + 1) % held_out_every == 0 (every 4th batch by default:
3, 7, 11, ...); with fewer than `held_out_every` batches the last one is held out. At least two
batches are needed (AttnoptError otherwise). Parameters are fitted on the other batches only; the
error every candidate gets — fitted or training-free, so the planner compares like with like —
is measured on the held-out batches: ‖out − exact‖ / ‖exact‖ over their valid query rows (rows
whose exact output is finite, and in self-attention not a padded token).

Fitting
-------
A site module takes part when it has a `calibration_parameters()` method returning parameters
(linear with a learned feature map, mediator, hybrid's mix, agent's stage temperatures); one with a
`calibrating()` context manager is fitted and measured inside it, where it may remember work that
its parameters do not change (agents select theirs once per capture). Adam, `steps` steps
at `lr`, one training capture per step (in an order drawn from a generator seeded with `seed`),
loss = per-head MSE normalised by that head's mean squared exact output, over the valid query rows.
Everything random runs under a forked, seeded RNG: the user's RNG stream is untouched and two runs
with the same seed give the same parameters. The original model is never modified (its buffers are
restored after each recording run, so even train-mode batch norm statistics stay as they were).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .analysis import SiteCapture
from .numerics import MASKED_AT_OR_BELOW


@dataclasses.dataclass
class Calibration:
    """Calibration data and how to fit on it.

    batches: an iterable of model inputs (tuple/list: positional, dict: keyword, tensor: the one
        positional input); read once.
    steps, lr: Adam's steps and learning rate per fitted candidate.
    seed: seeds the training order (and any randomness in the recording runs).
    held_out_every: batch i is held out when (i + 1) % held_out_every == 0 (see the module doc).
    progress: show a tqdm bar with the loss while fitting (None: on a terminal only).
    """

    batches: Any = None
    steps: int = 200
    lr: float = 1e-2
    seed: int = 0
    held_out_every: int = 4
    progress: bool | None = None

    def __post_init__(self) -> None:
        from .backend import AttnoptError

        for name, low in (("steps", 0), ("held_out_every", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AttnoptError(f"Calibration.{name} must be an integer ≥ {low}, got {value!r}.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise AttnoptError(f"Calibration.lr must be a positive number, got {self.lr!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise AttnoptError(f"Calibration.seed must be an integer, got {self.seed!r}.")


def held_out_indices(n_batches: int, every: int) -> list[int]:
    """The batches held out of n_batches (see the module doc's rule)."""
    held = [i for i in range(n_batches) if (i + 1) % every == 0]
    return held or [n_batches - 1]


def _as_batch(batch: Any, index: int) -> tuple[tuple, dict]:
    from .backend import AttnoptError

    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict) and all(isinstance(key, str) for key in batch):
        return (), dict(batch)
    raise AttnoptError(f"calibration batch {index} is a {type(batch).__name__}; each batch must be a tuple or list "
                       f"of positional inputs, a dict of keyword inputs, or a tensor (the one positional input).")


def _structure(args: tuple, kwargs: dict) -> tuple:
    return len(args), tuple(sorted(kwargs))


def materialise(batches: Any) -> list[tuple[tuple, dict]]:
    """The calibration batches as (args, kwargs), checked: non-empty, one structure, ≥ 2 batches."""
    from .backend import AttnoptError

    if batches is None or isinstance(batches, (torch.Tensor, str, bytes, dict)) or not isinstance(batches, Iterable):
        raise AttnoptError(f"calibration must be an iterable of batches (e.g. a list of input tuples or a "
                           f"DataLoader) or an attnopt Calibration, got {type(batches).__name__}.")
    result = [_as_batch(batch, i) for i, batch in enumerate(batches)]
    if not result:
        raise AttnoptError("the calibration data is empty: give at least two batches (one is held out).")
    first = _structure(*result[0])
    for i, (args, kwargs) in enumerate(result):
        if _structure(args, kwargs) != first:
            raise AttnoptError(f"calibration batch {i} has another structure than batch 0 "
                               f"({_describe(*_structure(args, kwargs))} against {_describe(*first)}).")
    if len(result) < 2:
        raise AttnoptError("calibration needs at least two batches: the error is measured on held-out batches "
                           "(every 4th; the last one when there are fewer than 4), never on fitted ones.")
    return result


def _describe(n_args: int, keys: tuple) -> str:
    return f"{n_args} positional input(s)" + (f" and keywords {list(keys)}" if keys else "")


# ---------------------------------------------------------------- site identity


def _state_positions(request: Any) -> list[int]:
    from .backend import model_state_positions

    return model_state_positions(request.canonical)


def site_keys(request: Any) -> dict[int, tuple]:
    """Site id → identity (see the module doc) for every site of a GraphRequest."""
    weights = tuple(id(request.args[i]) for i in _state_positions(request)
                    if i < len(request.args) and isinstance(request.args[i], torch.Tensor))
    seen: collections.Counter = collections.Counter()
    keys = {}
    for site, _ in request.sites:
        shape = site.shape
        loose = (site.module, site.source, site.form, shape.get("H"), shape.get("Hkv"), shape.get("d"),
                 shape.get("e"))
        seen[loose] += 1
        keys[site.id] = (weights,) + loose + (seen[loose],)
    return keys


# ---------------------------------------------------------------- recording


class _Recorder(nn.Module):
    """Exact attention at one site of the recording compile; records while its key is collected."""

    exact_masking = True  # computes exactly what the site computes (see attnopt.masking)

    def __init__(self, calibrator: Calibrator, key: tuple):
        super().__init__()
        self.calibrator = calibrator
        self.key = key

    def forward(self, q, k, v, *, mask=None, scale: float, causal: bool = False, dropout_p: float = 0.0, **masking):
        from attnopt.kernels import exact_attention
        from attnopt.passes.masking import Masking

        out = exact_attention(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, **masking)
        self.calibrator._reached.add(self.key)
        if self.calibrator._collecting == self.key:
            reduced = Masking(mask, **masking).for_reduced_variant()
            self.calibrator._recorded.setdefault(self.calibrator._batch, []).append(SiteCapture(
                q.detach(), k.detach(), v.detach(), None if reduced is None else reduced.detach(), float(scale),
                bool(causal), float(dropout_p), out.detach()))
        return out


class _RecordingPolicy:
    """The recording compile's policy: every rewritable site becomes a _Recorder."""

    name = "calibration recording"
    per_instance = True  # one compile per weights instance: its keys hold those weights

    def __init__(self, calibrator: Calibrator):
        self.calibrator = calibrator

    def choose(self, request: Any) -> Any:
        from .policies import Choice, Choices
        from .report import Decision

        keys = site_keys(request)
        return Choices({site.id: Choice(Decision(variant="exact", reason="calibration recording"),
                                        _Recorder(self.calibrator, keys[site.id])) for site, _ in request.sites})


@dataclasses.dataclass
class SiteData:
    """One site's captures over the calibration batches, split into fitted and held-out ones."""

    key: tuple
    train: list[SiteCapture]
    held_out: list[SiteCapture]


class Calibrator:
    """Calibration of one model: its batches, the recording compile, and the fitted results.

    A policy asks `site_data` for a site's captures (recorded on demand, one site at a time) and
    `evaluate` calibrates a candidate's module on them (`calibrate`).
    """

    def __init__(self, model: nn.Module, calibration: Any):
        settings = calibration if isinstance(calibration, Calibration) else Calibration(batches=calibration)
        self.model = model
        self.settings = settings
        self.batches = materialise(settings.batches)
        self.held_out = set(held_out_indices(len(self.batches), settings.held_out_every))
        self._call: Any = None
        self._collecting: tuple | None = None
        self._batch = 0
        self._recorded: dict[int, list[SiteCapture]] = {}
        self._reached: set[tuple] = set()
        self._results: dict[tuple, tuple[dict[str, torch.Tensor] | None, float]] = {}

    def __getstate__(self) -> dict[str, Any]:  # the recording compile is made anew after a copy
        state = dict(self.__dict__)
        state.update(_call=None, _collecting=None, _recorded={}, _reached=set())
        return state

    # -- recording

    def _recording_call(self) -> Any:
        if self._call is None:
            from .backend import AttnoptBackend
            from .capture import CompiledCall

            # eager: the recorders' Python side effects must run on every call, not once when traced
            self._call = CompiledCall(AttnoptBackend(_RecordingPolicy(self), check=False, inner="eager"))
        return self._call

    def _run_all(self, key: tuple | None) -> dict[int, list[SiteCapture]]:
        """Run the original model on every batch, recording the site `key`; restore its buffers."""
        from .backend import AttnoptError

        call = self._recording_call()
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        self._collecting, self._recorded = key, {}
        try:
            for index, (args, kwargs) in enumerate(self.batches):
                self._batch = index
                with torch.no_grad(), torch.random.fork_rng(devices=_devices(args, kwargs)):
                    torch.manual_seed(self.settings.seed + index)
                    try:
                        call(self.model, *args, **kwargs)
                    except AttnoptError:
                        raise
                    except Exception as failed:  # said as calibration data that does not fit
                        raise AttnoptError(f"calibration batch {index} could not be run through the model: "
                                           f"{type(failed).__name__}: {failed}") from failed
            return self._recorded
        finally:
            self._collecting, self._recorded = None, {}
            with torch.no_grad():
                for buffer, saved in buffers:
                    if not torch.equal(buffer, saved):
                        buffer.copy_(saved)

    def site_data(self, key: tuple, where: str = "") -> SiteData:
        """The site's captures on every calibration batch (raises AttnoptError if none reach it)."""
        from .backend import AttnoptError

        recorded = self._run_all(key)
        if not recorded:
            loose = {k for k in self._reached if k[1:] == key[1:]}
            if len(loose) == 1:
                key = loose.pop()
                recorded = self._run_all(key)
        if not recorded:
            raise AttnoptError(f"the calibration data never reaches the attention site{where}: no calibration "
                               f"batch runs it (give batches that exercise this code path).")
        train = [c for i in sorted(recorded) if i not in self.held_out for c in recorded[i]]
        held = [c for i in sorted(recorded) if i in self.held_out for c in recorded[i]]
        if not train or not held:
            which = "held-out" if not held else "training"
            raise AttnoptError(f"no {which} calibration batch reaches the attention site{where} "
                               f"(batches held out: {sorted(self.held_out)}).")
        return SiteData(key, train, held)

    # -- fitting and measuring

    def calibrate(self, module: nn.Module, config: Any, data: SiteData | Any) -> float:
        """Fit the module's calibration parameters (if any) on the training captures; return the
        error on the held-out ones. `data` is SiteData or a callable giving it (called only if
        the result is not cached for this site and config)."""
        cache_key = (data.key, config)
        cached = self._results.get(cache_key)
        if cached is not None:
            state, error = cached
            if state is not None:
                with torch.no_grad():
                    for name, tensor in module.named_parameters():
                        tensor.copy_(state[name])
            return error
        if not isinstance(data, SiteData):
            data = data()
        parameters = _calibration_parameters(module)
        with _calibrating(module):
            if parameters:
                fit(module, parameters, data.train, self.settings, label=type(config).__name__)
            error = held_out_error(module, data.held_out)
        state = ({name: p.detach().clone() for name, p in module.named_parameters()} if parameters else None)
        self._results[cache_key] = (state, error)
        return error


class LazySiteData:
    """A site's key, and its captures recorded on first use (`__call__`), at most once."""

    def __init__(self, calibrator: Calibrator, key: tuple, where: str = ""):
        self.calibrator, self.key, self.where = calibrator, key, where
        self._data: SiteData | None = None

    def __call__(self) -> SiteData:
        if self._data is None:
            self._data = self.calibrator.site_data(self.key, self.where)
        return self._data

    def calibrate(self, module: nn.Module, config: Any) -> float:
        return self.calibrator.calibrate(module, config, self._data if self._data is not None else self)


def _devices(args: tuple, kwargs: dict) -> list:
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


def _own(module: nn.Module, name: str) -> Callable | None:
    """The method `name` of the module or, where it has none, of the attention it wraps
    (CausalMaskAttention, HeadSplitAttention: `.attention`), or None."""
    while module is not None:
        method = getattr(module, name, None)
        if callable(method):
            return method
        module = getattr(module, "attention", None)
    return None


def _calibration_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a calibration fits: the module's (or, wrapped, its attention's) own choice."""
    choose = _own(module, "calibration_parameters")
    return [p for p in choose()] if choose is not None else []


def _calibrating(module: nn.Module) -> contextlib.AbstractContextManager:
    """The module's `calibrating()` context (see the module doc), or one that does nothing."""
    session = _own(module, "calibrating")
    return session() if session is not None else contextlib.nullcontext()


# ---------------------------------------------------------------- loss and error


def valid_rows(capture: SiteCapture) -> torch.Tensor:
    """Bool (B, H, N): the query rows that count — the exact output is finite there and, in
    self-attention (N == M), the query is not a padded token (its own key is not masked)."""
    out = capture.output
    rows = out.isfinite().all(-1)
    mask = capture.mask
    n_queries, n_keys = out.shape[2], capture.k.shape[2]
    if mask is not None and n_queries == n_keys:
        keep = mask if mask.dtype == torch.bool else mask > MASKED_AT_OR_BELOW
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
        own = keep[:, :, 0, :] if keep.shape[2] == 1 else keep.diagonal(dim1=-2, dim2=-1)
        rows = rows & own
    return rows


def normalised_mse(output: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over heads of (MSE over valid rows) / (mean square of the exact output there)."""
    weight = rows.unsqueeze(-1).to(torch.float32)
    reference = torch.where(rows.unsqueeze(-1), reference.float(), 0)
    difference = (output.float() - reference) * weight
    error = difference.pow(2).sum(dim=(0, 2, 3))
    scale = reference.pow(2).sum(dim=(0, 2, 3)).clamp_min(1e-12)
    return (error / scale).mean()


def _run(module: nn.Module, capture: SiteCapture) -> torch.Tensor:
    return module(capture.q, capture.k, capture.v, mask=capture.mask, scale=capture.scale, causal=capture.causal,
                  dropout_p=capture.dropout_p)


@torch.no_grad()
def held_out_error(module: nn.Module, captures: list[SiteCapture]) -> float:
    """‖out − exact‖ / ‖exact‖ over the valid rows of every held-out capture together; inf when
    the module gives non-finite values on a valid row."""
    squared_error, squared_reference = 0.0, 0.0
    for capture in captures:
        rows = valid_rows(capture).unsqueeze(-1)
        output = _run(module, capture).float()
        difference = torch.where(rows, output - capture.output.float(), 0)
        if not bool(difference.isfinite().all()):
            return float("inf")
        squared_error += float(difference.pow(2).sum())
        squared_reference += float(torch.where(rows, capture.output.float(), 0).pow(2).sum())
    return math.sqrt(squared_error) / max(math.sqrt(squared_reference), 1e-30)


def fit(module: nn.Module, parameters: list[nn.Parameter], captures: list[SiteCapture], settings: Calibration,
        label: str = "") -> list[float]:
    """Adam on `parameters` so the module reproduces the captures' exact outputs; returns the losses."""
    if not parameters or settings.steps == 0:
        return []
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    rows = [valid_rows(capture) for capture in captures]
    order: list[int] = []
    losses = []
    progress = tqdm(range(settings.steps), desc=f"attnopt: calibrating {label}".rstrip(), unit="step",
                    disable=None if settings.progress is None else not settings.progress, leave=False)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(settings.seed)
        for _ in progress:
            if not order:
                order = torch.randperm(len(captures), generator=generator).tolist()
            index = order.pop()
            capture = captures[index]
            optimizer.zero_grad(set_to_none=True)
            loss = normalised_mse(_run(module, capture), capture.output, rows[index])
            if not bool(loss.isfinite()):
                break  # the held-out error tells what the parameters reached
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
            progress.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
    progress.close()
    for parameter in parameters:
        parameter.grad = None
    return losses


def calibrator_for(model: nn.Module, calibration: Any) -> Calibrator | None:
    """The Calibrator for `calibration=` of rewrite/optimize (None: no calibration)."""
    if calibration is None:
        return None
    return calibration if isinstance(calibration, Calibrator) else Calibrator(model, calibration)


__all__ = ["Calibration", "Calibrator", "SiteData", "calibrator_for", "fit", "held_out_error", "held_out_indices",
           "materialise", "normalised_mse", "site_keys", "valid_rows"]
