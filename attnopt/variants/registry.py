"""One spec per variant, keyed by its config type (torchao style): everything attnopt knows about it.

Each variant file registers one `VariantSpec`: its name, config dataclass, refusal, build, cost
formula (with the parameters it takes at a site), default candidate grid and the params reports
show. Callers never branch on variant names; they look the spec up by the config's type
(`spec_for`) or by name (`spec_named`). Registration order is the order candidates are tried and
listed (attnopt/variants/__init__.py imports exact first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from attnopt.costmodel import CostFormula
from attnopt.kernels import exact_attention
from attnopt.numerics import output_error

from .site import SiteInfo

Example = tuple[torch.Tensor, ...]
"""(q, k, v, mask) captured at a site from the user's example inputs, in the canonical layout,
optionally followed by the site's exact output on them (what a calibration fits to, computed
again when absent)."""


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """Everything about one attention variant, registered together from its own file.

    name: as reports, `rewrite(model, name)` and the cost model spell it.
    config_type: the frozen config dataclass a user picks the variant with.
    refusal(config, site) → one sentence on why it cannot stand in for the site's attention, or None.
    build(config, site, example) → the site module (forward: canonical q, k, v, mask → (B, H, N, e)).
    cost(**params) → its CostFormula; takes only the parameters that change the cost (an unknown
        one is a TypeError), and every one of them is given by cost_params.
    cost_params(config, site) → the cost parameters of `config` at the site.
    candidates(site) → the configs `optimize` tries at the site when the caller gives none.
    shown: config fields reports always show; the others are shown where they differ from the
        config's defaults.
    supports: the score transforms beyond scaling and masking the variant computes
        ("softcap", "sinks"; SiteInfo.score_transforms); a site with any other is refused for
        it by `refusal`, before the variant's own rule.
    heads_independent: the module built for some of a site's heads computes, on those heads,
        what the module built for all of them computes (nothing is fitted or shared across heads
        when it is built). Per-head splits of it (attnopt.candidates) then read their error off
        the full module's output instead of building and running each split; calibration, which
        may fit shared parameters, still builds them. tests/variants/test_specs.py checks it.
    """

    name: str
    config_type: type
    refusal: Callable[[Any, SiteInfo], str | None]
    build: Callable[[Any, SiteInfo, Example | None], nn.Module]
    cost: Callable[..., CostFormula]
    cost_params: Callable[[Any, SiteInfo], dict[str, Any]]
    candidates: Callable[[SiteInfo], Sequence[Any]]
    shown: tuple[str, ...] = ()
    supports: frozenset[str] = frozenset()
    heads_independent: bool = False

    def formula(self, config: Any, site_info: SiteInfo) -> CostFormula:
        """The cost of one call of `config`'s module at the site."""
        return self.cost(**self.cost_params(config, site_info))

    def shown_params(self, config: Any) -> dict[str, Any]:
        """The config's fields that tell it apart from other candidates: `shown`, and those off their default."""
        params, defaults = dataclasses.asdict(config), dataclasses.asdict(self.config_type())
        return {name: value for name, value in params.items() if name in self.shown or value != defaults[name]}


_SPECS: dict[type, VariantSpec] = {}


def register_variant(spec: VariantSpec) -> VariantSpec:
    """Add a variant; its name and config type must be new."""
    if spec.config_type in _SPECS or any(known.name == spec.name for known in _SPECS.values()):
        raise ValueError(f"variant {spec.name!r} ({spec.config_type.__name__}) is already registered")
    _SPECS[spec.config_type] = spec
    return spec


def specs() -> tuple[VariantSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_SPECS.values())


def spec_for(config: Any) -> VariantSpec:
    """The spec registered for `config`'s type."""
    spec = _SPECS.get(type(config))
    if spec is None:
        known = ", ".join(sorted(known.config_type.__name__ for known in _SPECS.values()))
        raise TypeError(f"{type(config).__name__} is not a registered variant config; known: {known}")
    return spec


def spec_named(name: str) -> VariantSpec:
    """The spec of the variant called `name` ("exact", "agent", "linear", "mediator", ...)."""
    for spec in _SPECS.values():
        if spec.name == name:
            return spec
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(sorted(spec.name for spec in _SPECS.values()))}")


def config_for(name: str, **params: Any) -> Any:
    """The config of the variant called `name` with `params`."""
    return spec_named(name).config_type(**params)


def refusal(config: Any, site_info: SiteInfo) -> str | None:
    """One sentence on why `config` cannot stand in for the site's softmax attention, or None.

    One rule for every variant first: a site that caps its logits or adds attention-sink logits
    is refused by the variants that do not declare them in `supports`."""
    spec = spec_for(config)
    missing = site_info.score_transforms - spec.supports
    if missing:
        what = []
        if "softcap" in missing:
            what.append(f"caps its logits (softcap {site_info.softcap:g})")
        if "sinks" in missing:
            what.append("adds attention-sink logits")
        return f"the site {' and '.join(what)}, which {spec.name} does not compute."
    return spec.refusal(config, site_info)


def build_site_module(config: Any, site_info: SiteInfo, example: Example | None = None) -> nn.Module:
    """The module computing the site's attention as `config` says; raises ValueError if refused.

    Its forward is `(q, k, v, *, mask=None, scale, causal=False, dropout_p=0.0) -> (B, H, N, e)`.
    `example` feeds the variants that calibrate on real inputs (mediator tokens, agent shortcut).
    """
    reason = refusal(config, site_info)
    if reason is not None:
        raise ValueError(reason)
    return spec_for(config).build(config, site_info, example)


@torch.no_grad()
def relative_error(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, scale: float, causal: bool = False) -> float:
    """‖module(q, k, v) − exact‖ / ‖exact‖ over the query rows whose exact output is finite (output_error)."""
    out = module(q, k, v, mask=mask, scale=scale, causal=causal)
    return output_error(out, exact_attention(q, k, v, mask, scale=scale, causal=causal))
