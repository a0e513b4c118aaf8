"""One table from config type to the handler that checks and builds that variant (torchao style).

Each variant module registers its config dataclass here with two functions: `refusal` (why the
variant cannot stand in for softmax attention at a site, or None) and `build` (the per-site
nn.Module). Callers never branch on variant names; they look the config's type up here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from attnopt.kernels import exact_attention

from attnopt.numerics import output_error

from .site import SiteInfo

Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""(q, k, v, mask) captured at a site from the user's example inputs, in the canonical layout."""


@dataclasses.dataclass(frozen=True)
class VariantHandler:
    """How one variant is checked against a site and built for it."""

    name: str
    config_type: type
    refusal: Callable[[Any, SiteInfo], "str | None"]
    build: Callable[[Any, SiteInfo, "Example | None"], nn.Module]


_HANDLERS: dict[type, VariantHandler] = {}


def register_variant(name: str, config_type: type, *, refusal: Callable, build: Callable) -> None:
    """Add a variant: its name (as reports and the cost model spell it), config class and functions."""
    if config_type in _HANDLERS or any(h.name == name for h in _HANDLERS.values()):
        raise ValueError(f"variant {name!r} ({config_type.__name__}) is already registered")
    _HANDLERS[config_type] = VariantHandler(name, config_type, refusal, build)


def handler_for(config: Any) -> VariantHandler:
    """The handler registered for `config`'s type."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(h.config_type.__name__ for h in _HANDLERS.values()))
        raise TypeError(f"{type(config).__name__} is not a registered variant config; known: {known}")
    return handler


def config_for(name: str, **params: Any) -> Any:
    """The config of the variant called `name` ("exact", "agent", "linear", "mediator") with `params`."""
    for handler in _HANDLERS.values():
        if handler.name == name:
            return handler.config_type(**params)
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(sorted(h.name for h in _HANDLERS.values()))}")


def refusal(config: Any, site_info: SiteInfo) -> str | None:
    """One sentence on why `config` cannot stand in for the site's softmax attention, or None."""
    return handler_for(config).refusal(config, site_info)


def build_site_module(config: Any, site_info: SiteInfo, example: Example | None = None) -> nn.Module:
    """The module computing the site's attention as `config` says; raises ValueError if refused.

    Its forward is `(q, k, v, *, mask=None, scale, causal=False, dropout_p=0.0) -> (B, H, N, e)`.
    `example` feeds the variants that calibrate on real inputs (mediator tokens, agent shortcut).
    """
    reason = refusal(config, site_info)
    if reason is not None:
        raise ValueError(reason)
    return handler_for(config).build(config, site_info, example)


@torch.no_grad()
def relative_error(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, scale: float, causal: bool = False) -> float:
    """‖module(q, k, v) − exact‖ / ‖exact‖ over the query rows whose exact output is finite (output_error)."""
    out = module(q, k, v, mask=mask, scale=scale, causal=causal)
    return output_error(out, exact_attention(q, k, v, mask, scale=scale, causal=causal))
