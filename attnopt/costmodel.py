"""Predict what an attention variant costs: FLOPs, bytes moved and roofline seconds on a device.

The planner compares softmax, agent, mediator and linear attention at every site before running
any of them. Each variant's spec (attnopt.variants) gives its cost as a `CostFormula`: sympy
expressions in the shape symbols B, H, Hkv, N, M, d, e, n and dtype_bytes, composed from the
building blocks here (softmax_attention, two_stage, value_shortcut, pooling, ...). Evaluating one
at a site's shape runs a plain Python function compiled once per formula (`compiled`): no sympy
while planning; only `break_even_length` (read lazily, for reports) solves with sympy. Seconds come
from a roofline on a `DeviceProfile` measured once per machine, thread count and dtype with
repeats and a noise estimate, cached as JSON, and spot-checked once per process (re-measured when
the check disagrees by more than 2×).

Conventions (what a "FLOP", an "element op" and a "byte" mean here):
- FLOPs count contractions (matmuls), 2 per multiply-add, as torch.utils.flop_counter does, so the
  exact formula equals FlopCounterMode's count of SDPA or of a matmul-softmax-matmul.
- Element ops are the element-wise work (softmax, feature maps, pooling, sums), one per element per
  pass, timed at the measured throughput of a vectorised exp.
- Bytes are what each kernel reads and writes once: a fused exact attention moves Q, K, V and O; an
  unfused one also writes the N×M scores and reads them back.
- seconds = max(FLOPs / matmul rate + element ops / element-wise rate, bytes / bandwidth)
            + kernel calls × per-call overhead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sympy
import torch
from sympy.printing.pycode import PythonCodePrinter
from torch.utils.flop_counter import FlopCounterMode

B, H, Hkv, N, M, d, e, n = sympy.symbols("B H Hkv N M d e n", positive=True, integer=True)
dtype_bytes = sympy.Symbol("dtype_bytes", positive=True, integer=True)
SHAPE_SYMBOLS = {"B": B, "H": H, "Hkv": Hkv, "N": N, "M": M, "d": d, "e": e}

Expr = sympy.Expr | int


@dataclasses.dataclass(frozen=True)
class CostFormula:
    """Work of one attention call as expressions in the shape symbols (see module conventions)."""

    flops: Expr
    elementwise_ops: Expr
    bytes_moved: Expr
    kernel_calls: Expr

    @property
    def terms(self) -> tuple[Expr, Expr, Expr, Expr]:
        """(flops, elementwise_ops, bytes_moved, kernel_calls), as they are (dataclasses.astuple deep-copies)."""
        return self.flops, self.elementwise_ops, self.bytes_moved, self.kernel_calls

    def __add__(self, other: CostFormula) -> CostFormula:
        return CostFormula(*(a + b for a, b in zip(self.terms, other.terms)))

    def with_kernel_calls(self, kernel_calls: Expr) -> CostFormula:
        """The same work in the number of kernels one call really launches (counted on the built module)."""
        return dataclasses.replace(self, kernel_calls=kernel_calls)


def softmax_attention(fused: bool = True) -> CostFormula:
    """softmax(QKᵀ)V: N·M·(d+e) multiply-adds; fused (SDPA/flash) or as three separate kernels.

    The exact variant's formula, and the model's own attention that every variant is compared with.
    """
    scores = B * H * N * M
    unfused_traffic = 4 * dtype_bytes * scores  # scores written, softmax reads + writes, PV reads
    return CostFormula(
        flops=2 * scores * (d + e),
        elementwise_ops=scores,
        bytes_moved=dtype_bytes * B * (H * N * (d + e) + Hkv * M * (d + e)) + (0 if fused else unfused_traffic),
        kernel_calls=1 if fused else 3,
    )


def two_stage(n_tokens: Expr) -> CostFormula:
    """Tokens attend to K, V (n·M·(d+e)); queries attend to the tokens (N·n·(d+e)); agent and mediator share it."""
    small_scores = B * H * (n_tokens * M + N * n_tokens)
    return CostFormula(
        flops=2 * small_scores * (d + e),
        elementwise_ops=small_scores,
        bytes_moved=dtype_bytes * (
            B * (H * N * (d + e) + Hkv * M * (d + e))  # Q, K, V, O
            + 4 * small_scores  # both score matrices written, softmaxed, read
            + 2 * B * H * n_tokens * (d + e)  # the tokens and their values, written then read
        ),
        kernel_calls=6,  # per stage: scores matmul, softmax, values matmul
    )


def value_shortcut(n_offsets: int) -> CostFormula:
    """out = w₀·attention + Σ_o w_o·v_(i+o): one pass weighs the output (read, written), then one
    in-place multiply-add per offset reads a shifted slice of V and reads and writes the output."""
    return CostFormula(
        flops=0,
        elementwise_ops=B * H * N * e * (1 + n_offsets),
        bytes_moved=dtype_bytes * B * H * N * e * (2 + 3 * n_offsets),
        kernel_calls=1 + n_offsets,
    )


def pooling(n_tokens: Expr) -> CostFormula:
    """Tokens as means of N/n consecutive queries (adaptive average pooling): one pass over Q."""
    return CostFormula(
        flops=0,
        elementwise_ops=B * H * N * d,
        bytes_moved=dtype_bytes * B * H * (N + n_tokens) * d,
        kernel_calls=3,
    )


def kmeans(n_tokens: Expr, iterations: int, window: int | None) -> CostFormula:
    """Lloyd iterations from the pooled tokens: assign each query to its nearest token, re-average.

    Assignment is a matmul Q·Tᵀ (N·n·d multiply-adds) and an argmax over the n scores; local
    assignment (`window` candidate tokens per query, clustering.nearest_groups) also bars the
    others in the scores (one masked fill), takes the first maximum in four passes
    (clustering.first_max) and a fallback, against an (n, N) mask of the candidates built once.
    """
    local = window is not None
    assignment = CostFormula(
        flops=2 * B * H * N * n_tokens * d,
        elementwise_ops=(6 if local else 2) * B * H * N * n_tokens,
        bytes_moved=dtype_bytes * B * H * N * (d + (6 if local else 3) * n_tokens),
        kernel_calls=9 if local else 5,
    )
    per_iteration = assignment + pooling(n_tokens)
    total = CostFormula(*(iterations * term for term in per_iteration.terms))
    if local and iterations > 0:  # the mask of each query's candidates: zeros, a scatter, a negation
        total = total + CostFormula(flops=0, elementwise_ops=B * H * N * (2 * n_tokens + sympy.Min(window, n_tokens)),
                                    bytes_moved=2 * B * H * N * n_tokens, kernel_calls=3)
    return total


def bipartite(n_tokens: Expr) -> CostFormula:
    """ToMe-style merging: rounds halve the T tokens, each with a (T/2)×(T/2) cosine similarity.

    Summed over the rounds from N down to n, the similarities cost (N² − n²)/3 · d multiply-adds —
    quadratic in N, like the attention it replaces — and the gathers about 8·N·d element ops.
    """
    pairs = (N**2 - n_tokens**2) / 3
    return CostFormula(
        flops=2 * B * H * pairs * d,
        elementwise_ops=B * H * (2 * pairs + 8 * N * d),
        bytes_moved=dtype_bytes * B * H * (2 * pairs + 8 * N * d),
        kernel_calls=16 * sympy.log(N / n_tokens, 2),
    )


def outlier_split(n_outliers: Expr) -> CostFormula:
    """Take the n_outliers queries farthest from their token out as tokens of their own.

    One pass over Q for the distances (subtract, square, sum), a top-k over N, and gathers and
    scatters of the n_outliers chosen queries; nothing when n_outliers is 0.
    """
    if n_outliers == 0:
        return CostFormula(0, 0, 0, 0)
    return CostFormula(
        flops=0,
        elementwise_ops=B * H * (3 * N * d + N + 3 * n_outliers * d),
        bytes_moved=dtype_bytes * B * H * (2 * N * d + N + 4 * n_outliers * d),
        kernel_calls=8,
    )


def lookup(table: Mapping[str, Any], key: str, what: str) -> Any:
    """`table[key]`, or a KeyError naming `what` and the keys there are (for the formulas' option tables)."""
    if key not in table:
        raise KeyError(f"unknown {what} {key!r}; expected one of {sorted(table)}")
    return table[key]


def _shape_values(shape: Mapping[str, int], dtype: torch.dtype) -> dict[str, int]:
    """Symbol name → value for a shape dict; Hkv defaults to H, M to N and e to d."""
    values = {"Hkv": shape.get("H"), "M": shape.get("N"), "e": shape.get("d"), **shape}
    return {name: values[name] for name in SHAPE_SYMBOLS if values.get(name) is not None} | {
        "dtype_bytes": dtype.itemsize
    }


def _substitutions(shape: Mapping[str, int], dtype: torch.dtype) -> dict[sympy.Symbol, int]:
    """Symbol values for a shape dict (see _shape_values), keyed by the symbols."""
    return {ARGUMENTS[name]: value for name, value in _shape_values(shape, dtype).items()}


ARGUMENTS = {**SHAPE_SYMBOLS, "dtype_bytes": dtype_bytes}
"""The symbols a compiled formula takes, in the order it takes them."""


@functools.lru_cache(maxsize=4096)
def compiled(*expressions: Expr) -> tuple[Callable[..., tuple], frozenset[str]]:
    """The expressions as one plain Python function of the ARGUMENTS returning their values (a
    tuple), and the names of the symbols they use.

    Compiled once per formula (sympy's Python printer and `eval`, cached; lambdify, ten times
    slower to build, only for a function Python's math lacks): planning evaluates numbers, never
    sympy. The function runs on Python ints, so a polynomial with integer coefficients (every
    FLOP and byte count but the bipartite merge's thirds) evaluates exactly.
    """
    expressions = tuple(sympy.sympify(expression) for expression in expressions)
    used = frozenset(str(symbol) for expression in expressions for symbol in expression.free_symbols)
    if used - ARGUMENTS.keys():  # e.g. an agent formula whose token count n was left symbolic
        return _unset(used - ARGUMENTS.keys()), used
    printer = PythonCodePrinter({"fully_qualified_modules": False})
    body = ", ".join(printer.doprint(expression) for expression in expressions)
    if printer._not_supported:  # a function Python's math lacks: sympy's own (slower to build) lambdify
        return sympy.lambdify(list(ARGUMENTS.values()), expressions, "math"), used
    return eval(f"lambda {', '.join(ARGUMENTS)}: ({body},)", dict(_MATH)), used


_MATH = {name: getattr(math, name) for name in dir(math) if not name.startswith("_")} | {"min": min, "max": max}
"""What a printed formula may call: Python's math, min and max (sympy's Min and Max)."""


def _unset(names: frozenset[str]) -> Callable[..., tuple]:
    def refuse(*_: Any) -> tuple:
        raise ValueError(f"the formula leaves {sorted(names)} unset")

    return refuse


def _number(value: Any) -> int | float:
    if isinstance(value, (int, float)):
        return value
    return int(value) if getattr(value, "is_Integer", False) else float(value)


def _evaluate_all(expressions: tuple[Expr, ...], shape: Mapping[str, int], dtype: torch.dtype) -> tuple:
    """The numbers the expressions take at `shape` (a ValueError naming the symbols it leaves unset)."""
    if all(isinstance(expression, (int, float)) for expression in expressions):
        return expressions
    function, used = compiled(*expressions)
    values = _shape_values(shape, dtype)
    missing = used - values.keys()
    if missing:
        raise ValueError(f"shape {dict(shape)} leaves {sorted(missing)} unset")
    return tuple(_number(value) for value in function(*(values.get(name) for name in ARGUMENTS)))


def _evaluate(expression: Expr, shape: Mapping[str, int], dtype: torch.dtype) -> int | float:
    """The number `expression` takes at `shape` (a ValueError naming the symbols it leaves unset)."""
    return _evaluate_all((expression,), shape, dtype)[0]


def evaluate(cost: CostFormula, shape: Mapping[str, int], dtype: torch.dtype = torch.float32) -> CostFormula:
    """`cost` at `shape`: the same formula with every term a number. The work terms are compiled
    together, the kernel count (often counted on the built module: a plain int) on its own."""
    *work, calls = cost.terms
    return CostFormula(*_evaluate_all(tuple(work), shape, dtype), _evaluate(calls, shape, dtype))


def flops(cost: CostFormula, shape: Mapping[str, int]) -> int:
    """FLOPs (2 per multiply-add of the matmuls) of one call costing `cost` at `shape` {B,H,Hkv,N,M,d,e}."""
    return round(_evaluate(cost.flops, shape, torch.float32))


def bytes_moved(cost: CostFormula, shape: Mapping[str, int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes read and written by one call costing `cost` at `shape` with tensors of `dtype`."""
    return round(_evaluate(cost.bytes_moved, shape, dtype))


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """The rates a roofline needs, for one device, thread count and dtype."""

    name: str
    matmul_flops_per_s: float
    bandwidth_bytes_per_s: float
    elementwise_ops_per_s: float
    call_overhead_s: float
    noise: float = 0.0
    """How much the repeated timings behind the rates spread: (median − fastest) / fastest of the
    noisiest of the four. 0 for a profile written by hand; large on a loaded machine."""

    RATES = ("matmul_flops_per_s", "bandwidth_bytes_per_s", "elementwise_ops_per_s", "call_overhead_s")

    def disagreement(self, other: DeviceProfile) -> float:
        """The largest factor by which one of the four rates differs between the two profiles (≥ 1)."""
        factors = [max(a / b, b / a) if a > 0 and b > 0 else (1.0 if a == b else math.inf)
                   for a, b in ((getattr(self, rate), getattr(other, rate)) for rate in self.RATES)]
        return max(factors)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _timings(run: Callable[[], object], device: torch.device, repeats: int, budget_s: float) -> list[float]:
    """Up to `repeats` timed runs (at least two; fewer than `repeats` once `budget_s` is spent), after one warm-up."""
    def synchronize() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    run()
    synchronize()
    timings: list[float] = []
    while len(timings) < 2 or (len(timings) < repeats and sum(timings) < budget_s):
        start = time.perf_counter()
        run()
        synchronize()
        timings.append(time.perf_counter() - start)
    return timings


PROFILE_VERSION = 3
"""Bumped whenever measure_device measures differently, so older cached profiles are not read."""

SMALL_OPS_PER_ROUND = 8
"""Ops in one round of measure_device's overhead loop: matmul, softmax, transpose, reshape, mul, add, cat, sum."""

DISAGREEMENT = 2.0
"""Two measurements of one rate that differ by more than this factor are not trusted: measure again."""


def _measure(device: torch.device, dtype: torch.dtype, *, rounds: int, repeats: int, budget_s: float,
             max_rounds: int) -> DeviceProfile:
    """The four rates, each the fastest of `rounds` rounds of up to `repeats` timings (`budget_s` each).

    The rounds take turns over the four benchmarks, so a burst of load from other processes falls
    on one round, not on one rate. A rate whose round bests differ by more than DISAGREEMENT gets
    more rounds, up to `max_rounds`, until its last two agree. On a shared machine the fastest run
    is the least disturbed one; the spread of the runs is the profile's `noise`.
    """
    size = 1024
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    source = torch.empty(16 * 2**20, device=device)
    target = torch.empty_like(source)
    small = torch.randn(2**18, device=device).to(dtype)
    small_out = torch.empty_like(small)

    x, y = torch.randn(1, 2, 4, 8, device=device), torch.randn(1, 2, 8, 4, device=device)

    def small_ops() -> None:  # the kinds of call an attention module makes, on tiny tensors
        for _ in range(20):
            torch.cat([torch.matmul(x, y).softmax(-1), y.transpose(-1, -2).reshape(1, 2, 4, 8) * 2.0 + 1.0], -1).sum(-1)

    benchmarks = {  # rate → (run, work per run: the rate is work / seconds, or seconds / work for the overhead)
        "matmul_flops_per_s": (lambda: a @ b, 2 * size**3),
        "bandwidth_bytes_per_s": (lambda: target.copy_(source), 2 * source.nbytes),
        "elementwise_ops_per_s": (lambda: torch.exp(small, out=small_out), small.numel()),
        "call_overhead_s": (small_ops, 20 * SMALL_OPS_PER_ROUND),
    }
    timings: dict[str, list[list[float]]] = {rate: [] for rate in benchmarks}
    pending = list(benchmarks)
    while pending:
        for rate in pending:
            timings[rate].append(_timings(benchmarks[rate][0], device, repeats, budget_s))

        def settled(rate: str) -> bool:
            bests = [min(round_) for round_ in timings[rate]]
            done = len(bests) >= rounds and (len(bests) < 2 or max(bests[-2:]) <= DISAGREEMENT * min(bests[-2:]))
            return done or len(bests) >= max_rounds

        pending = [rate for rate in pending if not settled(rate)]

    rates, noise = {}, 0.0
    for rate, (_, work) in benchmarks.items():
        every = sorted(t for round_ in timings[rate] for t in round_)
        best, median = every[0], every[len(every) // 2]
        rates[rate] = best / work if rate == "call_overhead_s" else work / best
        noise = max(noise, median / best - 1)
    return DeviceProfile(name=_device_name(device), noise=noise, **rates)


def measure_device(device: torch.device, dtype: torch.dtype = torch.float32) -> DeviceProfile:
    """Measure the roofline rates of `device`: about a second on an idle machine (more under load).

    Matmul rate: a 1024³ matmul. Bandwidth: a 64 MiB copy (read + write). Element-wise rate: exp
    over 256 Ki elements. Per-call overhead: the mean time of a small op (matmul, softmax, cat,
    transpose, reshape, mul, add, sum on tiny tensors), launch and Python call included. Each is
    the fastest of two interleaved rounds of repeats (more where the rounds disagree), with the
    spread as `noise` (see _measure).
    """
    return _measure(torch.device(device), dtype, rounds=2, repeats=8, budget_s=0.12, max_rounds=4)


def spot_check(device: torch.device, dtype: torch.dtype = torch.float32) -> DeviceProfile:
    """A quick measurement (one round of three repeats, about a fifth of a second) to check a cached profile with."""
    return _measure(torch.device(device), dtype, rounds=1, repeats=3, budget_s=0.03, max_rounds=1)


def cache_path(device: torch.device, dtype: torch.dtype = torch.float32) -> Path:
    """JSON file of `device`'s profile: $ATTNOPT_CACHE_DIR (default ~/.cache/attnopt)/device-<hash>.json.

    The hash covers the device model, torch's thread count and the dtype, since all three change
    the rates.
    """
    folder = Path(os.environ.get("ATTNOPT_CACHE_DIR") or Path.home() / ".cache" / "attnopt")
    key = f"{PROFILE_VERSION}|{_device_name(device)}|{device.type}|threads={torch.get_num_threads()}|{dtype}"
    return folder / f"device-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


_PROFILES: dict[Path, DeviceProfile] = {}
"""The profile of each cache file as settled in this process (read and checked, or measured)."""


def _read_profile(path: Path) -> DeviceProfile | None:
    try:
        return DeviceProfile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _reconciled(cached: DeviceProfile, measured: DeviceProfile) -> DeviceProfile:
    """Per rate, the faster of a cached and a new measurement where they agree within DISAGREEMENT;
    where they do not, the new one (a spot check disagreed with the cache, and so did this)."""
    rates = {}
    for rate in DeviceProfile.RATES:
        old, new = getattr(cached, rate), getattr(measured, rate)
        agree = old > 0 and new > 0 and max(old / new, new / old) <= DISAGREEMENT
        faster = min(old, new) if rate == "call_overhead_s" else max(old, new)
        rates[rate] = faster if agree else new
    return DeviceProfile(name=measured.name, noise=measured.noise, **rates)


def device_profile(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DeviceProfile:
    """The profile of `device`: from its cache file, checked once per process, else measured and cached.

    The first use in a process spot-checks the cached rates (spot_check); where one differs by more
    than DISAGREEMENT (2×) — a profile measured under load, a machine now much busier or faster —
    the device is measured again and the cache rewritten (_reconciled). A missing or unreadable file
    is measured. When the file cannot be written (the cache folder is a file, read-only, or holds a
    folder in its place) the profile is kept in memory, with a warning.
    """
    device = torch.device(device)
    path = cache_path(device, dtype)
    if path in _PROFILES:
        return _PROFILES[path]
    cached = _read_profile(path)
    if cached is None:
        profile = measure_device(device, dtype)
    elif cached.disagreement(spot_check(device, dtype)) > DISAGREEMENT:
        profile = _reconciled(cached, measure_device(device, dtype))
    else:
        profile = cached
    if profile != cached:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dataclasses.asdict(profile), indent=2))
        except OSError as error:
            warnings.warn(f"attnopt could not save the device profile to {path} ({error}); it is kept in memory "
                          "for this process only. Set ATTNOPT_CACHE_DIR to a writable folder to keep it.",
                          stacklevel=2)
    _PROFILES[path] = profile
    return profile


def resolve_profile(device: DeviceProfile | torch.device | str | None, dtype: torch.dtype) -> DeviceProfile:
    """`device` itself when it is a DeviceProfile, else the cached profile of that device (None: the CPU)."""
    if isinstance(device, DeviceProfile):
        return device
    return device_profile(device or "cpu", dtype)


def _roofline_terms(cost: CostFormula, profile: DeviceProfile) -> tuple[Expr, Expr, Expr]:
    """(compute seconds, memory seconds, overhead seconds): plain numbers or sympy expressions."""
    compute = cost.flops / profile.matmul_flops_per_s + cost.elementwise_ops / profile.elementwise_ops_per_s
    return compute, cost.bytes_moved / profile.bandwidth_bytes_per_s, cost.kernel_calls * profile.call_overhead_s


def _seconds(cost: CostFormula, profile: DeviceProfile) -> float:
    compute, memory, overhead = _roofline_terms(cost, profile)
    return float(max(compute, memory) + overhead)


def roofline_seconds(
    flops: float,
    bytes_moved: float = 0,
    *,
    elementwise_ops: float = 0,
    kernel_calls: float = 0,
    device: DeviceProfile | torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Roofline time of the given work on `device` (a DeviceProfile, a device, or None for the CPU).

    For the rest of a model, pass count_flops of its forward minus the sites' flops.
    """
    return _seconds(CostFormula(flops, elementwise_ops, bytes_moved, kernel_calls), resolve_profile(device, dtype))


def estimate_seconds(
    cost: CostFormula,
    shape: Mapping[str, int],
    device: DeviceProfile | torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Predicted seconds of one call costing `cost` at `shape` on `device` (None: this machine's CPU)."""
    return _seconds(evaluate(cost, shape, dtype), resolve_profile(device, dtype))


def count_flops(run: Callable[..., object], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs FlopCounterMode counts while `run(*args, **kwargs)` executes (e.g. a whole forward)."""
    with FlopCounterMode(display=False) as counter:
        run(*args, **kwargs)
    return counter.get_total_flops()


def _positive_roots(expression: sympy.Expr) -> list[float]:
    """Positive real roots in N: sympy's polynomial root finder, or for a non-polynomial (a log of N
    in a kernel-call count) sympy's bisection inside each sign change over N = 2^(k/8) up to 2^30."""
    if expression.is_polynomial(N):
        polynomial = sympy.Poly(sympy.expand(expression), N)
        roots = polynomial.nroots() if polynomial.degree() > 0 else []
        return [float(sympy.re(root)) for root in roots if abs(sympy.im(root)) < 1e-9 and sympy.re(root) > 0]
    evaluate = sympy.lambdify(N, expression, "math")
    grid = [2 ** (k / 8) for k in range(8 * 30 + 1)]
    values = [evaluate(length) for length in grid]
    return [
        float(sympy.nsolve(expression, N, (low, high), solver="bisect"))
        for low, high, value_low, value_high in zip(grid, grid[1:], values, values[1:])
        if value_low * value_high < 0
    ]


def break_even_length(
    cost: CostFormula,
    shape: Mapping[str, int],
    device: DeviceProfile | torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    baseline: CostFormula | None = None,
) -> int | None:
    """Smallest N (with M = N) from which `cost` is predicted below `baseline` (default: fused softmax attention).

    `shape` supplies B, H, Hkv, d, e (its N and M are ignored). Each roofline time is the larger of
    two terms in N (compute, memory) plus a constant, so which variant is faster can only change
    where two of the four terms cross; sympy finds those crossings, and the sign on each interval
    between them decides. None when the variant never becomes (and stays) faster.
    """
    baseline = softmax_attention() if baseline is None else baseline
    profile = resolve_profile(device, dtype)
    fixed = {symbol: value for symbol, value in _substitutions(shape, dtype).items() if symbol not in (N, M)}

    def terms(formula: CostFormula) -> list[sympy.Expr]:
        compute, memory, overhead = _roofline_terms(formula, profile)
        return [sympy.sympify(term + overhead).xreplace(fixed).xreplace({M: N}) for term in (compute, memory)]

    exact_terms, variant_terms = terms(baseline), terms(cost)

    def variant_faster(length: float) -> bool:  # as estimate_seconds prices it, so the two agree at every N
        at = {**shape, "N": length, "M": length}
        return _seconds(evaluate(cost, at, dtype), profile) < _seconds(evaluate(baseline, at, dtype), profile)

    crossings = sorted(
        {
            root
            for first, second in itertools.combinations(exact_terms + variant_terms, 2)
            for root in _positive_roots(first - second)
        }
    )
    # walk the intervals between crossings from the last (unbounded) one down while the variant stays faster
    threshold = None
    for low, high in reversed(list(zip([0.0, *crossings], [*crossings, 2 * max(crossings, default=1.0) + 2]))):
        if not variant_faster((low + high) / 2):
            break
        threshold = low
    if threshold is None:
        return None
    length = max(1, math.ceil(threshold))
    return length if variant_faster(length) else length + 1
