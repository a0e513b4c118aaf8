"""The modules a rewritten graph calls in place of each attention site.

A site's Q, K, V arrive in whatever layout the user's code had at the matmul (any number of
leading batch dims, K possibly transposed, masks spelled as fills or additions). `SiteCall`
turns that into the canonical call of an attention module,

    attention(q (B, H, N, d), k (B, Hkv, M, d), v (B, Hkv, M, e), mask=..., scale=..., causal=...,
              dropout_p=...) -> (B, H, N, e)

and gives the result back in the user's layout. The attention module is the variant chosen for
the site (exact, agent, linear, mediator); this file knows nothing about variants.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .masking import Masking, run_attention
from .mha import encoder_layer_forward, multi_head_attention_forward
from .site_ir import FlexRecipe, Input, LibraryRecipe, MatmulRecipe, Recipe, SdpaRecipe, TermSpec, resolve


def call_attention(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   masking: Masking, *, scale: float, causal: bool, dropout_p: float,
                   grouped: bool, head_split: tuple[int, int] | None = None) -> torch.Tensor:
    """Call `attention` on tensors of shape (*L, N, d), (*L, M, d), (*L, M, e).

    Leading dims broadcast as in matmul and are folded to (B, H). With `grouped`, the inputs
    are already (B, H, N, d) and (B, Hkv, M, ·) with H a multiple of Hkv.
    """
    n, e = q.shape[-2], v.shape[-1]
    if grouped:
        lead = tuple(q.shape[:-2])
        q4, k4, v4 = q, k, v
    else:
        shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2]] + [
            m.shape[:-2] for m in (masking.mask, masking.fill_mask, masking.sinks) if m is not None and m.dim() > 2]
        # the usual case, every lead alike, without torch.broadcast_shapes (~10 µs a call)
        lead = tuple(shapes[0]) if all(shape == shapes[0] for shape in shapes) else tuple(
            torch.broadcast_shapes(*shapes))
        batch, heads = _fold(lead, head_split)
        q4 = _to_4d(q, lead, batch, heads)
        k4 = _to_4d(k, lead, batch, heads)
        v4 = _to_4d(v, lead, batch, heads)
        masking = masking.map_masks(lambda m: _mask_to_4d(m, lead, batch, heads))
    out = run_attention(attention, q4, k4, v4, masking, scale=scale, causal=causal, dropout_p=dropout_p)
    return out.reshape(*lead, n, e) if tuple(out.shape[:-2]) != lead else out


def _fold(lead: tuple[int, ...], head_split: tuple[int, int] | None) -> tuple[int, int]:
    if len(lead) == 2:
        return lead
    if len(lead) == 1 and head_split is not None and head_split[0] * head_split[1] == lead[0]:
        return head_split
    if len(lead) == 0:
        return 1, 1
    if len(lead) == 1:
        return lead[0], 1
    return math.prod(lead[:-1]), lead[-1]


def _to_4d(x: torch.Tensor, lead: tuple[int, ...], batch: int, heads: int) -> torch.Tensor:
    if tuple(x.shape[:-2]) == lead and len(lead) == 2:
        return x
    x = x.expand(*lead, *x.shape[-2:])
    return x.reshape(batch, heads, *x.shape[-2:])


def _mask_to_4d(mask: torch.Tensor | None, lead: tuple[int, ...], batch: int, heads: int) -> torch.Tensor | None:
    if mask is None or len(lead) == 2 or mask.dim() <= 2:
        return mask  # already broadcastable to (B, H, N, M)
    mask = mask.expand(*lead, *mask.shape[-2:])
    return mask.reshape(batch, heads, *mask.shape[-2:])


def combine_mask_terms(terms: tuple[TermSpec, ...], tensors: tuple[torch.Tensor, ...],
                       dtype: torch.dtype, softcap: float | None = None, sinks: Any = None) -> Masking:
    """The masking that the additive / fill terms found on the scores path apply, in order, after
    the cap `softcap` (None: none) and with the sink logits `sinks` (an operand: `Input` or None).

    Terms run from the QK matmul to the softmax. Fills replace the score (the detector made their
    value one constant for the site); adds made before a fill are lost where it fills, adds made
    after it still apply. A lone -inf fill becomes a bool keep-mask (what fused kernels want).
    """
    transforms = dict(softcap=softcap, sinks=resolve(sinks, tensors))
    fill_mask = None
    fill_value = -math.inf
    additive = None
    score_dtype = None
    for term in terms:
        factor: Any = term.factor
        for index in term.factor_inputs:
            factor = factor * tensors[index]
        value = resolve(term.value, tensors)
        if term.kind == "add":
            if not isinstance(value, torch.Tensor):  # a number: added in the scores' dtype
                value = torch.tensor(value, dtype=term.score_dtype or dtype)
            elif not value.is_floating_point():
                value = value.to(dtype)
            value = value if isinstance(factor, float) and factor == 1.0 else value * factor
            additive = value if additive is None else additive + value
            # terms added at several precisions (a bf16 baddbmm bias, then an fp32 mask after an
            # upcast): the widest is where a large mask value meets the scores
            if term.score_dtype is not None:
                score_dtype = term.score_dtype if score_dtype is None else torch.promote_types(score_dtype, term.score_dtype)
            continue
        condition = value.bool()
        filled = condition if term.kind == "fill" else ~condition
        fill_value = _held_in(_held_in(term.fill, term.score_dtype) * term.factor, term.score_dtype)
        if additive is not None:
            additive = torch.as_tensor(additive, device=filled.device).masked_fill(filled, 0)
        fill_mask = filled if fill_mask is None else fill_mask | filled
    if isinstance(additive, (int, float)):
        additive = torch.as_tensor(additive, dtype=dtype)
    if fill_mask is not None and additive is None and fill_value == -math.inf:
        return Masking(mask=~fill_mask, **transforms)
    return Masking(mask=additive, fill_mask=fill_mask, fill_value=fill_value, score_dtype=score_dtype, **transforms)


def _held_in(value: float, dtype: torch.dtype | None) -> float:
    """`value` as scores of `dtype` hold it (-1e9 in fp16 scores is -inf)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype)) if dtype is not None else float(value)


class SiteCall(nn.Module):
    """Base: holds the site's attention module and its typed recipe (passes/site_ir.py)."""

    def __init__(self, attention: nn.Module, recipe: Recipe, site_id: int):
        super().__init__()
        self.attention = attention
        self.recipe = recipe
        self.site_id = site_id

    def extra_repr(self) -> str:
        return f"site={self.site_id}"


class MatmulSiteCall(SiteCall):
    """Replaces `softmax(Q Kᵀ · s + masks) V` written with matmuls."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        recipe: MatmulRecipe = self.recipe
        for index in recipe.scale_inputs:
            q = q * tensors[index]
        if recipe.key_transposed:
            k = k.transpose(-1, -2)
        if recipe.leads is not None:
            return self._regrouped(q, k, v, tensors)
        masking = self._masking(recipe.terms, tensors, q.dtype)
        out = call_attention(self.attention, q, k, v, masking, scale=self._scale(tensors), causal=False,
                             dropout_p=recipe.dropout_p, grouped=recipe.grouped, head_split=recipe.head_split)
        return _in_layout(_in_dtype(out, recipe.out_dtype), recipe.out_order)


    def _scale(self, tensors: tuple) -> float:
        """The recipe's scale times the numbers the graph computed for this call (scale_numbers)."""
        scale = self.recipe.scale
        for index in self.recipe.scale_numbers:
            scale = scale * float(tensors[index])
        return scale

    def _masking(self, terms: tuple[TermSpec, ...], tensors: tuple, dtype: torch.dtype) -> Masking:
        """The recipe's masking; with `weights_zeroed` (XSoftmax) its one fill is a -inf mask whose
        fully masked rows give 0."""
        recipe: MatmulRecipe = self.recipe
        if not recipe.weights_zeroed:
            return combine_mask_terms(terms, tensors, dtype, recipe.softcap, recipe.sinks)
        terms = tuple(dataclasses.replace(term, fill=-math.inf, factor=1.0) for term in terms)
        masking = combine_mask_terms(terms, tensors, dtype, recipe.softcap)
        return dataclasses.replace(masking, zero_empty_rows=True)

    def _regrouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors) -> torch.Tensor:
        """The scores were viewed with other leading dims between the matmuls (bmm round
        trips): compute in the softmax's layout, masks brought to it term by term."""
        recipe: MatmulRecipe = self.recipe
        qk_lead, softmax_lead, pv_lead = recipe.leads
        n, m = q.shape[-2], k.shape[-2]
        q = q.expand(*qk_lead, *q.shape[-2:]).reshape(*softmax_lead, *q.shape[-2:])
        k = k.expand(*qk_lead, *k.shape[-2:]).reshape(*softmax_lead, *k.shape[-2:])
        v = v.expand(*pv_lead, *v.shape[-2:]).reshape(*softmax_lead, *v.shape[-2:])
        terms = []
        values = list(tensors)
        for term in recipe.terms:
            if term.layout != tuple(softmax_lead) and isinstance(term.value, Input):
                values.append(values[term.value.index].expand(*term.layout, n, m).reshape(*softmax_lead, n, m))
                term = dataclasses.replace(term, value=Input(len(values) - 1))
            terms.append(term)
        masking = self._masking(tuple(terms), tuple(values), q.dtype)  # no sinks: refused
        out = call_attention(self.attention, q, k, v, masking, scale=self._scale(tensors), causal=False,
                             dropout_p=recipe.dropout_p, grouped=False, head_split=recipe.head_split)
        return _in_layout(_in_dtype(out.reshape(*pv_lead, n, v.shape[-1]), recipe.out_dtype), recipe.out_order)


class SdpaSiteCall(SiteCall):
    """Replaces `F.scaled_dot_product_attention`."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        recipe: SdpaRecipe = self.recipe
        # SDPA adds a float mask to fp32 scores whatever the inputs' dtype, and gives 0 on rows
        # where every key is masked
        masking = Masking(mask=mask, score_dtype=torch.promote_types(q.dtype, torch.float32), zero_empty_rows=True)
        out = call_attention(self.attention, q, k, v, masking, scale=recipe.scale, causal=recipe.causal,
                             dropout_p=recipe.dropout_p, grouped=recipe.grouped)
        return _in_layout(_in_dtype(out, recipe.out_dtype), recipe.out_order)


class LibrarySiteCall(SiteCall):
    """Replaces `F.multi_head_attention_forward` or the fused encoder layer (passes/mha.py)."""

    _functions = {"mha": multi_head_attention_forward, "encoder-layer": encoder_layer_forward}

    def forward(self, *tensors: torch.Tensor) -> Any:
        recipe: LibraryRecipe = self.recipe
        arguments = recipe.bind(tensors)
        if recipe.eager_fused_path:
            arguments["eager_fused_path"] = True
        return self._functions[recipe.function](self.attention, **arguments)


def _on_index_grid(fn: Any, sizes: tuple[int, int, int, int], arguments: list, device: torch.device) -> Any:
    """`fn(b, h, q_idx, kv_idx, *arguments)` at every index of (B, H, N, M), as torch's
    flex_attention reference evaluates score_mods and mask_mods: vmapped over torch.arange grids,
    tensors indexed by index tensors read as `aten.index`."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    grids = [torch.arange(n, device=device) for n in sizes]
    mapped = _vmap_for_bhqkv(fn, prefix=(), suffix=(None,) * len(arguments))
    with TransformGetItemToIndex():
        return mapped(*grids, *arguments)


def flex_masking(recipe: FlexRecipe, tensors: tuple) -> Masking:
    """The masking of a flex_attention site for its inputs `tensors` (q, k, v, buffers): the
    mask_mod and the score_mod's keep conditions evaluated into one bool keep-mask, its added
    terms into one float mask (-inf where not kept) in the scores' working precision (fp32, fp64
    for fp64 inputs, as torch's reference), fully masked rows giving 0."""
    q, k = tensors[0], tensors[1]
    sizes = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    working = torch.float64 if q.dtype == torch.float64 else torch.float32
    keep = additive = None
    if recipe.mask_mod is not None:
        keep = _on_index_grid(recipe.mask_mod, sizes, [resolve(b, tensors) for b in recipe.mask_buffers], q.device)
    score = torch.zeros((), dtype=working, device=q.device)  # the terms do not read it
    buffers = [resolve(b, tensors) for b in recipe.score_buffers]
    if recipe.terms is not None:
        values = _on_index_grid(lambda *indices_and_buffers: recipe.terms(score, *indices_and_buffers), sizes,
                                buffers, q.device)
        for value, sign in zip(values, recipe.term_signs, strict=True):
            value = value.to(working)  # what `score + term` promotes it to
            value = -value if sign < 0 else value
            additive = value if additive is None else additive + value
    if recipe.keeps is not None:
        values = _on_index_grid(lambda *indices_and_buffers: recipe.keeps(score, *indices_and_buffers), sizes,
                                buffers, q.device)
        for condition, negated in zip(values, recipe.keep_negated, strict=True):
            condition = ~condition if negated else condition
            keep = condition if keep is None else keep & condition
    if recipe.has_number_terms:
        offset = torch.tensor(recipe.term_offset, dtype=working, device=q.device)
        additive = offset if additive is None else additive + offset
    if keep is not None and keep.dtype != torch.bool:
        raise TypeError(f"flex_attention's mask_mod returned {keep.dtype}, not bool")
    if additive is not None and keep is not None:
        additive = torch.where(keep, additive, torch.tensor(-math.inf, dtype=working, device=q.device))
    return Masking(mask=keep if additive is None else additive, score_dtype=working, zero_empty_rows=True,
                   softcap=recipe.softcap)


class FlexSiteCall(SiteCall):
    """Replaces `flex_attention` (torch.nn.attention.flex_attention) whose score_mod and mask_mod
    attnopt computes (passes/match_flex.py): one exact call with the masking `flex_masking` builds."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        recipe: FlexRecipe = self.recipe
        q, k, v = tensors[:3]
        if k.shape[0] != q.shape[0]:  # flex_attention broadcasts a key/value batch of 1
            k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
        out = call_attention(self.attention, q, k, v, flex_masking(recipe, tensors),
                             scale=float(resolve(recipe.scale, tensors)),
                             causal=False, dropout_p=0.0, grouped=True)
        return _in_layout(_in_dtype(out, recipe.out_dtype), recipe.out_order)


def _in_layout(out: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """`out` laid out in memory as the original output was (site_ir.memory_order; None:
    contiguous), copied only where it is not: a variant's kernel may return another layout (torch's
    CPU SDPA gives (B, N, H, e) memory), and a later `.view`, dropout's mask or an in-place write
    depends on the original's."""
    if order is None:
        return out if out.is_contiguous() else out.contiguous()
    if out.dim() != len(order):
        return out
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    laid_out = out.permute(order)
    return out if laid_out.is_contiguous() else laid_out.contiguous().permute(inverse)


def _in_dtype(out: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return out.to(dtype) if dtype is not None and out.dtype != dtype else out


_SITE_CALLS = {MatmulRecipe: MatmulSiteCall, SdpaRecipe: SdpaSiteCall, LibraryRecipe: LibrarySiteCall,
               FlexRecipe: FlexSiteCall}


def site_call(attention: nn.Module, recipe: Recipe, site_id: int) -> SiteCall:
    """The runtime module that computes a site with `attention`, for its recipe's form."""
    return _SITE_CALLS[type(recipe)](attention, recipe, site_id)
