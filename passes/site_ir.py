"""The attention site as the passes hand it on: one typed record per match, one typed recipe per form.

Detection (passes/detect.py and the matchers) produces a `SiteMatch`: the graph nodes it binds,
the nodes it replaces and a recipe — what the runtime module (passes/site_call.py) needs to
compute the site from its inputs, with no graph in sight:

* `MatmulRecipe` — softmax(Q Kᵀ·scale + masks) V written with matmuls; its mask terms are
  `TermSpec`s, in order from the QK matmul to the softmax;
* `SdpaRecipe` — `F.scaled_dot_product_attention`;
* `LibraryRecipe` — `F.multi_head_attention_forward` or the fused encoder layer, argument by name;
* `FlexRecipe` — `flex_attention` (passes/match_flex.py), its score_mod / mask_mod read as terms.

An operand the recipe reads from the site's inputs is an `Input` (its position); anything else
in a recipe is a constant.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

import torch
import torch.fx as fx

from .fx_utils import dtype_of, module_path, shape_of, source_line


@dataclasses.dataclass(frozen=True)
class Input:
    """The site input at `index` (counted among the tensors after q, k, v, or among all inputs
    for a library call)."""

    index: int


def resolve(operand: Any, tensors: tuple) -> Any:
    """The value of a recipe operand: the tensor an `Input` points at, or the constant itself."""
    return tensors[operand.index] if isinstance(operand, Input) else operand


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """One mask term on the scores. kind "add": `value` is added (to scores held in
    `score_dtype`). kind "fill" / "keep": where the bool `value` is True / False the score is
    replaced by the constant `fill`. Scales applied after the term multiply it: the number
    `factor` and the tensors at `factor_inputs`. `layout`: the scores' leading dims where it applies."""

    kind: str
    value: Any
    fill: float | None = None
    factor: float = 1.0
    factor_inputs: tuple[int, ...] = ()
    layout: tuple[int, ...] = ()
    score_dtype: torch.dtype | None = None


@dataclasses.dataclass(frozen=True)
class MatmulRecipe:
    """softmax(Q Kᵀ·scale + terms) V from matmul operands: q (*L, N, d), kᵀ (*L, d, M) — or, when
    `grouped`, k (B, Hkv, M, d) peeled from a head repetition — and v (*L, M, e).

    scale_inputs: per-head tensor scales folded into q. scale_numbers: numbers the graph computes
    (a scale from symbolic sizes, `_sym_sqrt(d)`), multiplied into `scale` on each call.
    head_split: (B, H) when 3-D scores fold them. leads: the leading dims at the QK matmul, the
    softmax and the PV matmul when views regroup them in between (bmm round trips), else None.
    out_dtype: the PV matmul's dtype.
    out_order: the memory order of the original output (`memory_order`).
    softcap: c when the scaled scores are capped to c·tanh(s / c) before the terms (Gemma 2), else
    None. sinks: the `Input` holding the sink logits joined to the scores before the softmax
    (`cat([scores, sink], -1)`, broadcastable to the scores with one key; gpt-oss), whose column
    is dropped before the PV matmul; else None. weights_zeroed: the weights are set to 0 after the
    softmax where the site's one fill term (-inf or the scores' lowest value) filled the scores
    (DeBERTa's XSoftmax): softmax with that fill as a -inf mask, fully masked rows giving 0."""

    scale: float
    terms: tuple[TermSpec, ...] = ()
    scale_inputs: tuple[int, ...] = ()
    scale_numbers: tuple[int, ...] = ()
    grouped: bool = False
    dropout_p: float = 0.0
    head_split: tuple[int, int] | None = None
    out_dtype: torch.dtype | None = None
    leads: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    out_order: tuple[int, ...] | None = None
    softcap: float | None = None
    sinks: Input | None = None
    weights_zeroed: bool = False

    @property
    def key_transposed(self) -> bool:
        """The key operand is Kᵀ as the QK matmul read it (not a peeled, untransposed K)."""
        return not self.grouped


@dataclasses.dataclass(frozen=True)
class SdpaRecipe:
    """`F.scaled_dot_product_attention(q, k, v, [mask])` with its constant arguments; out_order:
    the memory order of the original output (`memory_order`)."""

    scale: float
    causal: bool = False
    dropout_p: float = 0.0
    grouped: bool = False
    out_dtype: torch.dtype | None = None
    out_order: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class LibraryRecipe:
    """A library call rewritten around a pluggable attention core (attnopt.mha): `function` is
    "mha" or "encoder-layer"; `arguments` maps each argument name to an `Input` or a constant.
    eager_fused_path: eager torch may run its fused MHA kernel here (passes/eager_paths.py)."""

    function: str
    arguments: tuple[tuple[str, Any], ...]
    eager_fused_path: bool = False

    def bind(self, tensors: tuple) -> dict[str, Any]:
        return {name: resolve(operand, tensors) for name, operand in self.arguments}


@dataclasses.dataclass(frozen=True)
class FlexRecipe:
    """`flex_attention(q, k, v, score_mod, block_mask, scale)` whose score_mod is
    `where(keeps, cap(s) + Σ terms, -inf)` (passes/match_flex.py); operands among all site inputs
    (q, k, v first).

    terms: a GraphModule of the score_mod's signature (score, b, h, q_idx, kv_idx, *score
    buffers) returning the tensor terms added to the score (signs `term_signs`); keeps: one
    returning the conditions where the score is kept (negated where `keep_negated`); None when
    there are none. term_offset: the numbers added (`has_number_terms`: any). mask_mod: the block mask's mask_mod (b, h, q_idx, kv_idx, *mask
    buffers), None for flex's no-op mask. score_buffers / mask_buffers: `Input`s or constants,
    passed after the indices. softcap: c of a `c·tanh(s / c)` applied to the score, or None.
    scale: a number, or the `Input` of one the graph computes from symbolic sizes (read per call)."""

    scale: Any
    softcap: float | None = None
    terms: Any = None
    term_signs: tuple[int, ...] = ()
    term_offset: float = 0.0
    has_number_terms: bool = False
    keeps: Any = None
    keep_negated: tuple[bool, ...] = ()
    mask_mod: Any = None
    score_buffers: tuple[Any, ...] = ()
    mask_buffers: tuple[Any, ...] = ()
    out_dtype: torch.dtype | None = None
    out_order: tuple[int, ...] | None = None


Recipe = Union[MatmulRecipe, SdpaRecipe, LibraryRecipe, FlexRecipe]


def memory_order(node: Any) -> tuple[int, ...] | None:
    """The dims of `node`'s value from outermost to innermost in memory, or None when it is
    contiguous or unknown (symbolic strides). A rewritten site gives its output this layout, as
    the original op did: a later `.view` that relied on it keeps working, and ops that walk
    memory in order (dropout's mask, in-place writes) see the elements in the original order."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    try:
        strides, sizes = [int(s) for s in value.stride()], [int(s) for s in value.shape]
    except (TypeError, RuntimeError):  # symbolic
        return None
    if value.is_contiguous():
        return None
    # size-1 dims take no memory of their own: any place will do, innermost here
    order = sorted(range(value.dim()), key=lambda i: (-strides[i], i) if sizes[i] > 1 else (0, i))
    return tuple(order) if order != list(range(value.dim())) else None


@dataclasses.dataclass
class SiteMatch:
    """A detected attention and everything needed to verify and replace it: the graph nodes it
    binds (`inputs`, in the order the recipe's `Input` indices count them), the nodes it replaces
    (`internal`), its typed `recipe`, and what the report shows (or why it is refused)."""

    kind: str  # "matmul", "sdpa", "mha", "encoder-layer" or "flex"
    anchor: fx.Node
    output: fx.Node
    form: str
    inputs: list[Any]
    internal: list[fx.Node]
    recipe: Recipe | None
    shape: dict[str, int]
    causal: bool = False
    mask: str | None = None
    dropout: float = 0.0
    scale: float | None = None
    reason: str | None = None
    # Inputs that hold masks (bool, or float 0/-inf/large negative); verification draws such
    # values for them, whole rows masked included.
    mask_inputs: list[fx.Node] = dataclasses.field(default_factory=list)
    # Nodes the site reads whose value is a constant the recipe holds (fills), or that do not
    # change what it computes (a flex block mask's block tensors): verification feeds them this
    # value; the rewrite does not read them.
    constants: dict[fx.Node, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module that owns the site: where its output is computed."""
        return module_path(self.output) or module_path(self.anchor)

    @property
    def source(self) -> str:
        return source_line(self.anchor)

    @property
    def dtype(self) -> str:
        dtype = dtype_of(self.output) or dtype_of(self.anchor) or (dtype_of(self.inputs[0]) if self.inputs else None)
        return str(dtype).replace("torch.", "") if dtype is not None else "?"


def refuse(match: SiteMatch, reason: str) -> SiteMatch:
    """`match`, marked not rewritable for `reason` (one sentence, shown in the report)."""
    match.reason = reason
    return match


def index_of(items: list, item: Any) -> int:
    """The position of `item` in `items` (by identity), appended when absent."""
    for i, existing in enumerate(items):
        if existing is item:
            return i
    items.append(item)
    return len(items) - 1


def partial_shape(q_operand: Any, kt_operand: Any, v_operand: Any, heads=None, kv_heads=None) -> dict[str, int]:
    """The report's {B, H, Hkv, N, M, d, e} from the bound operands (what is known of it)."""
    q_shape = shape_of(q_operand) or ()
    kt_shape = shape_of(kt_operand) or ()
    v_shape = shape_of(v_operand) or ()
    lead = q_shape[:-2] if len(q_shape) >= 2 else ()
    if heads is not None:
        batch, head_count = heads
    elif len(lead) >= 2:
        batch, head_count = math.prod(lead[:-1]), lead[-1]
    elif len(lead) == 1:
        batch, head_count = lead[0], 1
    else:
        batch, head_count = 1, 1
    shape = {"B": batch, "H": head_count, "Hkv": kv_heads or head_count}
    if len(q_shape) >= 2:
        shape["N"], shape["d"] = q_shape[-2], q_shape[-1]
    if len(kt_shape) >= 2:
        shape["M"] = kt_shape[-1]
    if len(v_shape) >= 2:
        shape["e"] = v_shape[-1]
    return shape
