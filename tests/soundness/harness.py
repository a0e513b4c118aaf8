"""Runs one generated program through attnopt and decides its outcome.

A case passes when the program is

* **rewritten-equal**: rewritten by `attnopt.rewrite(model, "exact", args=example)` (or
  `torch.compile(model, backend="attnopt")`) and equal to the original (oracle.compare) on every
  fresh input, under both grad modes, with equal first-order gradients where checked; or
* **refused**: every site it has is listed in `attnopt.report_of(...).sites` with
  `rewritable=False` and a `reason` (and the outputs are still equal); or
* **left-alone**: a near-miss (not softmax attention that may be rewritten) with no site at all.

It fails as

* **silent-wrong**: the rewritten program differs from the original on some fresh input (or
  gradient) — the thing this suite exists to find;
* **near-miss-rewritten**: a near-miss was rewritten (it must be refused or left alone);
* **unreported**: a real attention with no site in the report, or a site not rewritten with no
  reason;
* **crashed**: `rewrite` or the rewritten module raised where the original did not.

Programs whose original itself raises are "invalid" and are not cases.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import linecache
import os
import re
import warnings
from typing import Any, Callable

import torch

import attnopt

from . import values as V
from .oracle import GRADIENT_TOLERANCE, Mismatch, compare, tensors_of
from .programs import Program, Spec, render

PASSING = ("rewritten-equal", "refused", "left-alone")
FAILING = ("silent-wrong", "near-miss-rewritten", "unreported", "crashed")
OUTCOMES = PASSING + FAILING

FRESH_REGIMES = ("mixed", "all-keep", "partial")

INNER = os.environ.get("ATTNOPT_SOUNDNESS_INNER", "eager")
"""What runs the rewritten graphs (attnopt's `inner`): "eager" (the default, and CI's) or
"inductor" (`run_soak.py --inner inductor`: the same cases with Inductor underneath)."""
REFERENCE = os.environ.get("ATTNOPT_SOUNDNESS_REFERENCE", "eager")
"""What the rewritten program must equal: "eager" (the original module called as it is; the default,
and CI's) or "compile" (plain `torch.compile(original)`, Inductor's numerics: with --inner inductor,
the promise of `torch.compile(model, backend="attnopt")`'s default, that it computes what the
`torch.compile(model)` it replaces computes)."""
REWRITE_ARGS = "" if INNER == "eager" else f", inner={INNER!r}"
COMPILE_ARGS = f', options={{"inner": {INNER!r}}}'


def rewrite_exact(model: torch.nn.Module, example: tuple) -> torch.nn.Module:
    """`attnopt.rewrite(model, "exact", args=example)`, with `inner` only when it is not the default."""
    return attnopt.rewrite(model, "exact", args=example, **({} if INNER == "eager" else {"inner": INNER}))


def compile_attnopt(model: torch.nn.Module) -> Callable:
    """`torch.compile(model, backend="attnopt")` with the harness's `inner` (its default is Inductor;
    the harness checks attnopt's rewrite against eager PyTorch, so it passes "eager" unless asked)."""
    return torch.compile(model, backend="attnopt", options={"inner": INNER})


class Invalid(Exception):
    """The original program raises on its own inputs: not a case."""


@dataclasses.dataclass
class CaseResult:
    test: str
    spec: Spec
    outcome: str
    check: str = ""  # the check that failed, e.g. "fresh input 0 (mixed) under no_grad"
    detail: str = ""
    diagnosis: str = ""  # which rows/values disagree, in words
    sites: str = ""
    repro: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome in FAILING

    def category(self) -> tuple[str, ...]:
        """What makes two failures "the same" for the summary."""
        spec = self.spec
        near = spec.near_miss()
        if spec.family in ("mha", "sdpa"):
            shape = (spec.family, f"mask={spec.mask}")
        else:
            fill = f" fill={spec.fill}" if spec.mask in ("fill", "fill_", "where", "bias-built", "causal") else ""
            manual = f" softmax={spec.softmax}" if spec.softmax.startswith("manual") else ""
            shape = ("matmul", f"mask={spec.mask}{fill}{manual}")
        check = self.check.replace("instance 1: ", "instance-1 ").replace("instance 0: ", "")
        check = "gradient" if check.startswith("gradient") else check.split(" ")[0]
        return (self.test, self.outcome, check) + shape + ((f"near-miss: {near}",) if near else ()) + (
            self.diagnosis.split(";")[0],)


# --- running programs ------------------------------------------------------------------------------

_counter = itertools.count()


def load(program: Program) -> type:
    """Exec the program's source; return its `Program` class (linecache-registered for tracebacks)."""
    filename = f"<soundness-program-{next(_counter)}>"
    source = PRELUDE + program.source
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["Program"]


PRELUDE = "import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n"


def grad_mode_name(enabled: bool) -> str:
    return "grad" if enabled else "no_grad"


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run(model: Callable, args: list[torch.Tensor], grad: bool) -> Any:
    with torch.set_grad_enabled(grad), quiet():
        out = model(*args)
    return _detach(out)


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    if isinstance(out, list):
        return [_detach(o) for o in out]
    return out


def first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:300]


def sites_summary(report: Any) -> str:
    parts = []
    for site in report.sites:
        decision = site.decision.variant if site.decision is not None else "-"
        reason = f" reason={site.reason!r}" if site.reason else ""
        parts.append(f"site {site.id} form={site.form} mask={site.mask} scale={site.scale} "
                     f"rewritable={site.rewritable} decision={decision}{reason}")
    return "\n".join(parts) or "(no sites)"


@dataclasses.dataclass
class SiteVerdict:
    rewritten: bool
    refused: bool
    unexplained: bool
    found: bool


def site_verdict(reports: list[Any]) -> SiteVerdict:
    sites = [site for report in reports for site in report.sites]
    rewritten = any(s.decision is not None and s.decision.variant != "softmax" for s in sites)
    refused = any(not s.rewritable and s.reason for s in sites) or any(
        s.decision is not None and s.decision.variant == "softmax" and s.decision.reason for s in sites)
    unexplained = any((not s.rewritable and not s.reason) or (s.rewritable and s.decision is None) for s in sites)
    return SiteVerdict(rewritten, refused, unexplained, bool(sites))


def decide(spec: Spec, verdict: SiteVerdict, *, strict_near_miss: bool = True) -> tuple[str, str]:
    """Outcome of a case whose outputs all matched."""
    if spec.near_miss() is not None:
        if verdict.rewritten and strict_near_miss:
            return "near-miss-rewritten", f"a near-miss ({spec.near_miss()}) was rewritten; it must be refused or left alone"
        if verdict.refused:
            return "refused", ""
        if verdict.rewritten:
            return "rewritten-equal", ""
        return "left-alone", ""
    if verdict.unexplained:
        return "unreported", "a site is neither rewritten nor refused with a reason"
    if verdict.rewritten:
        return "rewritten-equal", ""
    if verdict.refused:
        return "refused", ""
    return "unreported", "the attention is not in the report at all"


# --- diagnosis ---------------------------------------------------------------------------------------


def keep_of(program: Program, inputs: list[torch.Tensor], state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The (B,H,N,M) keep pattern a fresh input gives the program's mask, where it has one."""
    from .programs import B, H, N

    spec = program.spec
    m = spec.keys
    if spec.family == "mha":
        return None
    if spec.mask == "causal":
        return torch.ones(N, m, dtype=torch.bool).tril(diagonal=m - N).expand(B, H, N, m)
    for slot, value in zip(program.inputs, inputs):
        if slot.role in ("keep", "drop", "bias", "keep-int"):
            return _as_keep(slot.role, value).expand(B, H, N, m)
    for slot in program.state:
        if slot.role in ("keep", "drop", "rel_bias", "keep-int"):
            return _as_keep("bias" if slot.role == "rel_bias" else slot.role, state[slot.name]).expand(B, H, N, m)
    return None


def _as_keep(role: str, value: torch.Tensor) -> torch.Tensor:
    if role == "keep":
        return value
    if role == "keep-int":
        return value != 0
    if role == "drop":
        return ~value
    return value.float() > -1e3


def diagnose(program: Program, mismatch: Mismatch, inputs: list[torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    words = [mismatch.kind]
    keep = keep_of(program, inputs, state)
    rows = mismatch.rows
    if keep is not None and rows is not None and tuple(rows.shape) == tuple(keep.shape[:-1]):
        kinds = collections.Counter()
        for index in rows.nonzero().tolist():
            k = keep[tuple(index)]
            kinds["fully-masked" if not bool(k.any()) else "all-keep" if bool(k.all()) else "partial"] += 1
        if kinds:
            words.append("rows " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())))
    for slot, value in zip(program.inputs, inputs):
        if slot.role in ("fill", "scale"):
            words.append(f"{slot.name}={value.item():g}")
    return "; ".join(words)


# --- reproducers ----------------------------------------------------------------------------------------


def repro_script(program: Program, state: dict[str, V.Value], example: list[V.Value], failing: list[V.Value] | None,
                 *, example_grad: bool, check_grad: bool, seed: int, how: str = "rewrite",
                 gradient: bool = False, second_state: dict[str, V.Value] | None = None) -> str:
    """A standalone script: the program, its state and inputs, the rewrite, the failing check."""
    names = [slot.name for slot in program.inputs]
    data = [i for i, slot in enumerate(program.inputs) if slot.role == "data"]
    lines = ["import math", "import torch", "import torch.nn as nn", "import torch.nn.functional as F",
             "import attnopt", "", "inf = math.inf", "", program.source, ""]

    def block(title: str, values: list[V.Value]) -> None:
        lines.append(f"{title} = [")
        for name, value in zip(names, values):
            lines.append(f"    {value.literal},  # {name}")
        lines.append("]")

    lines.append("state = {" + ", ".join(f"{k!r}: {v.literal}" for k, v in state.items()) + "}")
    if second_state is not None:
        lines.append("other_state = {" + ", ".join(f"{k!r}: {v.literal}" for k, v in second_state.items()) + "}")
    block("example", example)
    block("fresh", failing if failing is not None else example)
    lines.append(f"torch.manual_seed({seed})")
    lines.append("model = Program(state).eval()")
    if second_state is not None:
        lines.append(f"torch.manual_seed({seed + 1})")
        lines.append("other = Program(other_state).eval()")
    if how == "rewrite":
        lines.append(f"with torch.set_grad_enabled({example_grad}):")
        lines.append(f'    fast = attnopt.rewrite(model, "exact", args=tuple(example){REWRITE_ARGS})')
        if second_state is not None:
            lines.append(f'    other_fast = attnopt.rewrite(other, "exact", args=tuple(example){REWRITE_ARGS})')
    else:
        lines.append(f'fast = torch.compile(model, backend="attnopt"{COMPILE_ARGS})')
        if second_state is not None:
            lines.append(f'other_fast = torch.compile(other, backend="attnopt"{COMPILE_ARGS})')
        lines.append(f"with torch.set_grad_enabled({example_grad}):")
        lines.append("    fast(*example)")
        if second_state is not None:
            lines.append("    other_fast(*example)")
    if second_state is not None:
        lines.append("model, fast = other, other_fast  # the second instance is the one that differs")
    lines.append("print(attnopt.report_of(fast))")
    if gradient:
        lines += [
            "def grads(m):",
            f"    xs = [t.clone().requires_grad_(i in {data!r}) for i, t in enumerate(fresh)]",
            "    out = m(*xs)",
            "    out = out if isinstance(out, tuple) else (out,)",
            "    g = torch.Generator().manual_seed(0)",
            "    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in out)",
            "    leaves = [x for x in xs if x.requires_grad] + [p for p in model.parameters() if p.requires_grad]",
            "    return torch.autograd.grad(loss, leaves, allow_unused=True)",
            "for e, a in zip(grads(model), grads(fast)):",
            "    if e is None or a is None:",
            "        print('gradient: one side is None', e is None, a is None); continue",
            "    print('gradient max |diff|:', (a - e).abs().max().item(), 'max |grad|:', e.abs().max().item())",
        ]
    else:
        lines.append(f"with torch.set_grad_enabled({check_grad}):")
        lines.append("    expected, actual = model(*fresh), fast(*fresh)")
        lines.append("expected = expected if isinstance(expected, tuple) else (expected,)")
        lines.append("actual = actual if isinstance(actual, tuple) else (actual,)")
        lines.append("for e, a in zip(expected, actual):")
        lines.append("    print('NaN original/rewritten:', e.isnan().sum().item(), a.isnan().sum().item(),")
        lines.append("          ' max |diff| (finite):', (a.float() - e.float()).nan_to_num(0, 0, 0).abs().max().item())")
    return "\n".join(lines) + "\n"


# --- the checks ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Failure:
    check: str
    detail: str
    diagnosis: str
    inputs: list[V.Value] | None
    check_grad: bool
    gradient: bool = False
    kind: str = "silent-wrong"


def check_fresh(program: Program, original: torch.nn.Module, rewritten: Callable, state: dict[str, torch.Tensor],
                example_grad: bool, seed: int, example: list[V.Value]) -> Failure | None:
    """The rewritten program against the original: on the example, then on fresh inputs under
    both grad modes (the other one first)."""
    checks = [("example", example_grad, example)]
    for mode in (not example_grad, example_grad):
        for index, regime in enumerate(FRESH_REGIMES):
            fresh = V.input_values(program, regime, seed * 101 + index * 7 + int(mode), example=False)
            checks.append((f"fresh input {index} ({regime})", mode, fresh))
    reference = torch.compile(original) if REFERENCE == "compile" else original
    for name, mode, values in checks:
        args = V.tensors(values)
        try:
            expected = run(reference, args, mode)
        except Exception as error:
            TALLY.skipped[first_line(error)[:120]] += 1
            continue  # the original itself rejects these values (not the rewrite's business)
        try:
            actual = run(rewritten, V.tensors(values), mode)
        except Exception as error:
            return Failure(f"{name} under {grad_mode_name(mode)}", first_line(error), "", values, mode, kind="crashed")
        mismatch = compare(actual, expected, reference=lambda: float64_run(original, values))
        if mismatch is not None:
            return Failure(f"{name} under {grad_mode_name(mode)}", str(mismatch),
                           diagnose(program, mismatch, args, state), values, mode)
    return None


def _float64(values: list[V.Value]) -> list[torch.Tensor]:
    return [t.double() if t.is_floating_point() else t for t in V.tensors(values)]


def float64_run(original: torch.nn.Module, values: list[V.Value]) -> Any:
    """The original program evaluated in float64 (oracle.compare's rounding allowance)."""
    return run(copy.deepcopy(original).double(), _float64(values), False)


def check_gradients(program: Program, original: torch.nn.Module, rewritten: Callable, seed: int) -> Failure | None:
    """First-order gradients w.r.t. the data inputs and the parameters, on a fresh input whose
    every mask row keeps some key (so the outputs, and gradients, are finite), positive scales."""
    values = V.input_values(program, "partial", seed * 101 + 99, example=False, positive_scale=True)
    params = [p for p in original.parameters() if p.requires_grad]
    leaf_names = [slot.name for slot in program.inputs if slot.role == "data"] + [
        name for name, p in original.named_parameters() if p.requires_grad]

    def grads(model: Callable, inputs: list[torch.Tensor] | None = None, leaves_of=None) -> list[torch.Tensor]:
        inputs = V.tensors(values) if inputs is None else inputs
        xs = [t.clone().requires_grad_(slot.role == "data") for slot, t in zip(program.inputs, inputs)]
        with torch.enable_grad(), quiet():
            out = model(*xs)
            outs = tensors_of(out)
            generator = torch.Generator().manual_seed(0)
            loss = sum((o.double() * torch.randn(o.shape, generator=generator).double()).sum() for o in outs)
            leaves = [x for x in xs if x.requires_grad] + (params if leaves_of is None else leaves_of)
            found = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(found, leaves)]

    def reference() -> list[torch.Tensor]:
        double = copy.deepcopy(original).double()
        return grads(double, _float64(values), [p for p in double.parameters() if p.requires_grad])

    try:
        expected = grads(original)
    except Exception:
        return None
    if not all(bool(torch.isfinite(g).all()) for g in expected):
        return None
    try:
        actual = grads(rewritten)
    except Exception as error:
        return Failure("gradient", first_line(error), "", values, True, gradient=True, kind="crashed")
    references: list[torch.Tensor] | None = None

    def reference_of(i: int) -> torch.Tensor:
        nonlocal references
        if references is None:
            references = reference()
        return references[i]

    for i, (name, a, e) in enumerate(zip(leaf_names, actual, expected)):
        mismatch = compare(a, e, tol=GRADIENT_TOLERANCE, reference=lambda i=i: reference_of(i))
        if mismatch is not None:
            return Failure(f"gradient w.r.t. {name}", str(mismatch), mismatch.kind, values, True, gradient=True)
    return None


def _build(program: Program, cls: type, state: dict[str, V.Value], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(V.tensors(state)).eval()


def run_case(spec: Spec, test: str = "programs") -> CaseResult:
    """One program, rewritten once from its example inputs, checked on fresh ones."""
    program = render(spec)
    cls = load(program)
    state_values = V.state_values(program, spec.seed, 0)
    original = _build(program, cls, state_values, spec.seed)
    state = {name: t for name, t in V.tensors(state_values).items()}
    example = V.input_values(program, spec.example_mask, spec.seed * 101 + 1000, example=True)
    try:
        run(original, V.tensors(example), spec.example_grad)
    except Exception as error:
        raise Invalid(first_line(error)) from None

    def repro(failing: list[V.Value] | None, check_grad: bool, gradient: bool = False) -> str:
        return repro_script(program, state_values, example, failing, example_grad=spec.example_grad,
                            check_grad=check_grad, seed=spec.seed, gradient=gradient)

    torch._dynamo.reset()
    try:
        with torch.set_grad_enabled(spec.example_grad), quiet():
            rewritten = rewrite_exact(original, tuple(V.tensors(example)))
    except Exception as error:
        return CaseResult(test, spec, "crashed", "rewrite", first_line(error), "", "",
                          repro(None, spec.example_grad))
    report = attnopt.report_of(rewritten)
    failure = check_fresh(program, original, rewritten, state, spec.example_grad, spec.seed, example)
    if failure is None and spec.grad_check and spec.dtype == "float32":
        failure = check_gradients(program, original, rewritten, spec.seed)
    sites = sites_summary(report)
    if failure is not None:
        return CaseResult(test, spec, failure.kind, failure.check, failure.detail, failure.diagnosis, sites,
                          repro(failure.inputs, failure.check_grad, failure.gradient))
    outcome, detail = decide(spec, site_verdict([report]))
    return CaseResult(test, spec, outcome, "report" if outcome in FAILING else "", detail, "", sites,
                      repro(None, spec.example_grad) if outcome in FAILING else "")


def run_instances_case(spec: Spec) -> list[CaseResult]:
    """Two instances of one class with different buffers/parameters: each rewritten on its own,
    and each compiled with torch.compile(backend="attnopt"); each must equal its own original."""
    program = render(spec)
    cls = load(program)
    states = [V.state_values(program, spec.seed, i) for i in (0, 1)]
    originals = [_build(program, cls, states[i], spec.seed + i) for i in (0, 1)]
    state_tensors = [{n: t for n, t in V.tensors(s).items()} for s in states]
    example = V.input_values(program, spec.example_mask, spec.seed * 101 + 1000, example=True)
    for model in originals:
        try:
            run(model, V.tensors(example), spec.example_grad)
        except Exception as error:
            raise Invalid(first_line(error)) from None
    results = []
    for how in ("rewrite", "compile"):
        test = f"instances/{how}"
        torch._dynamo.reset()
        wrapped = []
        try:
            with torch.set_grad_enabled(spec.example_grad), quiet():
                for model in originals:
                    if how == "rewrite":
                        wrapped.append(rewrite_exact(model, tuple(V.tensors(example))))
                    else:
                        compiled = compile_attnopt(model)
                        compiled(*V.tensors(example))
                        wrapped.append(compiled)
        except Exception as error:
            results.append(CaseResult(test, spec, "crashed", f"{how} instance {len(wrapped)}", first_line(error), "", "",
                                      repro_script(program, states[0], example, None, example_grad=spec.example_grad,
                                                   check_grad=spec.example_grad, seed=spec.seed, how=how,
                                                   second_state=states[1])))
            continue
        reports = []
        for w in wrapped:
            with contextlib.suppress(Exception):
                reports.append(attnopt.report_of(w))
        sites = "\n".join(sites_summary(r) for r in reports)
        result = None
        for i, (model, w) in enumerate(zip(originals, wrapped)):
            failure = check_fresh(program, model, w, state_tensors[i], spec.example_grad, spec.seed + 17 * i, example)
            if failure is not None:
                result = CaseResult(test, spec, failure.kind, f"instance {i}: {failure.check}", failure.detail,
                                    failure.diagnosis, sites,
                                    repro_script(program, states[0], example, failure.inputs,
                                                 example_grad=spec.example_grad, check_grad=failure.check_grad,
                                                 seed=spec.seed, how=how, second_state=states[1] if i else None))
                break
        if result is None:
            outcome, detail = decide(spec, site_verdict(reports), strict_near_miss=False)
            if outcome == "unreported" and not reports:
                outcome, detail = "unreported", "no report could be found for the compiled module"
            result = CaseResult(test, spec, outcome, "report" if outcome in FAILING else "", detail, "", sites)
        results.append(result)
    return results


# --- the tally --------------------------------------------------------------------------------------------


class Tally:
    """Every case's outcome, per test, for the session summary."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.failures: list[CaseResult] = []
        self.cases: list[dict[str, str]] = []  # every case, one line each in cases.jsonl
        self.invalid: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()  # refusal reasons, names blanked
        self.skipped: collections.Counter[str] = collections.Counter()  # fresh inputs the original rejects

    def add(self, result: CaseResult) -> None:
        self.cases.append({"test": result.test, "outcome": result.outcome, "check": result.check,
                           "detail": result.detail, "spec": result.spec.describe(), "sites": result.sites})
        self.counts[result.test][result.outcome] += 1
        if result.failed:
            self.failures.append(result)
        if result.outcome == "refused":
            found = set(re.findall(r"reason=(['\"])(.*?)\1(?:\n|$)", result.sites + "\n", flags=re.M))
            for _, reason in found:
                self.reasons[re.sub(r"`[^`]*`", "`…`", reason)[:160]] += 1

    def table(self) -> str:
        header = ["test"] + list(OUTCOMES) + ["total"]
        rows = []
        totals: collections.Counter[str] = collections.Counter()
        for test in sorted(self.counts):
            counts = self.counts[test]
            totals.update(counts)
            rows.append([test] + [str(counts[o]) for o in OUTCOMES] + [str(sum(counts.values()))])
        rows.append(["**all**"] + [str(totals[o]) for o in OUTCOMES] + [str(sum(totals.values()))])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        if self.invalid:
            lines.append("")
            lines.append("Invalid draws (the original itself raised; not cases): "
                         + ", ".join(f"{t} {n}" for t, n in sorted(self.invalid.items())))
        return "\n".join(lines)

    def reasons_table(self, top: int = 15) -> str:
        lines = [f"Refusal reasons (cases; top {top}):"]
        lines += [f"  {n:4d}  {reason}" for reason, n in self.reasons.most_common(top)]
        if self.skipped:
            lines.append("Fresh inputs skipped because the original raised on them: "
                         + "; ".join(f"{n}× {e}" for e, n in self.skipped.most_common(5)))
        return "\n".join(lines)

    def groups(self) -> dict[tuple[str, ...], list[CaseResult]]:
        grouped: dict[tuple[str, ...], list[CaseResult]] = collections.defaultdict(list)
        for failure in self.failures:
            grouped[failure.category()].append(failure)
        return dict(sorted(grouped.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def failures_markdown(self, limit: int | None = None) -> str:
        out = ["# Soundness failures", "", self.table(), "", "```", self.reasons_table(), "```", ""]
        for n, (key, cases) in enumerate(self.groups().items()):
            if limit is not None and n >= limit:
                out.append(f"... {len(self.groups()) - limit} more groups")
                break
            smallest = min(cases, key=lambda c: (len(c.repro), len(c.spec.describe())))
            out.append(f"## {n + 1}. {' | '.join(key)}  ({len(cases)} case(s))")
            out.append("")
            out.append(f"- check: {smallest.check}")
            out.append(f"- detail: {smallest.detail}")
            if smallest.diagnosis:
                out.append(f"- diagnosis: {smallest.diagnosis}")
            out.append(f"- spec: `{smallest.spec.describe()}`")
            out.append("- sites:")
            out += [f"    - {line}" for line in smallest.sites.splitlines()]
            if smallest.repro:
                out += ["", "```python", smallest.repro.rstrip(), "```"]
            out.append("")
        return "\n".join(out)


TALLY = Tally()


def record(result: CaseResult) -> CaseResult:
    TALLY.add(result)
    return result
