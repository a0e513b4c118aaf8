"""What attnopt found and decided, in a form tests and people can audit.

A `Report` lists every softmax-attention `Site` in the captured graphs — rewritable or not, with
the reason — and, once planned or rewritten, each site's `Decision`. `str(report)` is a rich
table; `report.to_json()` is the machine-readable form.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

from rich.console import Console
from rich.table import Table


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


@dataclasses.dataclass
class Site:
    """One softmax attention found in a captured graph.

    `shape` holds B, H, Hkv, N (queries), M (keys), d (query/key head dim), e (value head dim).
    `form` names the spelling it was found in ("matmul", "bmm", "baddbmm", "einsum", "sdpa",
    "mha", "encoder-layer", "manual-softmax", ...). A site that is not `rewritable` carries a
    one-sentence `reason`.
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """All sites of a model, across every captured graph and every input signature."""

    sites: list[Site] = dataclasses.field(default_factory=list)
    graphs: int = 0
    graph_breaks: list[str] = dataclasses.field(default_factory=list)
    budget_met: bool | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def rewritable(self) -> list[Site]:
        return [s for s in self.sites if s.rewritable]

    @property
    def rewritten(self) -> list[Site]:
        return [s for s in self.sites if s.decision is not None and s.decision.variant != "softmax"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "graph_breaks": list(self.graph_breaks),
            "budget_met": self.budget_met,
            "notes": list(self.notes),
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
                if site.decision.error is not None:
                    decision += f" (err {site.decision.error:.2e})"
            else:
                decision = "-"
            table.add_row(
                str(site.id), site.module or "-", site.form, shape, site.mask or "-",
                "yes" if site.causal else "no", f"{site.dropout:g}", site.dtype,
                "yes" if site.rewritable else f"no: {site.reason}", decision, site.source or "-",
            )
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=200, force_terminal=False, color_system=None).print(self.table())
        lines = [buffer.getvalue().rstrip()]
        if self.graph_breaks:
            lines.append(f"graph breaks: {len(self.graph_breaks)}")
            lines.extend(f"  - {reason}" for reason in self.graph_breaks)
        lines.extend(f"note: {note}" for note in self.notes)
        if self.budget_met is not None:
            lines.append(f"budget met: {self.budget_met}")
        return "\n".join(lines)
