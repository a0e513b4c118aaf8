"""Agent attention without training: the agents are summaries of this call's own queries.

Stage 1 lets n agents read all keys and values; stage 2 lets every query read the agents:
out = softmax(q Aᵀ·scale·temperature + bias) · softmax(A kᵀ·scale + mask) v, cost ∝ n·(N + M).
n is a fixed count by default (DEFAULT_AGENT_COUNT), so the cost is linear in N; a fraction of N
(agent_fraction) is an explicit choice, and keeps the cost quadratic.
The agents A come from the queries by one of the `SELECTIONS` — adaptive pooling (1-D, or 2-D on
a known token grid with the class token kept as its own agent), k-means (optionally local: a
query may only join the agents pooled near it) or bipartite merging — over valid queries only;
then the queries farthest from their agent become agents of their own (outliers).
The stage-2 bias makes queries listen to their nearest agents weighted by cluster size (see
two_stage.py), and a calibrated V shortcut (shortcut.py) restores fixed-offset heads.

A calibration (attnopt.calibration) fits, per head, the temperature of each stage (the agents'
gather over the keys, the queries' read of the agents) with the shortcut's weights. Both start
at 1 — exactly the training-free agents — and a stage whose temperatures are all 1 is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from attnopt import costmodel
from attnopt.costmodel import B, H, N, d, dtype_bytes

from .clustering import (
    bipartite_merge,
    grid_groups,
    group_means,
    kmeans,
    pooled_groups,
    pooled_runs_with_outliers,
    run_kmeans_with_outliers,
    split_outliers,
)
from .masks import valid_queries
from .reasons import causal_reason, dropout_reason, first_reason, per_query_mask_reason
from .registry import Example, VariantSpec, register_variant
from .site import SiteInfo, TokenGrid, infer_grid
from .two_stage import (
    TwoStageSiteAttention,
    agent_bias,
    require_int,
    require_offsets,
    require_real,
    shortcut_offsets_at,
    two_stage_attention,
    two_stage_cost,
)

NAME = "agent"


@dataclasses.dataclass(frozen=True)
class AgentLayout:
    """How the agents of one call are laid out.

    The (patch) tokens are pooled onto an agent grid — one row of `cols` agents for a 1-D
    sequence, rows × cols over a token grid — then `n_outliers` more agents are single queries
    (those farthest from their agent), and a grid's class token is an agent of its own.
    """

    n_tokens: int
    grid: TokenGrid | None
    rows: int
    cols: int
    n_outliers: int

    @classmethod
    def for_tokens(cls, n_tokens: int, n_wanted: int, n_outliers: int, grid: TokenGrid | None) -> AgentLayout:
        """The layout closest to `n_wanted` agents in all, `n_outliers` of them outliers."""
        n_class = int(grid is not None and grid.has_class_token)
        n_patches = n_tokens - n_class
        n_outliers = max(0, min(n_outliers, n_wanted - n_class - 1, n_patches - 1))
        pooled = max(1, min(n_wanted - n_class - n_outliers, n_patches))
        if grid is None:
            return cls(n_tokens, None, 1, pooled, n_outliers)
        rows = min(grid.height, max(1, round(math.sqrt(pooled * grid.height / grid.width))))
        cols = min(grid.width, max(1, round(pooled / rows)))
        return cls(n_tokens, grid, rows, cols, min(n_outliers, n_patches - rows * cols))

    @property
    def n_class_tokens(self) -> int:
        return int(self.grid is not None and self.grid.has_class_token)

    @property
    def n_pooled(self) -> int:
        return self.rows * self.cols

    @property
    def n_agents(self) -> int:
        return self.n_pooled + self.n_outliers + self.n_class_tokens

    def initial_groups(self, valid: torch.Tensor) -> torch.Tensor:
        """Pooling groups of the patch tokens (valid (…, P)); invalid tokens get −1."""
        if self.grid is None:
            return pooled_groups(valid, self.n_pooled)
        return grid_groups(valid, self.grid.height, self.grid.width, self.rows, self.cols)

    def neighbours(self, window: int, device: torch.device) -> torch.Tensor:
        """(n_pooled, W): for each agent, the W agents nearest to it on the agent grid, itself first."""
        index = torch.arange(self.n_pooled, device=device)
        position = torch.stack([index // self.cols, index % self.cols], dim=-1).float()
        distance = torch.cdist(position, position)
        return distance.argsort(dim=-1, stable=True)[:, : min(window, self.n_pooled)]


def _pooled_agents(queries, valid, layout, config):
    groups = layout.initial_groups(valid)
    means, sizes = group_means(queries, groups, layout.n_pooled)
    return means, sizes, groups


def _kmeans_agents(queries, valid, layout, config):
    groups = layout.initial_groups(valid)
    candidates = None
    if config.kmeans_window is not None:
        candidates = layout.neighbours(config.kmeans_window, queries.device)[groups.clamp_min(0)]
    return kmeans(queries, valid, groups, layout.n_pooled, config.kmeans_iterations, candidates)


def _merged_agents(queries, valid, layout, config):
    return bipartite_merge(queries, valid, layout.n_pooled)


def run_kmeans_cost(n_pooled: int, run_length: int, iterations: int, window: int | None) -> costmodel.CostFormula:
    """clustering.run_kmeans_with_outliers' Lloyd iterations over n runs of L queries (padded to n·L).

    Per iteration, per (batch, head): the scores of each run's queries against its W candidate
    centroids (W = window, or n when global) are one batched matmul of n·L·W·d multiply-adds
    (the bias added in it); four element-wise passes over them pick each query's centroid
    (clustering.first_max); an index_add_ of the queries (n·L·d adds) and one of ones give the
    new sums and sizes; the rest works on the (n, W) candidates and (n, d) centroids. Before them,
    the runs' first sums are a batched product of each run with its 0/1 weights (2·n·L·d FLOPs,
    its pass over the queries priced by the pooling the selection adds).
    """
    candidates = n_pooled if window is None or window >= 2 * n_pooled - 1 else window
    per_row = n_pooled * run_length * candidates
    slots = n_pooled * run_length
    per_iteration = costmodel.CostFormula(
        flops=2 * B * H * per_row * d,
        elementwise_ops=B * H * (5 * per_row + slots * (d + 1) + 4 * n_pooled * candidates + 4 * n_pooled * d),
        bytes_moved=dtype_bytes * B * H * (2 * slots * d + 7 * per_row + 6 * slots + 4 * n_pooled * (d + candidates)),
        kernel_calls=24,
    )
    first_sums = costmodel.CostFormula(flops=2 * B * H * slots * d, elementwise_ops=0, bytes_moved=0, kernel_calls=1)
    return first_sums + costmodel.CostFormula(*(iterations * term for term in dataclasses.astuple(per_iteration)))


@dataclasses.dataclass(frozen=True)
class Selection:
    """One way to pick the agents, and what it costs.

    pick(queries (B, H, P, d) fp32, valid (B, H, P), layout, config) → agents (B, H, n_pooled, d),
    their sizes (B, H, n_pooled) and each query's agent (B, H, P).
    cost(n_agents, kmeans_iterations, kmeans_window, runs) → its CostFormula; runs is
    (n_pooled, L) where the selection runs on runs of L consecutive queries (`run_selection`),
    else None.
    """

    pick: Callable
    cost: Callable[[costmodel.Expr, int, int | None], costmodel.CostFormula]


SELECTIONS: dict[str, Selection] = {
    "pool": Selection(_pooled_agents, lambda n_agents, iterations, window, runs: costmodel.pooling(n_agents)),
    "kmeans": Selection(_kmeans_agents, lambda n_agents, iterations, window, runs: costmodel.pooling(n_agents) + (
        costmodel.kmeans(n_agents, iterations, window) if runs is None else run_kmeans_cost(*runs, iterations, window))),
    "bipartite": Selection(_merged_agents, lambda n_agents, iterations, window, runs: costmodel.bipartite(n_agents)),
}
"""Agent selection name → how it picks the agents and what that costs."""


DEFAULT_AGENT_COUNT = 64
"""Agents per call when the config gives neither agent_count nor agent_fraction."""


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Training-free agent attention; defaults measured on all-MiniLM-L6-v2 (bench/RESULTS.md).

    agent_count: the number of agents n (None: DEFAULT_AGENT_COUNT, unless agent_fraction is
        given). The two stages cost 2n(N+M)(d+e) FLOPs against 2NM(d+e): a fixed n keeps the
        cost linear in N.
    agent_fraction: agents per query token instead (n = ⌈fraction·N⌉ of the padded N); an
        explicit choice (cost quadratic in N), not to be combined with agent_count.
    selection: "pool", "kmeans" (initialised by pooling) or "bipartite" (ToMe-style merging).
    kmeans_iterations: a fixed number of Lloyd iterations.
    kmeans_window: a query may only join the `window` agents pooled nearest to it (local
        k-means, cost N·window·d per iteration; on a 1-D sequence without padding the window
        is the band of runs around its own, see clustering.run_kmeans_with_outliers), or any
        agent when None.
    outlier_fraction, max_outliers: min(⌈fraction·N⌉, max_outliers) of the agents are the single
        queries farthest from their agent (they would be served worst), taken out of their
        clusters; part of the n above.
    temperature: stage-2 sharpness, agent_scale = scale × temperature.
    distance_weighting / size_weighting: the stage-2 bias of two_stage.py.
    shortcut_offsets: token offsets of the V shortcut, calibrated on the example ((): none).
    infer_grid: pool 2-D when N is h·h or 1 + h·h and the site gives no grid.
    """

    agent_count: int | None = None
    agent_fraction: float | None = None
    selection: str = "kmeans"
    kmeans_iterations: int = 3
    kmeans_window: int | None = 17
    outlier_fraction: float = 0.05
    max_outliers: int = 16
    temperature: float = 4.0
    distance_weighting: bool = True
    size_weighting: bool = True
    shortcut_offsets: tuple[int, ...] = (-1, 0, 1)
    infer_grid: bool = False

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown agent selection {self.selection!r}; expected one of {sorted(SELECTIONS)}")
        if self.agent_fraction is not None:
            require_real("agent_fraction", self.agent_fraction, 0, 1)
        if self.agent_count is not None:
            require_int("agent_count", self.agent_count, 1)
            if self.agent_fraction is not None:
                raise ValueError("give agent_count or agent_fraction, not both")
        require_int("max_outliers", self.max_outliers, 0)
        require_int("kmeans_iterations", self.kmeans_iterations, 0)
        if self.kmeans_window is not None:
            require_int("kmeans_window", self.kmeans_window, 1)
        require_real("outlier_fraction", self.outlier_fraction, 0, 1, low_closed=True, high_closed=False)
        require_real("temperature", self.temperature, 0)
        require_offsets("shortcut_offsets", self.shortcut_offsets)

    def grid_for(self, n_tokens: int, site_info: SiteInfo) -> TokenGrid | None:
        """The token grid to pool on for a call with n_tokens queries (None: pool 1-D)."""
        if site_info.grid is not None and site_info.grid.n_tokens == n_tokens:
            return site_info.grid
        return infer_grid(n_tokens) if self.infer_grid else None

    def layout(self, n_tokens: int, site_info: SiteInfo) -> AgentLayout:
        """The agent layout for a call with n_tokens queries at this site."""
        if self.agent_count is not None:
            wanted = self.agent_count
        elif self.agent_fraction is not None:
            wanted = math.ceil(self.agent_fraction * n_tokens)
        else:
            wanted = DEFAULT_AGENT_COUNT
        outliers = min(math.ceil(self.outlier_fraction * n_tokens), self.max_outliers)
        return AgentLayout.for_tokens(n_tokens, wanted, outliers, self.grid_for(n_tokens, site_info))

    def n_agents(self, site_info: SiteInfo) -> int:
        """The number of agents this config uses at the site's N."""
        return self.layout(site_info.N, site_info).n_agents

    def selects_on_runs(self, layout: AgentLayout) -> bool:
        """Whether k-means runs on runs of consecutive queries (clustering.run_kmeans_with_outliers)
        when every query is valid: a 1-D layout."""
        return self.selection == "kmeans" and layout.grid is None


class AgentAttention(TwoStageSiteAttention):
    """One site's agent attention; forward takes the canonical (q, k, v, mask) layout.

    stage1_log_temperature, stage2_log_temperature (H,): per head, stage 1 reads the keys at
    scale·exp(τ₁) (the agents are scaled by exp(τ₁)) and stage 2 reads the agents at
    scale·temperature·exp(τ₂), its distance weighting included (the queries are scaled by
    exp(τ₂ − τ₁)). 0 until a calibration fits them.
    """

    variant = NAME

    def __init__(self, config: AgentConfig, site_info: SiteInfo):
        super().__init__(site_info, config.shortcut_offsets)
        self.config = config
        self.stage1_log_temperature = nn.Parameter(torch.zeros(site_info.H))
        self.stage2_log_temperature = nn.Parameter(torch.zeros(site_info.H))
        self._remembered: dict[int, tuple] | None = None

    def calibration_parameters(self) -> list[nn.Parameter]:
        """What a calibration (attnopt.calibration) fits: both stages' temperatures and the V
        shortcut's weights (from its closed-form fit)."""
        return list(self.parameters())

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """While a calibration runs this module over and over on the same captures: the agents of
        a query tensor are selected once and reused (selection is most of a step's time, and no
        parameter acts before it). A query is the one seen before when it is that tensor unchanged,
        or equal to it (a head split's `index_select` gives a new tensor on every call), with an
        equal key mask."""
        self._remembered = {}
        try:
            yield
        finally:
            self._remembered = None

    def _selected(self, q: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`agents(q, key_mask)`, remembered while `calibrating`."""
        if self._remembered is None:
            return self.agents(q, key_mask)
        seen = self._remembered.setdefault((q.shape, q.dtype, q.device), [])
        for query, version, mask, selected in seen:
            unchanged = query._version == version and (query is q or torch.equal(query, q))
            if unchanged and (mask is key_mask or (mask is not None and key_mask is not None
                                                   and mask.shape == key_mask.shape and torch.equal(mask, key_mask))):
                return selected
        selected = self.agents(q, key_mask)
        seen.append((q, q._version, key_mask, selected))
        return selected

    def _temperatures(self, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """exp(τ₁) and exp(τ₂) as (H, 1), or None for a stage whose temperatures are all 1 in eager
        CPU inference (uncalibrated: skipped, so the call is exactly the training-free one). Read
        as the shortcut reads its weights (shortcut.ValueShortcut._passes_needed): under
        torch.compile, on other devices or when gradients flow, both are applied."""
        stages = (self.stage1_log_temperature, self.stage2_log_temperature)
        applied = [True, True]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in stages)
        if not needs_grad and like.device.type == "cpu" and not torch.compiler.is_compiling():
            applied = [any(value != 0 for value in t.detach().tolist()) for t in stages]
        return tuple(t.exp().unsqueeze(-1) if use else None for t, use in zip(stages, applied))

    def agents(self, q: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Agents (B, H, n, d) in fp32 and their sizes (B, H, n) for queries q (B, H, N, d)."""
        batch, n_heads, n_tokens, _ = q.shape
        layout = self.config.layout(n_tokens, self.site_info)
        if layout.grid is None and self._all_queries_valid(key_mask, n_tokens):
            # a 1-D sequence without padding: the pooling groups are runs of consecutive queries
            if self.config.selection == "pool":
                return pooled_runs_with_outliers(q.float(), layout.n_pooled, layout.n_outliers)
            if self.config.selects_on_runs(layout):
                return run_kmeans_with_outliers(q.float(), layout.n_pooled, self.config.kmeans_iterations,
                                                self.config.kmeans_window, layout.n_outliers)
        valid = valid_queries(key_mask, batch, n_heads, n_tokens, self.site_info.is_self_attention, q.device)
        queries, skip = q.float(), layout.n_class_tokens
        patches, patch_valid = queries[..., skip:, :], valid[..., skip:]
        centroids, _, groups = SELECTIONS[self.config.selection].pick(patches, patch_valid, layout, self.config)
        agents, sizes = split_outliers(patches, patch_valid, groups, centroids, layout.n_outliers)
        if skip:
            agents = torch.cat([queries[..., :skip, :], agents], dim=-2)
            sizes = torch.cat([valid[..., :skip].float(), sizes], dim=-1)
        return agents, sizes

    def _all_queries_valid(self, key_mask: torch.Tensor | None, n_tokens: int) -> bool:
        """True where masks.valid_queries counts every query, decided from shapes alone (no data read)."""
        return key_mask is None or not self.site_info.is_self_attention or key_mask.shape[-1] != n_tokens

    def reduced(self, q, k, v, key_mask, scale: float) -> torch.Tensor:
        token_scale = scale * self.config.temperature
        agents, sizes = self._selected(q, key_mask)
        gather, read = self._temperatures(q)
        agents, bias = agent_bias(agents, sizes, token_scale if read is None else token_scale * read,
                                  distance_weighting=self.config.distance_weighting,
                                  size_weighting=self.config.size_weighting)
        if gather is not None:
            agents = agents * gather.unsqueeze(-1)
        query_factor = read if gather is None else gather.reciprocal() if read is None else read / gather
        if query_factor is not None:
            q = q * query_factor.unsqueeze(-1).to(q.dtype)
        return two_stage_attention(q, k, v, agents.to(q.dtype), bias, key_mask, scale=scale, token_scale=token_scale)


def _refusal(config: AgentConfig, site_info: SiteInfo) -> str | None:
    return first_reason(causal_reason(site_info, NAME, "agents"), per_query_mask_reason(site_info, NAME),
                        dropout_reason(site_info, NAME))


def _build(config: AgentConfig, site_info: SiteInfo, example: Example | None) -> nn.Module:
    module = AgentAttention(config, site_info)
    if example is not None:
        module.to(example[0].device).calibrate(example, site_info.softmax_scale)
    return module


def agent_cost(n_agents: costmodel.Expr = costmodel.n, selection: str = "pool", kmeans_iterations: int = 3,
               kmeans_window: int | None = None, n_outliers: int = 0,
               shortcut_offsets: tuple[int, ...] = (), runs: tuple[int, int] | None = None,
               n_pooled: costmodel.Expr | None = None) -> costmodel.CostFormula:
    """Agent attention: select n agents from Q of this call, split off the outliers, two stages, V shortcut.

    runs: (n_pooled, L) where k-means runs on runs of L consecutive queries (1-D, no padding), else None.
    n_pooled: the agents the selection makes (k-means centroids), n_agents − n_outliers unless given
    (a grid's class token is an agent of its own, not a centroid).
    """
    select = costmodel.lookup(SELECTIONS, selection, "agent selection").cost
    made = n_agents - n_outliers if n_pooled is None else n_pooled
    return (select(made, kmeans_iterations, kmeans_window, runs) + costmodel.outlier_split(n_outliers)
            + stage_temperatures_cost(n_agents) + two_stage_cost(n_agents, shortcut_offsets))


def stage_temperatures_cost(n_agents: costmodel.Expr) -> costmodel.CostFormula:
    """The calibrated stage temperatures: the agents scaled by exp(τ₁) and the queries by
    exp(τ₂ − τ₁), one pass over each (read and written). Priced always, as the V shortcut is:
    skipped while they are 1, the module's runs before calibration cost this much less."""
    return costmodel.CostFormula(
        flops=0,
        elementwise_ops=B * H * (N + n_agents) * d,
        bytes_moved=2 * dtype_bytes * B * H * (N + n_agents) * d,
        kernel_calls=2,
    )


def _cost_params(config: AgentConfig, site_info: SiteInfo) -> dict:
    layout = config.layout(site_info.N, site_info)
    # k-means on runs where the module takes that path: 1-D, and no per-key padding of the queries
    # (a key-padding mask of a self-attention site sends it to the general path)
    padded = site_info.mask_kind is not None and site_info.is_self_attention
    runs = None
    if config.selects_on_runs(layout) and not padded:
        runs = (layout.n_pooled, -(-(site_info.N - layout.n_class_tokens) // layout.n_pooled))
    return {"n_agents": layout.n_agents, "selection": config.selection, "kmeans_iterations": config.kmeans_iterations,
            "kmeans_window": config.kmeans_window, "n_outliers": layout.n_outliers,
            "shortcut_offsets": shortcut_offsets_at(config.shortcut_offsets, site_info), "runs": runs,
            "n_pooled": layout.n_pooled}


CANDIDATE_COUNTS = (16, 32, 64, 128, 256)
"""Agent counts `optimize` tries by default (those up to N/2); measured error decides which is
faithful enough. Absolute counts: each candidate's cost stays linear in N."""


def _candidates(site_info: SiteInfo) -> list[AgentConfig]:
    """Each count up to N/2, pooled 1-D, and also on the token grid where N spells one (none below
    N = 32: agents would save nothing there)."""
    on_grid = infer_grid(site_info.N) is not None
    counts = [count for count in CANDIDATE_COUNTS if count <= site_info.N // 2]
    configs = []
    for count in counts:
        configs.append(AgentConfig(agent_count=count))
        if on_grid:
            configs.append(AgentConfig(agent_count=count, infer_grid=True))
    return configs


register_variant(VariantSpec(
    name=NAME, config_type=AgentConfig, refusal=_refusal, build=_build, cost=agent_cost, cost_params=_cost_params,
    candidates=_candidates, shown=(), heads_independent=True))
