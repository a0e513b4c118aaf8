"""Template of the linear-attention Triton kernels: key state, then outputs, feature map fused.

Two kernels per module. `linear_state_kernel` reduces one split of the keys of one (batch, kv
head) to partial sums S = Σ φ(k)ᵀv (d×e), z = Σ φ(k) and, for InLine, Σ v and the key count.
Non-causal: the launcher adds the splits up. Causal: a split is one chunk of BLOCK_M keys and the
launcher turns the chunk sums into exclusive prefix sums. `linear_output_kernel` then gives
BLOCK_M queries φ(q)·S / (φ(q)·z + eps) (sum) or φ(q)·S + (1 − φ(q)·z)·Σv / count (InLine,
which is Σ_j (φ(q)·φ(k_j) − mean + 1/count) v_j rearranged), adding the causal part of its own
chunk quadratically. Feature map, normalisation, causality, key mask, head dims, dtype and tiles
and feature scale are written into the text.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from string import Template

from .linear_reference import FEATURE_MAPS, NORMALIZATIONS
from .template_parts import DTYPES, MODULE_HEADER, block_width, check_choice, fp32_dot_precision


@dataclass(frozen=True)
class LinearKernelConfig:
    """Specialisation of the linear-attention module (see attnopt.kernels.source).

    Causal modules use block_m for both query tiles and key chunks. feature_scale s multiplies
    each loaded q and k tile before φ (a literal in the text; s = 1 writes nothing).
    """

    head_dim: int
    value_dim: int
    dtype: str = "float16"
    feature_map: str = "elu1"
    power: float = 3.0
    normalization: str = "sum"
    causal: bool = False
    key_mask: bool = False
    block_m: int = 64
    block_n: int = 64
    feature_scale: float = 1.0


_FEATURE_MAP_BODIES = {
    "elu1": "    return tl.where(x > 0, x + 1.0, tl.exp(x))",
    "relu": "    return tl.maximum(x, 0.0)",
    "identity": "    return x",
    "focused": """    y = tl.maximum(x, 0.0)
    y_pow = $power_expr
    norm_y = tl.sqrt(tl.sum(y * y, 1))
    norm_pow = tl.sqrt(tl.sum(y_pow * y_pow, 1))
    # rows with y == 0 have both norms 0: their features are 0
    ratio = tl.where(norm_pow > 0, norm_y / tl.maximum(norm_pow, 1e-30), 0.0)
    return y_pow * ratio[:, None]""",
}

_FEATURE_MAP = Template('''
@triton.jit
def feature_map(x):
    """φ = $name on fp32 rows of features (head dim along axis 1)."""
$body
''')

_STATE_KERNEL = Template('''
@triton.jit
def linear_state_kernel(
    K, V, KeyMask, State, KeySum, ValueSum, Count,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_mb, stride_mn,
    n_kv_heads, n_keys, keys_per_split,
):
    """Sums over keys [split·keys_per_split, +keys_per_split) of one (batch, kv head)."""
    split = tl.program_id(0)
    batch = tl.program_id(1) // n_kv_heads
    kv_head = tl.program_id(1) % n_kv_heads
    offs_d = tl.arange(0, $d_pad)
    offs_e = tl.arange(0, $e_pad)
    state = tl.zeros([$d_pad, $e_pad], tl.float32)
    key_sum = tl.zeros([$d_pad], tl.float32)
$inline_state_init    start = split * keys_per_split
    stop = tl.minimum(n_keys, start + keys_per_split)
    for start_n in range(start, stop, $block_n):
        offs_n = start_n + tl.arange(0, $block_n)
        key_ok = offs_n < stop
$key_mask_load        k = tl.load(
            K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=key_ok[:, None]$d_load_mask, other=0.0,
        )
        features = tl.where(key_ok[:, None]$d_keep, feature_map(k.to(tl.float32)$feature_scale), 0.0)
        v = tl.load(
            V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_e[None, :] * stride_ve,
            mask=key_ok[:, None]$e_load_mask, other=0.0,
        ).to(tl.float32)
        state += tl.dot(tl.trans(features), v$precision)
        key_sum += tl.sum(features, 0)
$inline_state_update    row = split * tl.num_programs(1) + tl.program_id(1)
    tl.store(
        State + row * $state_size + offs_d[:, None] * $value_dim + offs_e[None, :],
        state,
        mask=(offs_d[:, None] < $head_dim) & (offs_e[None, :] < $value_dim),
    )
    tl.store(KeySum + row * $head_dim + offs_d, key_sum, mask=offs_d < $head_dim)
$inline_state_store''')

_INLINE_STATE_INIT = '''    value_sum = tl.zeros([$e_pad], tl.float32)
    count = tl.zeros([$block_n], tl.float32)
'''
_INLINE_STATE_UPDATE = '''        value_sum += tl.sum(v, 0)
        count += key_ok.to(tl.float32)
'''
_INLINE_STATE_STORE = '''    tl.store(ValueSum + row * $value_dim + offs_e, value_sum, mask=offs_e < $value_dim)
    tl.store(Count + row, tl.sum(count, 0))
'''
_KEY_MASK_LOAD = '''        valid = tl.load(KeyMask + batch * stride_mb + offs_n * stride_mn, mask=key_ok, other=0)
        key_ok = key_ok & (valid != 0)
'''

_OUTPUT_KERNEL = Template('''
@triton.jit
def linear_output_kernel(
    Q, K, V, KeyMask, State, KeySum, ValueSum, Count, Out,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_on, stride_oe,
    n_heads, kv_group, n_queries, n_state_rows, eps,
):
    """$summary"""
    query_block = tl.program_id(0)
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    kv_head = head // kv_group
    row = $state_split * n_state_rows + batch * (n_heads // kv_group) + kv_head
    offs_m = query_block * $block_m + tl.arange(0, $block_m)
    offs_d = tl.arange(0, $d_pad)
    offs_e = tl.arange(0, $e_pad)
    query_ok = offs_m < n_queries
    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=query_ok[:, None]$d_load_mask, other=0.0,
    )
    features = feature_map(q.to(tl.float32)$feature_scale)$d_zero
    state = tl.load(
        State + row * $state_size + offs_d[:, None] * $value_dim + offs_e[None, :],
        mask=(offs_d[:, None] < $head_dim) & (offs_e[None, :] < $value_dim), other=0.0,
    )
    key_sum = tl.load(KeySum + row * $head_dim + offs_d, mask=offs_d < $head_dim, other=0.0)
    numer = tl.dot(features, state$precision)
    denom = tl.sum(features * key_sum[None, :], 1)
$inline_load$causal_chunk$finish    tl.store(
        Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_e[None, :] * stride_oe,
        out.to(Out.dtype.element_ty),
        mask=query_ok[:, None]$e_load_mask,
    )
''')

_VALUE_SUM_LOAD = '''    value_sum = tl.load(ValueSum + row * $value_dim + offs_e, mask=offs_e < $value_dim, other=0.0)
    value_sum = value_sum[None, :]
'''
_INLINE_LOAD_FLAT = _VALUE_SUM_LOAD + '''    count = tl.load(Count + row)
'''
_INLINE_LOAD_ROWS = _VALUE_SUM_LOAD + '''    count = tl.load(Count + row) + tl.zeros([$block_m], tl.float32)
'''
# the keys of this query tile's own chunk (same positions, N == M), seen causally
_CAUSAL_CHUNK = '''    offs_n = offs_m
    key_ok = query_ok
$key_mask_load    k = tl.load(
        K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=key_ok[:, None]$d_load_mask, other=0.0,
    )
    key_features = tl.where(key_ok[:, None]$d_keep, feature_map(k.to(tl.float32)$feature_scale), 0.0)
    v = tl.load(
        V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_e[None, :] * stride_ve,
        mask=key_ok[:, None]$e_load_mask, other=0.0,
    ).to(tl.float32)
    seen = (offs_n[None, :] <= offs_m[:, None]) & key_ok[None, :]
    weights = tl.where(seen, tl.dot(features, tl.trans(key_features)$precision), 0.0)
    numer += tl.dot(weights, v$precision)
    denom += tl.sum(weights, 1)
$inline_chunk'''
_INLINE_CHUNK = '''    seen_f32 = seen.to(tl.float32)
    value_sum += tl.dot(seen_f32, v$precision)
    count += tl.sum(seen_f32, 1)
'''
_FINISH_SUM = '''    out = numer / (denom[:, None] + eps)
'''
# count is a whole number; where it is 0, value_sum is 0 too and so is the correction
_FINISH_INLINE = '''    mean_value = value_sum / tl.maximum($count, 1.0)
    out = numer + (1.0 - denom)[:, None] * mean_value
'''


def _power_expr(power: float) -> str:
    """y**power as multiplications for small whole powers, else exp2(power·log2 y) (0 at y = 0)."""
    if float(power).is_integer() and 1 <= power <= 8:
        return " * ".join(["y"] * int(power))
    return f"tl.where(y > 0, tl.exp2({float(power)!r} * tl.log2(tl.maximum(y, 1e-30))), 0.0)"


def render_linear_module(config: LinearKernelConfig) -> str:
    """Module text holding `feature_map`, `linear_state_kernel` and `linear_output_kernel`."""
    check_choice("dtype", config.dtype, DTYPES)
    check_choice("feature_map", config.feature_map, FEATURE_MAPS)
    check_choice("normalization", config.normalization, NORMALIZATIONS)
    if not math.isfinite(config.feature_scale):
        raise ValueError(f"feature_scale must be finite; got {config.feature_scale!r}")
    inline = config.normalization == "inline"
    d_pad, e_pad = block_width(config.head_dim), block_width(config.value_dim)
    d_padded, e_padded = d_pad != config.head_dim, e_pad != config.value_dim
    fields = dict(
        d_pad=d_pad,
        e_pad=e_pad,
        head_dim=config.head_dim,
        value_dim=config.value_dim,
        state_size=config.head_dim * config.value_dim,
        block_m=config.block_m,
        block_n=config.block_m if config.causal else config.block_n,
        d_load_mask=f" & (offs_d[None, :] < {config.head_dim})" if d_padded else "",
        e_load_mask=f" & (offs_e[None, :] < {config.value_dim})" if e_padded else "",
        # φ of a zero padding column need not be 0 (elu1 gives 1): padded columns are zeroed
        d_keep=f" & (offs_d[None, :] < {config.head_dim})" if d_padded else "",
        precision=fp32_dot_precision(config.dtype),
        count="count[:, None]" if config.causal else "count",
        feature_scale="" if config.feature_scale == 1 else f" * {float(config.feature_scale)!r}",
    )
    key_mask_load = _KEY_MASK_LOAD if config.key_mask else ""
    body = Template(_FEATURE_MAP_BODIES[config.feature_map]).substitute(power_expr=_power_expr(config.power))
    feature_map = _FEATURE_MAP.substitute(name=config.feature_map, body=body)
    state_kernel = _STATE_KERNEL.substitute(
        fields,
        inline_state_init=Template(_INLINE_STATE_INIT).substitute(fields) if inline else "",
        inline_state_update=_INLINE_STATE_UPDATE if inline else "",
        inline_state_store=Template(_INLINE_STATE_STORE).substitute(fields) if inline else "",
        key_mask_load=key_mask_load,
    )
    causal_chunk = ""
    if config.causal:
        causal_chunk = Template(_CAUSAL_CHUNK).substitute(
            fields,
            key_mask_load=textwrap.indent(textwrap.dedent(key_mask_load), "    "),
            inline_chunk=Template(_INLINE_CHUNK).substitute(fields) if inline else "",
        )
    inline_load = ""
    if inline:
        inline_load = Template(_INLINE_LOAD_ROWS if config.causal else _INLINE_LOAD_FLAT).substitute(fields)
    finish = Template(_FINISH_INLINE).substitute(fields) if inline else _FINISH_SUM
    summary = (
        f"{config.normalization}-normalised {'causal ' if config.causal else ''}linear attention "
        f"for BLOCK_M queries of one (batch, head)."
    )
    output_kernel = _OUTPUT_KERNEL.substitute(
        fields,
        summary=summary,
        state_split="query_block" if config.causal else "0",
        d_zero=f"\n    features = tl.where(offs_d[None, :] < {config.head_dim}, features, 0.0)" if d_padded else "",
        inline_load=inline_load,
        causal_chunk=causal_chunk,
        finish=finish,
    )
    return MODULE_HEADER + feature_map + state_kernel + output_kernel
