"""Template of the softmax-attention Triton kernel, specialised into exact and agent attention.

One FlashAttention-2 style forward: a program owns BLOCK_M queries of one (batch, head), streams
the keys in BLOCK_N tiles and keeps an online softmax (running max, running sum, fp32
accumulator) in the exp2 domain. Everything that can be decided before launch is written into
the text instead of being tested at run time: head dims and their padding, causality, the mask
kind and which of its dims broadcast, the dtype of the matmul operands, block sizes.

Scores are in log2 units (scale·log2(e) folded into one multiply, then exp2) unless the kernel
adds a float mask or fills scores: those values may lie near the fp32 range (finfo.min), where
×log2(e) would overflow to -inf and turn a finite fill into a masked key, so such kernels keep
natural units and exp2 takes (score − max)·log2(e), which cannot overflow to a wrong value.
The exact kernel can also replace scores by a fill value where a bool fill mask is set, round
scores and mask sum to the dtype the original added them in, and give 0 for rows with no
visible key; and it computes the two score transforms of exact_attention_reference: logit
softcapping (softcap·tanh(s / softcap) on the scaled scores, before fills and masks; tanh from
tl.exp, see softcap_tanh) and attention sinks (one logit per row folded into the running max and
sum after the key loop, so it weighs in the normaliser and not in the accumulator).

Agent attention is two such kernels in one module. Stage 1 (agents over keys, per-key mask) has
few query rows and many keys, so it also splits the keys across programs (split-K, as in
flash-decoding): each writes its unnormalised accumulator with its running max and sum, and the
launcher merges the splits. Stage 2 (queries over agents) uses a key tile covering every agent,
so it is a single pass; an agent bias enters it as an additive mask broadcast over the queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Template

from .template_parts import DTYPES, MODULE_HEADER, block_width, check_choice, dot_precision, triton_dtype

MASK_KINDS = ("none", "bool", "additive")


@dataclass(frozen=True)
class SoftmaxKernelSpec:
    """What one generated softmax-attention kernel is specialised on."""

    name: str
    head_dim: int
    value_dim: int
    dot_dtype: str
    causal: bool
    mask: str
    mask_broadcast: tuple[bool, bool, bool, bool]
    block_m: int
    block_n: int
    split_keys: bool = False
    fill: bool = False
    fill_broadcast: tuple[bool, bool, bool, bool] = (False, False, False, False)
    mask_sum_dtype: str = "float32"
    zero_empty_rows: bool = False
    softcap: bool = False
    sinks: bool = False
    sinks_broadcast: tuple[bool, bool, bool, bool] = (False, False, False, True)

    @property
    def natural_units(self) -> bool:
        return scores_in_natural_units(self.mask, self.fill)


def scores_in_natural_units(mask: str, fill: bool = False) -> bool:
    """Whether a kernel keeps its scores (and a split's stored row max) in natural-log units:
    with a float mask or a fill; otherwise log2 units."""
    return mask == "additive" or fill


_KERNEL = Template('''
@triton.jit
def $name(
    Q, K, V, Out, Mask,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_ob, stride_oh, stride_on, stride_oe,
    stride_mb, stride_mh, stride_mn, stride_mk,
    n_heads, kv_group, n_queries, n_keys, scale,$fill_params$softcap_params$sink_params$split_params
):
    """$summary"""
    query_block = tl.program_id(0)
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    kv_head = head // kv_group
    offs_m = query_block * $block_m + tl.arange(0, $block_m)
    offs_d = tl.arange(0, $d_pad)
    offs_e = tl.arange(0, $e_pad)
    query_ok = offs_m < n_queries
    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=query_ok[:, None]$d_load_mask, other=0.0,
    )
    row_max = tl.full([$block_m], float("-inf"), tl.float32)
    row_sum = tl.zeros([$block_m], tl.float32)
    acc = tl.zeros([$block_m, $e_pad], tl.float32)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
$score_scale
$mask_setup$fill_setup$key_range
    for start_n in range(key_start, key_limit, $block_n):
        offs_n = start_n + tl.arange(0, $block_n)
        key_ok = offs_n < n_keys
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=key_ok[:, None]$d_load_mask, other=0.0,
        )
        scores = tl.dot(q, tl.trans(k)$precision) * score_scale
$apply_softcap        visible = query_ok[:, None] & key_ok[None, :]$causal_visible
$apply_fill$apply_mask        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # rows with no visible key yet keep max -inf; shift by 0 so exp2 gives 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2($rescale_exponent)
        probs = tl.exp2($probs_exponent)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_e[None, :] * stride_ve,
            mask=key_ok[:, None]$e_load_mask, other=0.0,
        )
        acc = acc * rescale[:, None] + tl.dot(probs.to($dot_dtype), v.to($dot_dtype)$precision)
        row_max = new_max
$finish''')

_FINISH = '''$sink_fold$empty_rows
    tl.store(
        Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_e[None, :] * stride_oe,
        out.to(Out.dtype.element_ty),
        mask=query_ok[:, None]$e_load_mask,
    )
'''

# a row whose keys are all masked has a running sum of 0
_EMPTY_ROWS_NAN = """    # 0 / 0 where every key is masked: NaN, as torch.softmax gives
    out = acc / row_sum[:, None]"""
_EMPTY_ROWS_ZERO = """    # 0 where every key is masked, as SDPA gives (a NaN sum: NaN or +inf scores or sink, stays NaN)
    out = tl.where(row_sum[:, None] == 0, 0.0, acc / row_sum[:, None])"""

# split-K: keep this split's accumulator, max (in the kernel's units) and sum for the launcher to merge
_FINISH_SPLIT = '''    split_row = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * n_queries + offs_m
    tl.store(RowMax + split_row, row_max, mask=query_ok)
    tl.store(RowSum + split_row, row_sum, mask=query_ok)
    tl.store(
        Out + tl.program_id(2) * stride_os + batch * stride_ob + head * stride_oh
        + offs_m[:, None] * stride_on + offs_e[None, :] * stride_oe,
        acc,
        mask=query_ok[:, None]$e_load_mask,
    )
'''

_LOG2_E = "1.4426950408889634"
_LN_2 = "0.6931471805599453"

# The attention sink (one logit per row, natural units) folded into the finished online softmax:
# it joins the running max and adds exp(sink - max) to the sum, nothing to the accumulator.
# Done in natural units (the row max converted down, not the sink up: ×log2(e) could overflow a
# finite sink); a row whose keys are all masked has max -inf, sum 0, accumulator 0, so it ends
# with sum 1 (output 0) for a finite sink, sum 0 for a -inf sink (NaN, or 0 with empty rows as 0)
# and a NaN sum for a +inf or NaN sink (NaN), as torch.softmax over [scores, sink] gives.
_SINK_FOLD = """    # attention sink: in the normaliser only
$sink_setup    sink = tl.load(sink_base + sink_rows, mask=query_ok, other=float("-inf")).to(tl.float32)
    kept_max = row_max$to_natural
    final_max = tl.maximum(kept_max, sink)
    final_shift = tl.where(final_max == float("-inf"), 0.0, final_max)
    kept_scale = tl.exp2((kept_max - final_shift) * $log2_e)
    row_sum = row_sum * kept_scale + tl.exp2((sink - final_shift) * $log2_e)
    acc = acc * kept_scale[:, None]
"""

# tanh for logit softcapping, from tl.exp and arithmetic only: libdevice's tanh is an extern
# call, which Triton's interpreter cannot run. Below 0.55, x·P(x²) with P a relative-error
# minimax fit of tanh(x)/x on [0, 0.55] (degree 5 in x²); above, 1 − 2/(e^{2|x|} + 1), which
# has no cancellation there and saturates to ±1 (e^{2|x|} = inf gives exactly 1). Measured in
# fp32 with a correctly rounded exp (numpy's, as the interpreter uses) against fp64 tanh on
# 2.2M points of [−12, 12] and [1e-30, 20]: within 1.2 ulp below 0.55, 1.8 ulp above; NaN
# stays NaN. On NVIDIA GPUs tl.exp is ex2.approx (about 2 ulp), which adds up to about 1.5 ulp
# near 0.55 and less above (libdevice's tanhf is documented to 2 ulp).
_SOFTCAP_TANH = '''
@triton.jit
def softcap_tanh(x):
    """tanh(x) in fp32 to about 2 ulp (see attnopt.kernels.softmax_template)."""
    magnitude = tl.abs(x)
    x2 = x * x
    poly = -0.006235731299966574
    poly = poly * x2 + 0.021039819344878197
    poly = poly * x2 - 0.05384274944663048
    poly = poly * x2 + 0.13332460820674896
    poly = poly * x2 - 0.3333331048488617
    poly = poly * x2 + 1.0
    saturating = 1.0 - 2.0 / (tl.exp(2.0 * magnitude) + 1.0)
    return tl.where(magnitude < 0.55, x * poly, tl.where(x < 0, -saturating, saturating))
'''


def _tile_setup(pointer: str, prefix: str, stride: str, broadcast: tuple[bool, ...], block_m: int) -> str:
    """Base pointer and row offsets of a (B|1, H|1, N|1, M|1) tensor read beside each score tile;
    dims it broadcasts over (size 1) are left out of the address arithmetic."""
    batch_b, head_b, row_b, _ = broadcast
    base = [pointer] + ([f"batch * {stride}b"] if not batch_b else []) + ([f"head * {stride}h"] if not head_b else [])
    rows = f"tl.zeros([{block_m}], tl.int32)" if row_b else f"offs_m * {stride}n"
    return f"    {prefix}_base = {' + '.join(base)}\n    {prefix}_rows = {rows}\n"


def _tile_load(name: str, prefix: str, stride: str, broadcast: tuple[bool, ...], block_n: int, other: str) -> str:
    """Per key tile: load `name` from the tensor set up by _tile_setup."""
    cols = f"tl.zeros([{block_n}], tl.int32)" if broadcast[3] else f"offs_n * {stride}k"
    return (
        f"        {prefix}_cols = {cols}\n"
        f"        {name} = tl.load({prefix}_base + {prefix}_rows[:, None] + {prefix}_cols[None, :], "
        f"mask=query_ok[:, None] & key_ok[None, :], other={other})\n"
    )


# Rounding an fp32 tile to the dtype a half mask is added in (nearest, ties to even, as torch);
# the result stays fp32. bfloat16 is rounded by its bits: Triton's interpreter truncates a bf16 cast.
_ROUND_TO_SUM_DTYPE = {
    "float16": '''
@triton.jit
def round_to_sum_dtype(x):
    """x rounded to float16, kept in fp32."""
    return x.to(tl.float16).to(tl.float32)
''',
    "bfloat16": '''
@triton.jit
def round_to_sum_dtype(x):
    """x rounded to bfloat16 (add half an ulp, and the kept bit for ties to even; drop 16 bits), kept in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
''',
}


def _add_bias(spec: SoftmaxKernelSpec) -> str:
    """scores + bias in natural units; with a half mask_sum_dtype the scores and the sum are
    rounded to it, as torch adds a half mask to half scores (the fp32 sum of two half values,
    rounded to half, is their correctly rounded half sum)."""
    if spec.mask_sum_dtype == "float32":
        return "        scores = scores + bias.to(tl.float32)\n"
    return "        scores = round_to_sum_dtype(round_to_sum_dtype(scores) + bias.to(tl.float32))\n"


def _mask_apply(spec: SoftmaxKernelSpec) -> str:
    """Per key tile: load the mask tile and apply it (bool: hide keys; additive: add to scores)."""
    if spec.mask == "none":
        return ""
    if spec.mask == "bool":
        load = _tile_load("allowed", "mask", "stride_m", spec.mask_broadcast, spec.block_n, "0")
        return load + "        visible = visible & (allowed != 0)\n"
    return _tile_load("bias", "mask", "stride_m", spec.mask_broadcast, spec.block_n, "0.0") + _add_bias(spec)


def _fill_apply(spec: SoftmaxKernelSpec) -> str:
    """Per key tile: replace the scores where the fill mask is set by fill_value."""
    if not spec.fill:
        return ""
    load = _tile_load("filled", "fill", "stride_f", spec.fill_broadcast, spec.block_n, "0")
    return load + "        scores = tl.where(filled != 0, fill_value, scores)\n"


def _exponent(difference: str, spec: SoftmaxKernelSpec) -> str:
    """Argument of exp2 for a score difference in the kernel's units."""
    return f"({difference}) * {_LOG2_E}" if spec.natural_units else difference


def _score_scale(spec: SoftmaxKernelSpec) -> str:
    """Factor of q kᵀ giving the scores in the kernel's units; with softcapping, the argument of
    tanh (scale / softcap), and the factor `cap` of tanh's result (softcap, in the kernel's units)."""
    to_log2 = "" if spec.natural_units else f" * {_LOG2_E}"
    if not spec.softcap:
        return f"    score_scale = scale{to_log2}"
    return (
        "    # logit softcapping: softcap·tanh(scale·q kᵀ / softcap)\n"
        f"    score_scale = scale / softcap\n    cap = softcap{to_log2}"
    )


def _sink_fold(spec: SoftmaxKernelSpec) -> str:
    """After the key loop: fold the row's attention sink into max and sum (see _SINK_FOLD)."""
    if not spec.sinks:
        return ""
    return Template(_SINK_FOLD).substitute(
        sink_setup=_tile_setup("Sinks", "sink", "stride_s", spec.sinks_broadcast, spec.block_m),
        to_natural="" if spec.natural_units else f" * {_LN_2}",
        log2_e=_LOG2_E,
    )


def render_softmax_kernel(spec: SoftmaxKernelSpec, summary: str) -> str:
    """Text of one @triton.jit softmax-attention kernel specialised on `spec`."""
    check_choice("mask", spec.mask, MASK_KINDS)
    d_pad, e_pad = block_width(spec.head_dim), block_width(spec.value_dim)
    check_choice("mask_sum_dtype", spec.mask_sum_dtype, DTYPES)
    if spec.split_keys and (spec.causal or spec.zero_empty_rows or spec.sinks):
        raise ValueError("split_keys kernels are not causal and leave empty rows and sinks to the merge")
    if spec.split_keys:
        key_range = (
            "    key_start = tl.program_id(2) * keys_per_split\n"
            "    key_limit = tl.minimum(n_keys, key_start + keys_per_split)"
        )
    elif spec.causal:
        key_range = f"    key_start = 0\n    key_limit = tl.minimum(n_keys, (query_block + 1) * {spec.block_m})"
    else:
        key_range = "    key_start = 0\n    key_limit = n_keys"
    e_load_mask = "" if e_pad == spec.value_dim else f" & (offs_e[None, :] < {spec.value_dim})"
    return _KERNEL.substitute(
        name=spec.name,
        summary=summary,
        block_m=spec.block_m,
        block_n=spec.block_n,
        d_pad=d_pad,
        e_pad=e_pad,
        d_load_mask="" if d_pad == spec.head_dim else f" & (offs_d[None, :] < {spec.head_dim})",
        e_load_mask=e_load_mask,
        key_range=key_range,
        split_params="\n    RowMax, RowSum, stride_os, keys_per_split," if spec.split_keys else "",
        fill_params="\n    FillMask, stride_fb, stride_fh, stride_fn, stride_fk, fill_value," if spec.fill else "",
        softcap_params="\n    softcap," if spec.softcap else "",
        sink_params="\n    Sinks, stride_sb, stride_sh, stride_sn," if spec.sinks else "",
        finish=Template(_FINISH_SPLIT if spec.split_keys else _FINISH).substitute(
            e_load_mask=e_load_mask,
            empty_rows=_EMPTY_ROWS_ZERO if spec.zero_empty_rows else _EMPTY_ROWS_NAN,
            sink_fold=_sink_fold(spec),
        ),
        score_scale=_score_scale(spec),
        apply_softcap="        scores = softcap_tanh(scores) * cap\n" if spec.softcap else "",
        rescale_exponent=_exponent("row_max - shift", spec),
        probs_exponent=_exponent("scores - shift[:, None]", spec),
        causal_visible=" & (offs_n[None, :] <= offs_m[:, None])" if spec.causal else "",
        mask_setup="" if spec.mask == "none" else _tile_setup("Mask", "mask", "stride_m", spec.mask_broadcast, spec.block_m),
        fill_setup=_tile_setup("FillMask", "fill", "stride_f", spec.fill_broadcast, spec.block_m) if spec.fill else "",
        apply_mask=_mask_apply(spec),
        apply_fill=_fill_apply(spec),
        dot_dtype=triton_dtype(spec.dot_dtype),
        precision=dot_precision(spec.dot_dtype),
    )


@dataclass(frozen=True)
class ExactKernelConfig:
    """Specialisation of the exact-attention module (see attnopt.kernels.source).

    fill: scores where a bool fill mask (broadcast dims `fill_broadcast`) is set are replaced by
    the kernel's fill_value argument. mask_sum_dtype: the dtype an additive mask is added in
    ("float16"/"bfloat16" round scores and sum to it, "float32" does not). zero_empty_rows: rows
    with no visible key give 0 instead of NaN. softcap: the scaled scores are capped to
    softcap·tanh(s / softcap) (before fills and masks), softcap being the kernel's `softcap`
    argument (one kernel for every value). sinks: the kernel's `Sinks` tensor, broadcast from
    (B|1, H|1, N|1, 1) (broadcast dims `sinks_broadcast`), holds one logit per row that joins the
    softmax's normaliser only (attention sinks).
    """

    head_dim: int
    value_dim: int
    dtype: str = "float16"
    causal: bool = False
    mask: str = "none"
    mask_broadcast: tuple[bool, bool, bool, bool] = (False, False, False, False)
    block_m: int = 64
    block_n: int = 64
    fill: bool = False
    fill_broadcast: tuple[bool, bool, bool, bool] = (False, False, False, False)
    mask_sum_dtype: str = "float32"
    zero_empty_rows: bool = False
    softcap: bool = False
    sinks: bool = False
    sinks_broadcast: tuple[bool, bool, bool, bool] = (False, False, False, True)


def render_exact_module(config: ExactKernelConfig) -> str:
    """Module text holding `exact_attention_kernel`."""
    check_choice("dtype", config.dtype, DTYPES)
    spec = SoftmaxKernelSpec(
        name="exact_attention_kernel",
        head_dim=config.head_dim,
        value_dim=config.value_dim,
        dot_dtype=config.dtype,
        causal=config.causal,
        mask=config.mask,
        mask_broadcast=tuple(config.mask_broadcast),
        block_m=config.block_m,
        block_n=config.block_n,
        fill=config.fill,
        fill_broadcast=tuple(config.fill_broadcast),
        mask_sum_dtype=config.mask_sum_dtype,
        zero_empty_rows=config.zero_empty_rows,
        softcap=config.softcap,
        sinks=config.sinks,
        sinks_broadcast=tuple(config.sinks_broadcast),
    )
    scores = "cap(q kᵀ·scale)" if config.softcap else "q kᵀ·scale"
    fill = f"where(fill_mask, fill_value, {scores})" if config.fill else scores
    sink = ", a sink logit per row in the normaliser," if config.sinks else ""
    summary = f"softmax({fill} + mask){sink} v for BLOCK_M queries of one (batch, head)."
    rounding = _ROUND_TO_SUM_DTYPE.get(config.mask_sum_dtype, "") if config.mask == "additive" else ""
    tanh = _SOFTCAP_TANH if config.softcap else ""
    return MODULE_HEADER + rounding + tanh + render_softmax_kernel(spec, summary)


@dataclass(frozen=True)
class AgentKernelConfig:
    """Specialisation of the agent-attention module (see attnopt.kernels.source).

    agent_block is the stage-2 key tile: the launcher makes it cover all agents (a power of two
    >= n_agents, up to 128) so that stage 2 is one pass; stage 1
    tiles the agents by `agent_rows` and the keys by block_n, split across programs.
    agent_bias: stage 2 adds a per-agent bias, read as an additive mask (B|1, H|1, 1, n) whose
    broadcast dims are `bias_broadcast`.
    """

    head_dim: int
    value_dim: int
    agent_block: int
    dtype: str = "float16"
    mask: str = "none"
    mask_broadcast: tuple[bool, bool, bool, bool] = (False, False, True, False)
    block_m: int = 64
    block_n: int = 64
    agent_bias: bool = False
    bias_broadcast: tuple[bool, bool, bool, bool] = (False, False, True, False)

    @property
    def agent_rows(self) -> int:
        """Agents per stage-1 program."""
        return min(self.block_m, self.agent_block)


def render_agent_module(config: AgentKernelConfig) -> str:
    """Module text holding `agent_stage1_kernel` and `agent_stage2_kernel`."""
    check_choice("dtype", config.dtype, DTYPES)
    stage1 = SoftmaxKernelSpec(
        name="agent_stage1_kernel",
        head_dim=config.head_dim,
        value_dim=config.value_dim,
        dot_dtype=config.dtype,
        causal=False,
        mask=config.mask,
        mask_broadcast=tuple(config.mask_broadcast),
        block_m=config.agent_rows,
        block_n=config.block_n,
        split_keys=True,
    )
    stage2 = SoftmaxKernelSpec(
        name="agent_stage2_kernel",
        head_dim=config.head_dim,
        value_dim=config.value_dim,
        dot_dtype=config.dtype,
        causal=False,
        mask="additive" if config.agent_bias else "none",
        mask_broadcast=tuple(config.bias_broadcast) if config.agent_bias else (False, False, False, False),
        block_m=config.block_m,
        block_n=config.agent_block,
    )
    return (
        MODULE_HEADER
        + render_softmax_kernel(stage1, "Stage 1, one key split: partial softmax(agents kᵀ·scale + mask) v.")
        + render_softmax_kernel(
            stage2,
            "Stage 2: softmax(q agentsᵀ·agent_scale + agent_bias) agent_v, all agents in one tile."
            if config.agent_bias
            else "Stage 2: softmax(q agentsᵀ·agent_scale) agent_v, all agents in one tile.",
        )
    )
