"""Input and state values for generated programs, each with the Python literal that rebuilds it.

Mask regimes (the rows of a mask are its last-dim slices, each one query's keys):

* "all-keep": nothing is masked (an additive mask is all zeros in the example, random finite
  biases in fresh inputs);
* "some": every row keeps some keys and masks some;
* "rows": like "some", but whole rows are masked;
* "mixed" (fresh only): rows drawn fully masked, all-keep or partial, at least one of the first
  two kinds each;
* "partial" (fresh only): like "some" — used where NaN outputs would make gradients meaningless.

Fresh inputs draw new values for *every* input: q/k/v, masks, and 0-dim fill and scale tensors
(a fill held in an input may be any value, a scale any number — the rewritten program must still
compute what the original does, or the site must be refused).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np
import torch

from .programs import InputSlot, Program, StateSlot

MASK_VALUES = {
    torch.float32: (-math.inf, -1e4, -1e9, torch.finfo(torch.float32).min),
    torch.bfloat16: (-math.inf, -1e4, -1e9, torch.finfo(torch.bfloat16).min),
    # finfo.min is left out of fp16 additive masks: s + finfo.min overflows to -inf for s < -16, an
    # artifact of the original's rounding rather than a mask (fills with finfo.min are drawn).
    torch.float16: (-math.inf, -1e4),
}
FILL_VALUES = {
    dtype: values + ((torch.finfo(dtype).min,) if dtype == torch.float16 else ()) + (0.0, -1.0)
    for dtype, values in MASK_VALUES.items()
}
SCALE_VALUES = (0.125, 0.3, 0.7, 1.3, -0.5)
POSITIVE_SCALES = (0.125, 0.3, 0.7, 1.3)


@dataclasses.dataclass
class Value:
    tensor: torch.Tensor
    literal: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)


def _number(x: float) -> str:
    """The shortest literal that gives the same float32 (every value here is a float32, or a
    float16/bfloat16 cast from one)."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = str(np.float32(x))
    assert float(np.float32(float(text))) == float(np.float32(x)), (x, text)
    return text


def _nested(t: torch.Tensor, fmt) -> str:
    if t.dim() == 0:
        return fmt(t.item())
    return "[" + ", ".join(_nested(row, fmt) for row in t) + "]"


def bool_literal(t: torch.Tensor) -> str:
    return f"torch.tensor({_nested(t.int(), lambda x: str(int(x)))}, dtype=torch.bool)"


def float_literal(t: torch.Tensor) -> str:
    return f"torch.tensor({_nested(t.float(), _number)}).to({_dtype_name(t.dtype)})"


def data_value(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Value:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator).to(dtype)
    return Value(tensor, f"torch.randn({shape!r}, generator=torch.Generator().manual_seed({seed})).to({_dtype_name(dtype)})")


def keep_pattern(shape: tuple[int, ...], regime: str, rng: random.Random) -> torch.Tensor:
    """A bool tensor, True where a key is kept, following `regime`."""
    m = shape[-1]
    rows = math.prod(shape[:-1])
    kinds: list[str]
    if regime == "all-keep":
        kinds = ["keep"] * rows
    elif regime in ("some", "partial"):
        kinds = ["partial"] * rows
    elif regime == "rows":
        kinds = [rng.choice(("partial", "partial", "masked")) for _ in range(rows)]
        if "masked" not in kinds:
            kinds[rng.randrange(rows)] = "masked"
    elif regime == "mixed":
        kinds = [rng.choice(("partial", "partial", "masked", "keep")) for _ in range(rows)]
        order = list(range(rows))
        rng.shuffle(order)
        if "masked" not in kinds:
            kinds[order[0]] = "masked"
        if "keep" not in kinds and rows > 1:
            kinds[order[1]] = "keep"
    else:
        raise ValueError(regime)
    out = []
    for kind in kinds:
        if kind == "keep":
            row = [True] * m
        elif kind == "masked":
            row = [False] * m
        else:
            row = [rng.random() < 0.6 for _ in range(m)]
            if not any(row):
                row[rng.randrange(m)] = True
            if all(row) and m > 1:
                row[rng.randrange(m)] = False
        out.append(row)
    return torch.tensor(out, dtype=torch.bool).reshape(shape)


def bias_from_keep(keep: torch.Tensor, dtype: torch.dtype, regime: str, rng: random.Random, example: bool) -> torch.Tensor:
    """An additive float mask: random biases where kept, a mask value where not."""
    if example and regime == "all-keep":
        return torch.zeros(keep.shape, dtype=dtype)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    base = (torch.randn(keep.shape, generator=generator) * 0.5).round(decimals=2)
    value = rng.choice(MASK_VALUES[dtype])
    return base.masked_fill(~keep, value).to(dtype)


def input_values(program: Program, regime: str, seed: int, *, example: bool, positive_scale: bool = False) -> list[Value]:
    """Values for the program's forward inputs under a mask regime (see the module docstring)."""
    rng = random.Random(seed)
    spec = program.spec
    values = []
    for index, slot in enumerate(program.inputs):
        values.append(_slot_value(slot, spec, regime, rng, seed * 16 + index, example, positive_scale))
    return values


def _slot_value(slot: InputSlot, spec, regime: str, rng: random.Random, seed: int, example: bool,
                positive_scale: bool) -> Value:
    if slot.role == "data":
        return data_value(slot.shape, slot.dtype, seed)
    if slot.role in ("keep", "drop", "keep-int"):
        return _keep_value(slot.role, keep_pattern(slot.shape, regime, rng))
    if slot.role == "bias":
        keep = keep_pattern(slot.shape, regime, rng)
        bias = bias_from_keep(keep, slot.dtype, regime, rng, example)
        return Value(bias, float_literal(bias))
    if slot.role == "fill":
        value = spec.fill_value if example else rng.choice(FILL_VALUES[slot.dtype])
        return Value(torch.tensor(value, dtype=slot.dtype), f"torch.tensor({_number(value)}, dtype={_dtype_name(slot.dtype)})")
    if slot.role == "scale":
        value = spec.scale_value if example else rng.choice(POSITIVE_SCALES if positive_scale else SCALE_VALUES)
        return Value(torch.tensor(value, dtype=slot.dtype), f"torch.tensor({_number(value)}, dtype={_dtype_name(slot.dtype)})")
    raise ValueError(slot.role)


# --- state: buffers and parameters, per instance --------------------------------------------------

SECOND_SCALES = (0.125, 0.5, 2.0)
SECOND_FILLS = (-math.inf, -1e4, "finfo.min", 0.0, -1.0)


def state_values(program: Program, seed: int, instance: int) -> dict[str, Value]:
    """Buffers/parameters of one instance. Instance 0 holds the spec's values; instance 1 others
    (a different scale, fill, temperature, bias or mask — possibly a fill that is no mask value)."""
    rng = random.Random(seed * 31 + instance)
    spec = program.spec
    out = {}
    for slot in program.state:
        out[slot.name] = _state_value(slot, spec, rng, instance)
    return out


def _state_value(slot: StateSlot, spec, rng: random.Random, instance: int) -> Value:
    dtype = slot.dtype
    if slot.role == "scale":
        value = spec.scale_value if instance == 0 else rng.choice([s for s in SECOND_SCALES if s != spec.scale_value])
        return Value(torch.tensor(value, dtype=dtype), f"torch.tensor({_number(value)}, dtype={_dtype_name(dtype)})")
    if slot.role == "fill":
        value = spec.fill_value if instance == 0 else rng.choice(SECOND_FILLS)
        if value == "finfo.min":
            value = torch.finfo(dtype).min
        return Value(torch.tensor(value, dtype=dtype), f"torch.tensor({_number(value)}, dtype={_dtype_name(dtype)})")
    if slot.role == "temp":
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        temp = (0.5 + 1.5 * torch.rand(slot.shape, generator=generator)).round(decimals=2).to(dtype)
        return Value(temp, float_literal(temp))
    if slot.role == "rel_bias":
        keep = keep_pattern(slot.shape, "some" if instance == 0 else "mixed", rng)
        bias = bias_from_keep(keep, dtype, "some", rng, example=False)
        return Value(bias, float_literal(bias))
    if slot.role in ("keep", "drop", "keep-int"):
        return _keep_value(slot.role, keep_pattern(slot.shape, "some" if instance == 0 else "mixed", rng))
    raise ValueError(slot.role)


def _keep_value(role: str, keep: torch.Tensor) -> Value:
    if role == "keep-int":
        mask = keep.long()
        return Value(mask, bool_literal(keep).replace("dtype=torch.bool", "dtype=torch.long"))
    mask = keep if role == "keep" else ~keep
    return Value(mask, bool_literal(mask))


def tensors(values: list[Value] | dict[str, Value]) -> Any:
    if isinstance(values, dict):
        return {name: v.tensor.clone() for name, v in values.items()}
    return [v.tensor.clone() for v in values]
