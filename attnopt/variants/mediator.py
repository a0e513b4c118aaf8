"""Mediator attention: agent attention whose tokens are learned parameters of the site.

Each site holds n_mediators tokens per head (nn.Parameter (H, n_max, d)) and their log sizes.
Without training they are initialised from the example queries: per head, k-means over every
valid example query (pooled init, so deterministic), then *ordered* so that every prefix is a
good smaller set — the largest cluster first, then greedily the cluster maximising
size × squared distance to those already taken (a deterministic k-means++ order).

The count used by a call is a prefix of that order: mediator_count(n) when set, else the
config's MediatorSchedule at mediator_timestep(t) when both are set, else all n_max. A prefix
keeps shapes static per count, stays differentiable, and lets training shape a nested set;
the sizes of the tokens left out are added to their nearest kept token (n_max·n·d per call,
independent of N), so size weighting stays faithful at every count.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn

from attnopt import costmodel
from attnopt.costmodel import H, d, dtype_bytes  # the cost formula's shape symbols

from .clustering import kmeans, pooled_groups
from .masks import per_key_mask, valid_queries
from .reasons import causal_reason, dropout_reason, first_reason, per_query_mask_reason
from .registry import Example, VariantSpec, register_variant
from .site import SiteInfo
from .two_stage import (
    TwoStageSiteAttention,
    require_int,
    require_offsets,
    require_real,
    shortcut_offsets_at,
    two_stage_attention,
    two_stage_cost,
)

NAME = "mediator"

_TIMESTEP: contextvars.ContextVar[float | None] = contextvars.ContextVar("attnopt_mediator_timestep", default=None)
_COUNT: contextvars.ContextVar[int | None] = contextvars.ContextVar("attnopt_mediator_count", default=None)


def _as_timestep(timestep: float | int | torch.Tensor) -> float:
    """A diffusion timestep as one float; a tensor must hold a single value (repeated per sample is fine)."""
    if not isinstance(timestep, torch.Tensor):
        return float(timestep)
    values = timestep.detach().reshape(-1)
    if values.numel() == 0 or not bool((values == values[0]).all()):
        raise ValueError(f"mediator_timestep needs one timestep per call, got {timestep.tolist()}")
    return float(values[0])


@contextlib.contextmanager
def mediator_timestep(timestep: float | int | torch.Tensor) -> Iterator[None]:
    """Within this block, mediator sites pick their count from their schedule at `timestep`."""
    token = _TIMESTEP.set(_as_timestep(timestep))
    try:
        yield
    finally:
        _TIMESTEP.reset(token)


@contextlib.contextmanager
def mediator_count(count: int) -> Iterator[None]:
    """Within this block, every mediator site uses `count` mediators (capped at its n_mediators)."""
    require_int("mediator_count", count, 1)
    token = _COUNT.set(int(count))
    try:
        yield
    finally:
        _COUNT.reset(token)


@dataclasses.dataclass(frozen=True)
class MediatorSchedule:
    """Diffusion timestep → mediator count, piecewise constant.

    steps: (from_timestep, count) pairs in increasing from_timestep; timestep t uses the count of
    the last pair with from_timestep ≤ t (the first pair's below it). Noisy, large t carry
    little detail, so e.g. ((0, 64), (500, 32), (800, 16)) uses fewer mediators early on.
    """

    steps: tuple[tuple[float, int], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple) or any(not (isinstance(s, tuple) and len(s) == 2) for s in self.steps):
            raise ValueError(f"schedule steps must be a tuple of (from_timestep, count) pairs; got {self.steps!r}")
        for start, count in self.steps:
            require_real("a schedule step's from_timestep", start, -math.inf)
            require_int("a schedule step's mediator count", count, 1)
        starts = [start for start, _ in self.steps]
        if not self.steps or starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError(f"schedule steps need distinct, increasing timesteps; got {self.steps}")

    def count_at(self, timestep: float) -> int:
        count = self.steps[0][1]
        for start, step_count in self.steps:
            if timestep >= start:
                count = step_count
        return count


@dataclasses.dataclass(frozen=True)
class MediatorConfig:
    """Learned mediator tokens, initialised from the example queries (see module doc).

    n_mediators: tokens kept per head (the most a call can use); schedule: timestep → count.
    temperature, distance_weighting, size_weighting, shortcut_offsets: as in AgentConfig.
    kmeans_iterations: Lloyd iterations of the initialisation.
    """

    n_mediators: int = 64
    schedule: MediatorSchedule | None = None
    temperature: float = 4.0
    kmeans_iterations: int = 10
    distance_weighting: bool = True
    size_weighting: bool = True
    shortcut_offsets: tuple[int, ...] = (-1, 0, 1)

    def __post_init__(self) -> None:
        require_int("n_mediators", self.n_mediators, 1)
        if self.schedule is not None and not isinstance(self.schedule, MediatorSchedule):
            raise ValueError(f"schedule must be a MediatorSchedule or None, got {type(self.schedule).__name__}")
        require_real("temperature", self.temperature, 0)
        require_int("kmeans_iterations", self.kmeans_iterations, 0)
        require_offsets("shortcut_offsets", self.shortcut_offsets)

    def count(self) -> int:
        """The mediator count for the current call, from mediator_count / mediator_timestep."""
        explicit, timestep = _COUNT.get(), _TIMESTEP.get()
        if explicit is not None:
            return min(explicit, self.n_mediators)
        if self.schedule is not None and timestep is not None:
            return min(self.schedule.count_at(timestep), self.n_mediators)
        return self.n_mediators


def coverage_order(centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(H, n): an order of the centroids whose prefixes cover the data well (deterministic k-means++).

    First the largest cluster, then repeatedly the one maximising size × squared distance to the
    nearest centroid already taken.
    """
    n_heads, n_tokens, _ = centroids.shape
    order = sizes.argmax(-1, keepdim=True)
    nearest = (centroids - centroids.gather(1, order.unsqueeze(-1).expand(-1, -1, centroids.shape[-1]))).pow(2).sum(-1)
    for _ in range(n_tokens - 1):
        score = (sizes * nearest).scatter(1, order, -1.0)
        chosen = score.argmax(-1, keepdim=True)
        order = torch.cat([order, chosen], dim=1)
        picked = centroids.gather(1, chosen.unsqueeze(-1).expand(-1, -1, centroids.shape[-1]))
        nearest = torch.minimum(nearest, (centroids - picked).pow(2).sum(-1))
    return order


class MediatorAttention(TwoStageSiteAttention):
    """One site's mediator attention; forward takes the canonical (q, k, v, mask) layout."""

    variant = NAME

    def __init__(self, config: MediatorConfig, site_info: SiteInfo):
        super().__init__(site_info, config.shortcut_offsets)
        self.config = config
        generator = torch.Generator().manual_seed(0)
        self.mediators = nn.Parameter(torch.randn(site_info.H, config.n_mediators, site_info.d, generator=generator))
        self.log_sizes = nn.Parameter(torch.zeros(site_info.H, config.n_mediators))

    @torch.no_grad()
    def initialise(self, q: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Mediators = k-means centroids of the example queries per head, in coverage order."""
        batch, n_heads, n_tokens, head_dim = q.shape
        valid = valid_queries(per_key_mask(mask), batch, n_heads, n_tokens, self.site_info.is_self_attention, q.device)
        points = q.float().transpose(0, 1).reshape(n_heads, batch * n_tokens, head_dim)
        valid = valid.transpose(0, 1).reshape(n_heads, batch * n_tokens)
        n_max = self.config.n_mediators
        if int(valid[0].sum()) < n_max:
            raise ValueError(f"the example holds {int(valid[0].sum())} valid queries per head, fewer than "
                             f"n_mediators={n_max}; give a larger example or fewer mediators")
        centroids, sizes, _ = kmeans(points, valid, pooled_groups(valid, n_max), n_max, self.config.kmeans_iterations)
        order = coverage_order(centroids, sizes)
        self.mediators.copy_(centroids.gather(1, order.unsqueeze(-1).expand(-1, -1, head_dim)))
        self.log_sizes.copy_(sizes.gather(1, order).clamp_min(1e-30).log())

    def calibration_parameters(self) -> list[nn.Parameter]:
        """What a calibration (attnopt.calibration) fits: the mediator tokens, their log sizes and
        the V shortcut's weights, from their initialisation (k-means, closed-form shortcut)."""
        return list(self.parameters())

    def tokens_for(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` mediators (H, n, d) and log sizes (H, n) with the rest's sizes folded in."""
        kept = self.mediators[:, :count]
        distance = torch.cdist(self.mediators, kept)  # (H, n_max, count)
        nearest = distance.argmin(-1)
        sizes = torch.zeros_like(self.log_sizes[:, :count]).scatter_add(1, nearest, self.log_sizes.exp())
        return kept, sizes.clamp_min(1e-30).log()

    def reduced(self, q, k, v, key_mask, scale: float) -> torch.Tensor:
        token_scale = scale * self.config.temperature
        mediators, log_sizes = self.tokens_for(self.config.count())
        bias = torch.zeros_like(log_sizes)
        if self.config.distance_weighting:
            bias = bias - 0.5 * token_scale * mediators.pow(2).sum(-1)
        if self.config.size_weighting:
            bias = bias + log_sizes
        return two_stage_attention(q, k, v, mediators.unsqueeze(0).to(q.dtype), bias.unsqueeze(0), key_mask,
                                   scale=scale, token_scale=token_scale)


def _refusal(config: MediatorConfig, site_info: SiteInfo) -> str | None:
    return first_reason(causal_reason(site_info, NAME, "mediators"),
                        per_query_mask_reason(site_info, NAME), dropout_reason(site_info, NAME))


def _build(config: MediatorConfig, site_info: SiteInfo, example: Example | None) -> nn.Module:
    """Without an example the mediators stay seeded random (a shell to load trained weights into)."""
    module = MediatorAttention(config, site_info)
    if example is not None:
        module.to(example[0].device).initialise(example[0], example[3])
        module.calibrate(example, site_info.softmax_scale)
    return module


def _token_fold(n_mediators: costmodel.Expr, n_stored: int) -> costmodel.CostFormula:
    """`tokens_for`: each stored token's distance to the kept ones (cdist over H·n_stored·n pairs of d
    values, element work: FlopCounterMode counts no FLOPs in it), the nearest, and the sizes summed
    onto it; once per call, independent of B and N."""
    pairs = H * n_stored * n_mediators
    return costmodel.CostFormula(flops=0, elementwise_ops=pairs * (3 * d + 1) + 2 * H * n_stored,
                                 bytes_moved=dtype_bytes * (H * (n_stored + n_mediators) * d + 2 * pairs),
                                 kernel_calls=5)


def mediator_cost(n_mediators: costmodel.Expr = costmodel.n, n_stored: int | None = None,
                  shortcut_offsets: tuple[int, ...] = ()) -> costmodel.CostFormula:
    """Mediator attention through the n_mediators tokens a call uses (no selection: they are learned),
    folded from the n_stored the site keeps (None: not priced), two stages, and the V shortcut."""
    cost = two_stage_cost(n_mediators, shortcut_offsets)
    return cost if n_stored is None else cost + _token_fold(n_mediators, n_stored)


def _cost_params(config: MediatorConfig, site_info: SiteInfo) -> dict:
    """At the count of the current context (mediator_count, mediator_timestep)."""
    return {"n_mediators": config.count(), "n_stored": config.n_mediators,
            "shortcut_offsets": shortcut_offsets_at(config.shortcut_offsets, site_info)}


register_variant(VariantSpec(
    name=NAME, config_type=MediatorConfig, refusal=_refusal, build=_build, cost=mediator_cost,
    cost_params=_cost_params, candidates=lambda site_info: [MediatorConfig(n_mediators=count) for count in (64, 16)],
    shown=("n_mediators",), heads_independent=True))
