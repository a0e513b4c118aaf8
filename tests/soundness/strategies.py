"""Hypothesis strategies drawing `Spec`s: real attention programs, near-misses, and programs whose
instances differ in buffers/parameters."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from . import programs as P
from .programs import Spec

SCALE_VALUES = (0.125, 0.35, 8**-0.5, 0.5, 2.0)


def _mask_values(dtype: torch.dtype) -> tuple[float, ...]:
    values = (-math.inf, -1e4, float(torch.finfo(dtype).min))
    return values if dtype == torch.float16 else values + (-1e9,)


@st.composite
def specs(draw, near_miss: bool = False, stateful: bool = False) -> Spec:
    """One program. `near_miss`: exactly one thing makes it not (rewritable) softmax attention.
    `stateful`: it holds buffers/parameters that two instances can disagree on."""
    pick = lambda options: draw(st.sampled_from(options))  # noqa: E731
    state_kind = None
    if stateful:
        state_kind = pick(("scale-buffer", "head-temp", "fill-buffer", "bias-buffer", "keep-buffer", "mha", "sdpa-buffer"))
    if state_kind == "mha":
        family = "mha"
    elif state_kind == "sdpa-buffer":
        family = "sdpa"
    elif state_kind is not None:
        family = pick(P.MATMUL_FAMILIES)
    elif near_miss:
        family = pick(P.MATMUL_FAMILIES + ("mha",))
    else:
        family = pick(P.MATMUL_FAMILIES + P.MATMUL_FAMILIES + ("sdpa", "mha"))
    dtype = pick(("float32", "float32", "float16", "bfloat16"))
    common = dict(
        family=family,
        dtype=dtype,
        cross=draw(st.booleans()),
        example_mask=pick(("all-keep", "some", "rows")),
        example_grad=draw(st.booleans()),
        grad_check=dtype == "float32" and draw(st.booleans()),
        seed=draw(st.integers(0, 9999)),
    )

    if family == "mha":
        mask = pick(P.MHA_MASKS)
        if state_kind == "mha" and mask == "none":
            mask = "kpm-bool"
        return Spec(**common, mask=mask, mha_self=draw(st.booleans()), batch_first=draw(st.booleans()),
                    post="return-weights" if near_miss else "none")

    polarity = pick(("keep", "drop") if family == "sdpa" else ("keep", "drop", "keep-int"))
    negation = pick(P.NEGATIONS)
    mask_shape = pick(P.MASK_SHAPES)

    if family == "sdpa":
        mask = pick(P.SDPA_MASKS)
        source = "input"
        if state_kind == "sdpa-buffer":
            mask = pick(("bool", "float"))
            source = "buffer"
        return Spec(**common, scale=pick(P.SDPA_SCALES), scale_value=pick(SCALE_VALUES), mask=mask,
                    mask_source=source, polarity=polarity, negation=negation, mask_shape=mask_shape)

    torch_dtype = getattr(torch, dtype)
    upcast = dtype != "float32" and draw(st.booleans())
    score_dtype = torch.float32 if upcast else torch_dtype
    scales = P.SCALES + (("alpha",) if family == "baddbmm" else ())
    scale = pick(scales)
    masks = tuple(m for m in P.MASKS if m != "baddbmm-input" or family == "baddbmm")
    mask = pick(masks)
    source = pick(("input", "input", "buffer")) if mask in P.KEEP_MASKS + P.ADDITIVE_MASKS else "input"
    fills = tuple(f for f in P.MASK_FILLS if not (f == "-1e9" and score_dtype == torch.float16))
    fill = pick(fills)
    softmaxes = tuple(s for s in P.SOFTMAXES if not (s == "manual-nomax" and score_dtype != torch.float32))
    post = pick(P.POSTS)
    softmax_dim = pick(("-1", "3"))

    if state_kind == "scale-buffer":
        scale = "buffer"
    elif state_kind == "head-temp":
        scale = "head-temp"
    elif state_kind == "fill-buffer":
        mask, fill = pick(P.FILL_MASKS), "buffer"
    elif state_kind == "bias-buffer":
        mask, source = pick(P.ADDITIVE_MASKS), "buffer"
    elif state_kind == "keep-buffer":
        mask, source = pick(P.KEEP_MASKS), "buffer"

    if near_miss:
        what = pick(("softmax-dim", "post", "scale", "fill", "fill-value"))
        if what == "softmax-dim":
            softmax_dim = "-2"
        elif what == "post":
            post = pick(P.NEAR_MISS_POSTS)
        elif what == "scale":
            scale = pick(P.NEAR_MISS_SCALES)
        else:
            if mask not in P.REPLACING_MASKS:
                mask = pick(P.REPLACING_MASKS)
                source = pick(("input", "buffer")) if mask != "causal" else "input"
            fill = pick(P.NON_MASK_FILLS) if what == "fill" else pick(("input", "buffer"))

    if mask == "hf-extended" and fill not in ("-1e4", "-1e9", "finfo.min"):
        fill = "finfo.min"  # (1 - keep) * -inf is NaN where kept: not a mask
    fill_value = -math.inf
    if fill in ("input", "buffer"):
        if near_miss and what == "fill-value":
            fill_value = pick((0.0, -1.0))
        else:
            fill_value = float(torch.tensor(pick(_mask_values(torch_dtype)), dtype=torch_dtype))

    return Spec(
        **common,
        upcast=upcast,
        scale=scale,
        scale_value=pick(SCALE_VALUES),
        scale_inplace=pick(P.SCALE_INPLACE),
        mask_first=draw(st.booleans()),
        mask=mask,
        mask_source=source,
        polarity=polarity,
        negation=negation,
        mask_shape=mask_shape,
        fill=fill,
        fill_value=fill_value,
        softmax=pick(softmaxes),
        softmax_dim=softmax_dim,
        post=post,
    )
