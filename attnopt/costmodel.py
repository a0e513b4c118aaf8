"""Predict what an attention variant costs: FLOPs, bytes moved and roofline seconds on a device.

The planner compares softmax, agent, mediator and linear attention at every site before running
any of them. Each variant has one sympy formula (`FORMULAS`) in the shape symbols B, H, Hkv, N, M,
d, e, n and dtype_bytes; evaluating it substitutes a site's shape. Seconds come from a roofline on
a `DeviceProfile` measured once per machine, thread count and dtype, and cached as JSON.

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
import hashlib
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sympy
import torch
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

    def __add__(self, other: CostFormula) -> CostFormula:
        return CostFormula(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def _exact(fused: bool = True, **cost_free_params: Any) -> CostFormula:
    """softmax(QKᵀ)V: N·M·(d+e) multiply-adds; fused (SDPA/flash) or as three separate kernels."""
    scores = B * H * N * M
    unfused_traffic = 4 * dtype_bytes * scores  # scores written, softmax reads + writes, PV reads
    return CostFormula(
        flops=2 * scores * (d + e),
        elementwise_ops=scores,
        bytes_moved=dtype_bytes * B * (H * N * (d + e) + Hkv * M * (d + e)) + (0 if fused else unfused_traffic),
        kernel_calls=1 if fused else 3,
    )


def _two_stage(n_tokens: Expr) -> CostFormula:
    """Tokens attend to K, V (n·M·(d+e)); queries attend to the tokens (N·n·(d+e)); agent and mediator share it."""
    small_scores = B * H * (n_tokens * M + N * n_tokens)
    return CostFormula(
        flops=2 * small_scores * (d + e),
        elementwise_ops=small_scores,
        bytes_moved=dtype_bytes * (
            B * (H * N * (d + e) + Hkv * M * (d + e))  # Q, K, V, O
            + 4 * small_scores  # both score matrices written, softmaxed in place of a copy, read
            + 2 * B * H * n_tokens * (d + e)  # the tokens and their values, written then read
        ),
        kernel_calls=6,  # per stage: scores matmul, softmax, values matmul
    )


def _pool_selection(n_tokens: Expr) -> CostFormula:
    """Agents as 1-D adaptive average pooling of Q: one pass over Q."""
    return CostFormula(
        flops=0,
        elementwise_ops=B * H * N * d,
        bytes_moved=dtype_bytes * B * H * (N + n_tokens) * d,
        kernel_calls=1,
    )


def _kmeans_selection(n_tokens: Expr, iterations: int) -> CostFormula:
    """Agents as k-means centroids of Q: per iteration, N·n·d distances, an argmin and a centroid sum."""
    return CostFormula(
        flops=2 * iterations * B * H * N * n_tokens * d,
        elementwise_ops=iterations * B * H * N * (n_tokens + d),
        bytes_moved=iterations * dtype_bytes * B * H * N * (n_tokens + 2 * d),
        kernel_calls=4 * iterations,
    )


def _agent(n_agents: Expr = n, selection: str = "pool", kmeans_iterations: int = 3, **cost_free_params: Any) -> CostFormula:
    """Agent attention: n agents selected from Q of this call ("pool" or "kmeans"), then two stages."""
    selections = {"pool": _pool_selection(n_agents), "kmeans": _kmeans_selection(n_agents, kmeans_iterations)}
    return _lookup(selections, selection, "agent selection") + _two_stage(n_agents)


def _mediator(n_mediators: Expr = n, **cost_free_params: Any) -> CostFormula:
    """Mediator attention: learned tokens (no selection cost), then the two-stage attention."""
    return _two_stage(n_mediators)


FEATURE_MAP_OPS: dict[str, int] = {"identity": 0, "relu": 1, "elu1": 2, "focused": 8}
"""Element ops per feature of φ: elu then +1; focused = relu, power, two norms, a ratio and a product."""


def _linear(feature_map: str = "elu1", **cost_free_params: Any) -> CostFormula:
    """Linear attention φ(Q)(φ(K)ᵀV) / φ(Q)·Σφ(K), computed through the d×e state per kv head."""
    feature_ops = _lookup(FEATURE_MAP_OPS, feature_map, "feature map")
    query_features, key_features = B * H * N * d, B * Hkv * M * d
    return CostFormula(
        # state φ(K)ᵀV per kv head, φ(Q)·state, and the normaliser φ(Q)·Σφ(K)
        flops=2 * (B * Hkv * M * d * e + B * H * N * d * e + query_features),
        # feature maps, the key sum Σφ(K), the division by the normaliser
        elementwise_ops=feature_ops * (query_features + key_features) + key_features + B * H * N * e,
        bytes_moved=dtype_bytes * (
            2 * (query_features + key_features)  # feature maps read and write
            + 2 * key_features + B * Hkv * M * e + B * Hkv * d * e  # state and key sum read φ(K), V
            + 2 * query_features + B * H * N * (1 + 3 * e)  # output and normaliser read φ(Q); divide
        ),
        kernel_calls=9,  # φ(Q), φ(K) two each (map, +1); state, key sum, output, normaliser, divide
    )


FORMULAS: dict[str, Callable[..., CostFormula]] = {
    "exact": _exact,
    "softmax": _exact,
    "agent": _agent,
    "mediator": _mediator,
    "linear": _linear,
}
"""Variant name → builder of its CostFormula from the variant's params.

"softmax" is the model's own attention, costed as exact. Builders ignore params that do not change
the cost (scale, agent_scale, power, normalization, eps), so a variant's full params can be passed.
"""


def _lookup(table: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in table:
        raise KeyError(f"unknown {what} {key!r}; expected one of {sorted(table)}")
    return table[key]


def formula(variant: str, **params: Any) -> CostFormula:
    """The symbolic cost of `variant` with `params` (e.g. n_agents=64; left out, n stays a symbol)."""
    return _lookup(FORMULAS, variant, "attention variant")(**params)


def _substitutions(shape: Mapping[str, int], dtype: torch.dtype) -> dict[sympy.Symbol, int]:
    """Symbol values for a shape dict; Hkv defaults to H, M to N and e to d."""
    values = {"Hkv": shape.get("H"), "M": shape.get("N"), "e": shape.get("d"), **shape}
    return {symbol: values[name] for name, symbol in SHAPE_SYMBOLS.items() if values.get(name) is not None} | {
        dtype_bytes: dtype.itemsize
    }


def _evaluate(expression: Expr, shape: Mapping[str, int], dtype: torch.dtype) -> int:
    value = sympy.sympify(expression).subs(_substitutions(shape, dtype))
    if value.free_symbols:
        raise ValueError(f"shape {dict(shape)} leaves {sorted(map(str, value.free_symbols))} unset")
    return int(value)


def flops(variant: str, shape: Mapping[str, int], **params: Any) -> int:
    """FLOPs (2 per multiply-add of the matmuls) of one call of `variant` at `shape` {B,H,Hkv,N,M,d,e}."""
    return _evaluate(formula(variant, **params).flops, shape, torch.float32)


def bytes_moved(variant: str, shape: Mapping[str, int], dtype: torch.dtype = torch.float32, **params: Any) -> int:
    """Bytes read and written by one call of `variant` at `shape` with tensors of `dtype`."""
    return _evaluate(formula(variant, **params).bytes_moved, shape, dtype)


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """The rates a roofline needs, for one device, thread count and dtype."""

    name: str
    matmul_flops_per_s: float
    bandwidth_bytes_per_s: float
    elementwise_ops_per_s: float
    call_overhead_s: float


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _best_seconds(run: Callable[[], object], device: torch.device, repeats: int = 15) -> float:
    """Fastest of `repeats` timed runs after one warm-up: on a shared machine the fastest is the least disturbed."""
    def synchronize() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    run()
    synchronize()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        timings.append(time.perf_counter() - start)
    return min(timings)


def measure_device(device: torch.device, dtype: torch.dtype = torch.float32) -> DeviceProfile:
    """Measure the roofline rates of `device` in well under two seconds.

    Matmul rate: a 1024³ matmul. Bandwidth: a 64 MiB copy (read + write). Element-wise rate: exp
    over 256 Ki elements. Per-call overhead: 200 calls of a one-element add.
    """
    size = 1024
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    source = torch.empty(16 * 2**20, device=device)
    target = torch.empty_like(source)
    small = torch.randn(2**18, device=device).to(dtype)
    small_out = torch.empty_like(small)
    one = torch.zeros(1, device=device)

    def many_calls() -> None:
        for _ in range(200):
            torch.add(one, one)

    return DeviceProfile(
        name=_device_name(device),
        matmul_flops_per_s=2 * size**3 / _best_seconds(lambda: a @ b, device),
        bandwidth_bytes_per_s=2 * source.nbytes / _best_seconds(lambda: target.copy_(source), device),
        elementwise_ops_per_s=small.numel() / _best_seconds(lambda: torch.exp(small, out=small_out), device),
        call_overhead_s=_best_seconds(many_calls, device) / 200,
    )


def cache_path(device: torch.device, dtype: torch.dtype = torch.float32) -> Path:
    """JSON file of `device`'s profile: $ATTNOPT_CACHE_DIR (default ~/.cache/attnopt)/device-<hash>.json.

    The hash covers the device model, torch's thread count and the dtype, since all three change
    the rates.
    """
    folder = Path(os.environ.get("ATTNOPT_CACHE_DIR") or Path.home() / ".cache" / "attnopt")
    key = f"{_device_name(device)}|{device.type}|threads={torch.get_num_threads()}|{dtype}"
    return folder / f"device-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def device_profile(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DeviceProfile:
    """The cached profile of `device`, measured (and cached) when missing or unreadable."""
    device = torch.device(device)
    path = cache_path(device, dtype)
    try:
        return DeviceProfile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        profile = measure_device(device, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(profile), indent=2))
        return profile


def _resolve_profile(device: DeviceProfile | torch.device | str | None, dtype: torch.dtype) -> DeviceProfile:
    if isinstance(device, DeviceProfile):
        return device
    return device_profile(device or "cpu", dtype)


def _roofline_terms(
    cost: CostFormula, profile: DeviceProfile
) -> tuple[Expr, Expr, Expr]:
    """(compute seconds, memory seconds, overhead seconds): plain numbers or sympy expressions."""
    compute = cost.flops / profile.matmul_flops_per_s + cost.elementwise_ops / profile.elementwise_ops_per_s
    return compute, cost.bytes_moved / profile.bandwidth_bytes_per_s, cost.kernel_calls * profile.call_overhead_s


def roofline_seconds(
    flops: float,
    bytes_moved: float = 0,
    *,
    elementwise_ops: float = 0,
    kernel_calls: float = 0,
    device: DeviceProfile | torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Roofline time of the given work on `device` (a DeviceProfile, a device, or None for the CPU)."""
    cost = CostFormula(flops, elementwise_ops, bytes_moved, kernel_calls)
    compute, memory, overhead = _roofline_terms(cost, _resolve_profile(device, dtype))
    return float(max(compute, memory) + overhead)


def estimate_seconds(
    variant: str,
    shape: Mapping[str, int],
    device: DeviceProfile | torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **params: Any,
) -> float:
    """Predicted seconds of one call of `variant` at `shape` on `device` (None: this machine's CPU)."""
    cost = formula(variant, **params)
    values = [_evaluate(term, shape, dtype) for term in dataclasses.astuple(cost)]
    return roofline_seconds(
        values[0], values[2], elementwise_ops=values[1], kernel_calls=values[3], device=device, dtype=dtype
    )


def count_flops(run: Callable[..., object], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs FlopCounterMode counts while `run(*args, **kwargs)` executes (e.g. a whole forward)."""
    with FlopCounterMode(display=False) as counter:
        run(*args, **kwargs)
    return counter.get_total_flops()


def break_even_length(
    variant: str,
    shape: Mapping[str, int],
    device: DeviceProfile | torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **params: Any,
) -> int | None:
    """Smallest N (with M = N) from which `variant` is predicted faster than fused exact attention.

    `shape` supplies B, H, Hkv, d, e (its N and M are ignored). Each roofline time is the larger of
    two polynomials in N plus a constant, so the difference of the two times can only change sign
    where two of those four polynomials cross; sympy finds those roots, and the sign on each
    interval between them decides. None when the variant never becomes (and stays) faster.
    """
    profile = _resolve_profile(device, dtype)
    fixed = {symbol: value for symbol, value in _substitutions(shape, dtype).items() if symbol not in (N, M)}

    def pieces(name: str, variant_params: Mapping[str, Any]) -> list[sympy.Expr]:
        compute, memory, overhead = _roofline_terms(formula(name, **variant_params), profile)
        return [sympy.sympify(term + overhead).subs(fixed).subs(M, N) for term in (compute, memory)]

    exact_pieces, variant_pieces = pieces("exact", {}), pieces(variant, params)

    def variant_faster(length: float) -> bool:
        def time(parts: list[sympy.Expr]) -> float:
            return max(float(part.subs(N, length)) for part in parts)

        return time(variant_pieces) < time(exact_pieces)

    crossings = sorted(
        {
            float(root.as_real_imag()[0])
            for first, second in itertools.combinations(exact_pieces + variant_pieces, 2)
            if (difference := sympy.Poly(sympy.expand(first - second), N)).degree() > 0
            for root in difference.nroots()
            if abs(root.as_real_imag()[1]) < 1e-9 and root.as_real_imag()[0] > 0
        }
    )
    bounds = [0.0, *crossings]
    # walk the intervals from the last (unbounded) one down while the variant stays faster
    threshold = None
    for low, high in reversed(list(zip(bounds, [*crossings, 2 * bounds[-1] + 2]))):
        if not variant_faster((low + high) / 2):
            break
        threshold = low
    if threshold is None:
        return None
    length = max(1, math.ceil(threshold))
    return length if variant_faster(length) else length + 1
