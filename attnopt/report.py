"""What attnopt found and decided, in a form tests and people can audit.

A `Report` lists every softmax-attention `Site` in the captured graphs — rewritable or not, with
the reason — and, once planned or rewritten, each site's `Decision`. `str(report)` is a rich
table; `report.to_json()` is the machine-readable form.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .variants.site import SiteInfo

KEPT = "softmax"
"""`Decision.variant` of a site that keeps the model's own attention (and of its baseline candidate row)."""


@dataclasses.dataclass
class Decision:
    """What was done at one site, and what it is predicted and measured to cost."""

    variant: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    flops_before: int | None = None
    flops_after: int | None = None
    est_seconds_before: float | None = None
    est_seconds_after: float | None = None
    error: float | None = None
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Every variant considered here: params (and the `shown` ones that tell it apart), est_seconds,
    flops, measured error, the sequence length from which it is predicted to pay off
    (`pays_off_from_N`), or why it was `refused`."""
    reason: str | None = None
    """Why this variant (e.g. why softmax was kept)."""
    output_gain: float | None = None
    """How far an error here moves the graph's output: its relative error over the site's, measured
    with the site's best candidate (attnopt.sensitivity); the plan weighed this site's errors by
    it. None when not measured (one site to plan, or no candidate)."""
    loaded_from: str | None = None
    """The file this decision was loaded from (`attnopt.load`), or None when it was made in this
    process. A loaded decision was not re-planned: its error and costs are those measured when
    it was saved (the graph's end-to-end check ran again)."""

    @property
    def kept(self) -> bool:
        """The site keeps the model's own attention."""
        return self.variant == KEPT


@dataclasses.dataclass
class GraphPlan:
    """What was decided for one captured graph at one input signature, and its whole-graph totals.

    Seconds are the cost model's predictions for the whole graph (attention sites plus the rest,
    from FlopCounterMode); `output_error` is measured: the relative difference of the rewritten
    graph's outputs from the original's on the call's real inputs.
    """

    graph: int
    signature: str
    policy: str
    budget: str | None
    budget_met: bool | None
    seconds_before: float | None = None
    seconds_after: float | None = None
    flops_before: float | None = None
    flops_after: float | None = None
    total_error: float | None = None
    predicted_output_error: float | None = None
    """Σ output gain × error over the chosen candidates: the plan's first-order estimate of
    `output_error`, which it minimised (None when the sites were not weighed)."""
    output_error: float | None = None
    planning_seconds: float | None = None
    """Wall-clock seconds spent deciding this graph (recording run, candidates built and measured,
    knapsack), as the policy timed it; None when not timed."""
    shared_with: list[str] = dataclasses.field(default_factory=list)
    """Other input signatures of the same size bucket this plan serves, each checked on its first
    call (attnopt.backend.PLAN_SHARING) instead of planned anew."""
    loaded_from: str | None = None
    """The file this plan was loaded from (`attnopt.load`): its totals are the saved ones, but
    `output_error` is measured again on the call that applied it."""

    @property
    def predicted_speedup(self) -> float | None:
        if not self.seconds_before or not self.seconds_after:
            return None
        return self.seconds_before / self.seconds_after


@dataclasses.dataclass
class Site:
    """One softmax attention found in a captured graph.

    `shape` holds B, H, Hkv, N (queries), M (keys), d (query/key head dim), e (value head dim).
    `form` names the spelling it was found in ("matmul", "bmm", "baddbmm", "einsum", "sdpa",
    "mha", "encoder-layer", "manual-softmax", ...). A site that is not `rewritable` carries a
    one-sentence `reason`. `shape`, `causal`, `mask`, `dropout`, `dtype` and `scale` are what
    detection read from the graph; once the site is analysed, `facts` is the one record of its
    facts computed from the tensors it received (attnopt.variants.SiteInfo) — what the variants
    and the cost model read for its decision, and what the report shows.
    """

    id: int
    module: str
    source: str
    form: str
    shape: dict[str, int]
    causal: bool
    mask: str | None
    dropout: float
    dtype: str
    rewritable: bool
    reason: str | None = None
    decision: Decision | None = None
    scale: float | None = None
    graph: int = 0
    signature: str = ""
    facts: SiteInfo | None = None

    @property
    def shown_mask(self) -> str | None:
        """The mask kind the report shows: the analysed facts' where known, else detection's."""
        return self.facts.mask_kind if self.facts is not None else self.mask

    @property
    def shown_causal(self) -> bool:
        return self.facts.causal if self.facts is not None else self.causal

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """All sites of a model, across every captured graph and every input signature."""

    sites: list[Site] = dataclasses.field(default_factory=list)
    graphs: int = 0
    graph_breaks: list[str] = dataclasses.field(default_factory=list)
    budget_met: bool | None = None
    """False when any graph's plan missed its budget; None when nothing was planned."""
    notes: list[str] = dataclasses.field(default_factory=list)
    plans: list[GraphPlan] = dataclasses.field(default_factory=list)
    """One per (graph, input signature) that was decided: a new input shape is planned anew."""
    loop: Any = None
    """`attnopt.loops.LoopCheck` when optimize was given a loop: its end-of-loop error and rounds."""

    def add_plan(self, plan: GraphPlan) -> None:
        self.plans.append(plan)
        verdicts = [p.budget_met for p in self.plans if p.budget_met is not None]
        self.budget_met = all(verdicts) if verdicts else None

    @property
    def rewritable(self) -> list[Site]:
        return [s for s in self.sites if s.rewritable]

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.decision is not None and not s.decision.kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "graph_breaks": list(self.graph_breaks),
            "budget_met": self.budget_met,
            "notes": list(self.notes),
            "plans": [dataclasses.asdict(p) for p in self.plans],
            "loop": dataclasses.asdict(self.loop) if self.loop is not None else None,
            "sites": [s.to_dict() for s in self.sites],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table(self) -> Table:
        table = Table(title=f"attnopt: {len(self.sites)} attention site(s) in {self.graphs} graph(s)")
        for column in ("id", "module", "form", "B,H,Hkv,N,M,d,e", "mask", "causal", "dropout",
                       "dtype", "rewritable", "decision", "source"):
            table.add_column(column, overflow="fold")
        for site in self.sites:
            shape = ",".join(str(site.shape.get(k, "?")) for k in ("B", "H", "Hkv", "N", "M", "d", "e"))
            if site.decision is not None:
                decision = site.decision.variant
                if site.decision.params.get("exact_heads"):
                    decision += f" (heads {site.decision.params['exact_heads']} exact)"
                if site.decision.error is not None:
                    decision += f" (err {site.decision.error:.2e}"
                    if site.decision.output_gain is not None:
                        decision += f", output gain {site.decision.output_gain:.2g}"
                    decision += ")"
                before, after = site.decision.est_seconds_before, site.decision.est_seconds_after
                if before and after and not site.decision.kept:
                    decision += f", {before / after:.1f}x est."
                if site.decision.loaded_from is not None:
                    decision += ", loaded"
            else:
                decision = "-"
            table.add_row(
                str(site.id), site.module or "-", site.form, shape, site.shown_mask or "-",
                "yes" if site.shown_causal else "no", f"{site.dropout:g}", site.dtype,
                "yes" if site.rewritable else f"no: {site.reason}", decision, site.source or "-",
            )
        return table

    def candidates_table(self, site_id: int) -> Table:
        """Every candidate considered at one site: params, predicted cost, measured error, the
        length from which it pays off, or why it was refused."""
        site = next((s for s in self.sites if s.id == site_id), None)
        if site is None:
            raise KeyError(f"no site {site_id}; sites are {[s.id for s in self.sites]}")
        decision = site.decision
        title = f"site {site.id} ({site.module or '-'}): " + (
            f"{decision.variant} — {decision.reason or ''}" if decision is not None else "not decided")
        table = Table(title=title)
        for column in ("variant", "params", "est ms", "× vs softmax", "error", "pays off from N", "refused"):
            table.add_column(column, overflow="fold")
        rows = decision.candidates if decision is not None else []
        baseline = next((row.get("est_seconds") for row in rows if row["variant"] == KEPT), None)
        for row in rows:
            seconds, error = row.get("est_seconds"), row.get("error")
            table.add_row(
                row["variant"], ", ".join(f"{name}={value}" for name, value in row.get("shown", {}).items()),
                f"{seconds * 1e3:.3g}" if seconds is not None else "-",
                f"{baseline / seconds:.2f}" if seconds and baseline else "-",
                f"{error:.3g}" if error is not None else "-",
                str(row.get("pays_off_from_N") or "-"), row.get("refused") or "")
        return table

    def explain(self, site_id: int) -> str:
        """`candidates_table(site_id)` as text."""
        return _render(self.candidates_table(site_id))

    def __str__(self) -> str:
        lines = [_render(self.table())]
        if self.graph_breaks:
            lines.append(f"graph breaks: {len(self.graph_breaks)}")
            lines.extend(f"  - {reason}" for reason in self.graph_breaks)
        lines.extend(f"note: {note}" for note in self.notes)
        for plan in self.plans:
            line = f"plan: graph {plan.graph} at {plan.signature or 'no tensor inputs'}: {plan.policy}"
            if plan.budget is not None:
                line += f" {plan.budget}, met: {plan.budget_met}"
            if plan.predicted_speedup is not None:
                line += f", predicted {plan.predicted_speedup:.2f}x faster"
            if plan.output_error is not None:
                line += f", output error {plan.output_error:.2e}"
            if plan.predicted_output_error is not None:
                line += f" (predicted {plan.predicted_output_error:.2e})"
            if plan.loaded_from is not None:
                line += f", loaded from {plan.loaded_from}"
            elif plan.planning_seconds is not None:
                line += f", planned in {plan.planning_seconds:.2f} s"
            if plan.shared_with:
                line += f", also serves {len(plan.shared_with)} other shape(s) ({', '.join(plan.shared_with[:3])}" + (
                    ", …)" if len(plan.shared_with) > 3 else ")")
            lines.append(line)
        if self.budget_met is not None:
            lines.append(f"budget met: {self.budget_met}")
        if self.loop is not None:
            lines.append(str(self.loop))
        return "\n".join(lines)


def _render(table: Table) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=200, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip()

