"""A catalogue of small modules, each spelling softmax attention a different way.

Every idiom has a factory giving (module, args, kwargs), an fp64 reference for what it is meant
to compute, and what the detector should record about it. The forms cover the hand-written
patterns of PyTorch Inductor's test/inductor/test_fused_attention.py (tags "inductor:<n>"),
plus the spellings found in transformers, timm, diffusers and torch.nn."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .support import FP32_RTOL, linear64, merge_heads, reference_attention, split_heads

BATCH, HEADS, SEQ, KEYS, HEAD_DIM = 2, 2, 8, 12, 16
WIDTH = HEADS * HEAD_DIM
CONTEXT_WIDTH = 24
GQA_HEADS, GQA_KV_HEADS = 4, 2

Factory = Callable[[], tuple[nn.Module, tuple, dict]]
Reference = Callable[[nn.Module, tuple, dict], Any]


@dataclasses.dataclass(frozen=True)
class Idiom:
    """One spelling of attention and what the detector must make of it."""

    name: str
    build: Factory
    reference: Reference
    tags: frozenset[str]
    form: str | None = None  # expected Site.form; None: not asserted
    sites: int = 1
    causal: bool | None = None  # expected Site.causal; None: not asserted
    masked: bool = False  # the site must carry its mask (Site.mask set, or Site.causal)
    dropout: float | None = None  # expected Site.dropout; asserted for training idioms
    shape: Mapping[str, int] = dataclasses.field(default_factory=dict)  # expected subset of Site.shape
    rtol: float = FP32_RTOL
    training: bool = False  # dropout is live: outputs are random, compare in distribution
    no_grad: bool = False  # run everything under torch.no_grad() (needed for fast paths)
    dtype: str | None = "float32"  # expected in Site.dtype; None where casts make it ambiguous

    def make(self) -> tuple[nn.Module, tuple, dict]:
        """A fresh, seeded instance in the idiom's train/eval mode."""
        torch.manual_seed(0)
        module, args, kwargs = self.build()
        module.train(self.training)
        return module, args, kwargs

    def __str__(self) -> str:
        return self.name


class Functional(nn.Module):
    """Runs `fn(module, *inputs)`, so plain attention functions can read buffers and `training`."""

    def __init__(self, fn: Callable, **buffers: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, *args, **kwargs):
        return self.fn(self, *args, **kwargs)


def bhsd(heads=HEADS, kv_heads=None, n=SEQ, m=None, dtype=torch.float32):
    """Random q (B, H, N, d) and k, v (B, Hkv, M, d)."""
    kv_heads = kv_heads or heads
    m = m or n
    q = torch.randn(BATCH, heads, n, HEAD_DIM, dtype=dtype)
    k = torch.randn(BATCH, kv_heads, m, HEAD_DIM, dtype=dtype)
    v = torch.randn(BATCH, kv_heads, m, HEAD_DIM, dtype=dtype)
    return q, k, v


def bshd(n=SEQ, m=None, dtype=torch.float32):
    """Random q (B, N, H, d) and k, v (B, M, H, d)."""
    return tuple(t.transpose(1, 2).contiguous() for t in bhsd(n=n, m=m, dtype=dtype))


def causal_keep(n: int, m: int) -> torch.Tensor:
    return torch.ones(n, m, dtype=torch.bool).tril()


def key_padding_keep() -> torch.Tensor:
    """(B, M) keep-mask: batch 0 sees every key, batch 1 the first five."""
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[1, 5:] = False
    return keep


def bool_keep(*shape: int) -> torch.Tensor:
    """A random keep-mask whose diagonal is kept, so no row is fully masked."""
    keep = torch.rand(*shape) > 0.4
    return keep | torch.eye(shape[-2], shape[-1], dtype=torch.bool)


def ref_bhsd(**options) -> Reference:
    """Reference for functional idioms taking (q, k, v, ...) in (B, H, N, d)."""
    return lambda m, args, kwargs: reference_attention(args[0], args[1], args[2], **options)


def ref_bshd(**options) -> Reference:
    """Reference for functional idioms taking (B, N, H, d) inputs and returning (B, H, N, d)."""
    return lambda m, args, kwargs: reference_attention(*(t.transpose(1, 2) for t in args[:3]), **options)


CATALOGUE: list[Idiom] = []


def functional(name, inputs, reference, tags, buffers=dict, **expect):
    """Registers a plain attention function `fn(module, *inputs)` as an idiom."""

    def register(fn):
        CATALOGUE.append(
            Idiom(
                name=name,
                build=lambda: (Functional(fn, **buffers()), tuple(inputs()), {}),
                reference=reference,
                tags=frozenset(tags),
                **expect,
            )
        )
        return fn

    return register


def module_idiom(name, build, reference, tags, **expect) -> None:
    """Registers an idiom built by `build() -> (module, args, kwargs)`."""
    CATALOGUE.append(Idiom(name=name, build=build, reference=reference, tags=frozenset(tags), **expect))


# --- Inductor's hand-written forms (test/inductor/test_fused_attention.py) -----------------------


@functional(
    "inductor-01-matmul-div-sqrt", bhsd, ref_bhsd(),
    {"inductor:1", "torch.matmul", "k-transpose", "scale-div", "bhsd"}, form="matmul",
)
def matmul_div_sqrt(m, q, k, v):
    scores = torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1]))
    return scores.softmax(dim=-1).matmul(v)


@functional(
    "inductor-02-matmul-mul-inverse-sqrt", bhsd, ref_bhsd(), {"inductor:2", "scale-mul", "Tensor.matmul"},
    form="matmul",
)
def matmul_mul_inverse_sqrt(m, q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).mul(1.0 / math.sqrt(k.shape[-1])).softmax(dim=-1).matmul(v)


@functional(
    "inductor-03-div-constant-dropout-training", bhsd, ref_bhsd(scale=1 / 3.0),
    {"inductor:3", "dropout-train", "non-default-scale"}, form="matmul", training=True, dropout=0.4,
)
def div_constant_dropout(m, q, k, v):
    weights = torch.matmul(q, k.transpose(-2, -1)).div(3.0).softmax(dim=-1)
    return F.dropout(weights, p=0.4, training=m.training, inplace=False).matmul(v)


@functional(
    "inductor-04-mul-constant-dropout-eval", bhsd, ref_bhsd(scale=0.4),
    {"inductor:4", "dropout-eval", "non-default-scale"}, form="matmul",
)
def mul_constant_dropout(m, q, k, v):
    weights = torch.matmul(q, k.transpose(-2, -1)).mul(0.4).softmax(dim=-1)
    return F.dropout(weights, p=0.2, training=m.training).matmul(v)


@functional(
    "inductor-05-causal-float-mask-from-tril", bhsd, ref_bhsd(causal=True),
    {"inductor:5", "causal-tril", "mask-float", "matmul-op"}, form="matmul", masked=True,
)
def causal_float_mask_from_tril(m, q, k, v):
    keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril(diagonal=0)
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(torch.logical_not(keep), -float("inf"))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias, dim=-1)
    return weights @ v


def plus_one_reference(m, args, kwargs):
    """A +1 on every score leaves the softmax unchanged."""
    return reference_attention(*args[:3])


@functional(
    "inductor-05-bool-mask-filled-then-added", bhsd, plus_one_reference, {"inductor:5", "mask-bool-added"},
    form="matmul", causal=False,
)
def bool_mask_filled_then_added(m, q, k, v):
    # Filling a bool tensor with -inf makes it all True, so this adds 1 everywhere: not causal.
    keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril(diagonal=0)
    bias = keep.masked_fill(torch.logical_not(keep), -float("inf"))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias, dim=-1)
    return weights @ v


@functional(
    "inductor-05-zero-bool-mask-added", bhsd, ref_bhsd(), {"inductor:5", "mask-bool-added"}, form="matmul",
)
def zero_bool_mask_added(m, q, k, v):
    bias = torch.zeros(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).bool()
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias, dim=-1)
    return weights @ v


@functional(
    "inductor-06-causal-torch-dropout-eval", bhsd, ref_bhsd(causal=True),
    {"inductor:6", "causal-tril", "dropout-eval"}, form="matmul", masked=True,
)
def causal_torch_dropout(m, q, k, v):
    keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias, dim=-1)
    weights = torch.dropout(weights, 0.5, m.training)
    return weights @ v


@functional(
    "inductor-07-bshd-permute-half-fp32-softmax-dropout", lambda: bshd(dtype=torch.float16), ref_bshd(),
    {"inductor:7", "bshd", "cast", "dropout-eval", "half"}, form="matmul", rtol=5e-3, dtype=None,
)
def half_fp32_softmax_dropout(m, query, key, value):
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).to(torch.float32)
    weights = torch.dropout(torch.softmax(scores, dim=-1), 1e-11, m.training)
    return weights.to(torch.float16) @ v


@functional("inductor-08-bshd-permute-casts", bshd, ref_bshd(), {"inductor:8", "bshd", "cast"}, form="matmul")
def bshd_permute_casts(m, query, key, value):
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).to(torch.float32)
    return torch.softmax(scores, dim=-1).to(query.dtype) @ v


@functional(
    "inductor-09-bshd-prescaled-query-dropout", bshd, ref_bshd(),
    {"inductor:9", "scale-q", "bshd", "dropout-eval"}, form="matmul",
)
def bshd_prescaled_query(m, query, key, value):
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    q = q / math.sqrt(q.size(-1))
    weights = torch.softmax((q @ k.transpose(-2, -1)).to(torch.float32), dim=-1)
    weights = torch.dropout(weights, 1e-11, m.training)
    return weights.to(query.dtype) @ v


@functional(
    "inductor-10-bshd-prescaled-query-bfloat16", lambda: bshd(dtype=torch.bfloat16), ref_bshd(),
    {"inductor:10", "scale-q", "cast", "bfloat16"}, form="matmul", rtol=3e-2, dtype=None,
)
def bshd_prescaled_query_bf16(m, query, key, value):
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    q = q / math.sqrt(q.size(-1))
    weights = torch.softmax((q @ k.transpose(-2, -1)).to(torch.float32), dim=-1)
    return weights.to(torch.bfloat16) @ v


@functional("inductor-11-bshd-transpose", bshd, ref_bshd(), {"inductor:11", "bshd"}, form="matmul")
def bshd_transpose(m, query, key, value):
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(key.shape[-1])).softmax(dim=-1).matmul(v)


@functional(
    "inductor-12-dropout-on-output-training", bshd, ref_bshd(), {"inductor:12", "dropout-train"},
    form="matmul", training=True, dropout=0.0,
)
def dropout_on_output(m, query, key, value):
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    out = torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(key.shape[-1])).softmax(dim=-1).matmul(v)
    return F.dropout(out, p=0.4, training=m.training)


@functional("inductor-prev13-clone", bhsd, ref_bhsd(), {"inductor:prev13", "clone"}, form="matmul")
def softmax_clone(m, q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).clone().matmul(v)


@functional(
    "inductor-prev14-mul-clone", bhsd, ref_bhsd(), {"inductor:prev14", "clone", "scale-mul"}, form="matmul",
)
def softmax_mul_clone(m, q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).mul(1.0 / math.sqrt(k.shape[-1])).softmax(dim=-1).clone().matmul(v)


@functional(
    "inductor-prev15-bshd-clone", bshd, ref_bshd(), {"inductor:prev15", "clone", "bshd"}, form="matmul",
)
def bshd_softmax_clone(m, query, key, value):
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(key.shape[-1])).softmax(dim=-1).clone().matmul(v)


def batched_3d_inputs():
    return tuple(t.reshape(BATCH * HEADS, SEQ, HEAD_DIM) for t in bhsd())


def bmm_3d_reference(m, args, kwargs):
    return reference_attention(*(t.unsqueeze(1) for t in args), scale=1.0).squeeze(1)


@functional(
    "inductor-13-bmm-3d-dropout", batched_3d_inputs, bmm_3d_reference,
    {"inductor:13", "bmm", "no-scale", "dropout-eval"}, form="bmm",
)
def bmm_3d_dropout(m, q, k, v):
    weights = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    weights = F.dropout(weights, p=0.5, training=m.training)
    return torch.bmm(weights, v)


@functional(
    "inductor-14-bshd-causal-div-constant", bshd, ref_bshd(scale=1 / 3.0, causal=True),
    {"inductor:14", "causal-tril", "bshd"}, form="matmul", masked=True,
)
def bshd_causal_div_constant(m, query, key, value):
    keep = torch.ones(query.size(1), key.size(1), dtype=torch.bool).tril()
    bias = torch.zeros(keep.shape).masked_fill(torch.logical_not(keep), -float("inf"))
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    return (torch.matmul(q, k.transpose(-2, -1)).div(3.0) + bias).softmax(dim=-1).matmul(v)


def tril_padding_keep(batch: int, keys: int) -> torch.Tensor:
    """Inductor's key-padding mask: batch b keeps its first b+1 keys."""
    return torch.ones(batch, keys, dtype=torch.bool).tril()[:, None, None, :]


@functional(
    "inductor-15-key-padding-masked-fill", bshd,
    lambda m, a, kw: reference_attention(*(t.transpose(1, 2) for t in a), scale=1 / 3.0, mask=tril_padding_keep(BATCH, SEQ)),
    {"inductor:15", "key-padding", "mask-bool-masked_fill", "bshd"}, form="matmul", masked=True,
)
def key_padding_masked_fill(m, query, key, value):
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, keys = q.size(0), k.size(-2)
    keep = torch.ones(batch, keys, dtype=torch.bool).tril(diagonal=0)
    scores = torch.matmul(q, k.transpose(-2, -1)) / 3.0
    padded = (keep == 0).view((batch, 1, 1, keys)).expand_as(scores)
    scores = scores.masked_fill(padded, -float("inf"))
    return torch.matmul(F.softmax(scores, dim=-1), v)


@functional(
    "inductor-16-random-float-mask-tril-buffer", bshd,
    lambda m, a, kw: reference_attention(*(t.transpose(1, 2) for t in a), scale=1 / 3.0, mask=m.bias),
    {"inductor:16", "mask-float", "dropout-eval"}, buffers=lambda: {"bias": torch.randn(SEQ, SEQ).tril()},
    form="matmul", masked=True, causal=False,
)
def random_float_mask(m, query, key, value):
    # tril of a random float mask is an additive bias, not a causal mask.
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    weights = (torch.matmul(q, k.transpose(-2, -1)).div(3.0) + m.bias).softmax(dim=-1)
    return F.dropout(weights, p=0.4, training=m.training).matmul(v)


@functional(
    "inductor-17-key-padding-dropout-training", bshd,
    lambda m, a, kw: reference_attention(*(t.transpose(1, 2) for t in a), scale=1 / 3.0, mask=tril_padding_keep(BATCH, SEQ)),
    {"inductor:17", "key-padding", "dropout-train"}, form="matmul", masked=True, training=True, dropout=0.4,
)
def key_padding_dropout(m, query, key, value):
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, keys = q.size(0), k.size(-2)
    keep = torch.ones(batch, keys, dtype=torch.bool).tril(diagonal=0)
    scores = torch.matmul(q, k.transpose(-2, -1)) / 3.0
    scores = scores.masked_fill((keep == 0).view((batch, 1, 1, keys)).expand_as(scores), -float("inf"))
    weights = F.dropout(F.softmax(scores, dim=-1), p=0.4, training=m.training, inplace=False)
    return torch.matmul(weights, v)


def gpt2_inputs():
    return (*bshd(), causal_keep(SEQ, SEQ))


def gpt2_reference(m, args, kwargs):
    query, key, value, keep = args
    out = reference_attention(*(t.permute(0, 2, 1, 3) for t in (query, key, value)), mask=keep)
    return out, key, value


@functional(
    "inductor-18-gpt2-where-finfo-min", gpt2_inputs, gpt2_reference,
    {"inductor:18", "k-permute", "scale-tensor", "finfo-min", "mask-bool-where"}, form="matmul", masked=True,
)
def gpt2_where_finfo_min(m, query, key, value, causal_mask):
    query, key, value = (t.permute([0, 2, 1, 3]) for t in (query, key, value))
    scores = torch.matmul(query, key.permute(0, 1, 3, 2))
    scores = scores.div(torch.full((), math.sqrt(value.size(-1)), dtype=query.dtype, device=query.device))
    fill = torch.full((), torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
    scores = torch.where(causal_mask, scores, fill)
    out = F.dropout(scores.softmax(dim=-1), 0.0).matmul(value)
    return out, key.permute([0, 2, 1, 3]), value.permute([0, 2, 1, 3])


def causal_and_bias_inputs():
    return (*bhsd(), causal_keep(SEQ, SEQ), torch.randn(SEQ, SEQ))


def causal_and_bias_reference(m, args, kwargs):
    q, k, v, keep, bias = args
    return reference_attention(q, k, v, mask=bias.double().masked_fill(~keep, float("-inf")))


@functional(
    "inductor-19-where-plus-bias-type", causal_and_bias_inputs, causal_and_bias_reference,
    {"inductor:19", "mask-bool-where", "mask-float", "cast", "dropout-eval", "k-permute"}, form="matmul",
    masked=True,
)
def where_plus_bias(m, q, k, v, causal_mask, bias):
    scores = torch.matmul(q, k.permute(0, 1, 3, 2))
    scores = scores.div(torch.full((), math.sqrt(v.size(-1)), dtype=scores.dtype, device=scores.device))
    fill = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
    scores = torch.where(causal_mask, scores, fill) + bias
    weights = scores.softmax(dim=-1).type(v.dtype)
    return F.dropout(weights, p=0.4, training=m.training, inplace=False).matmul(v)


@functional(
    "inductor-20-prescaled-query-key-padding", bshd,
    lambda m, a, kw: reference_attention(*(t.transpose(1, 2) for t in a), mask=tril_padding_keep(BATCH, SEQ)),
    {"inductor:20", "scale-q", "key-padding", "dropout-eval"}, form="matmul", masked=True,
)
def prescaled_query_key_padding(m, query, key, value):
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, keys = q.size(0), k.size(-2)
    q = q / math.sqrt(q.size(-1))
    scores = torch.matmul(q, k.transpose(-2, -1))
    keep = torch.ones(batch, keys, dtype=torch.bool).tril(diagonal=0)
    scores = scores.masked_fill((keep == 0).view((batch, 1, 1, keys)).expand_as(scores), -float("inf"))
    weights = F.dropout(F.softmax(scores, dim=-1), p=0.4, training=m.training)
    return torch.matmul(weights, v)


def bshd_with_bias(*bias_shape):
    return lambda: (*bshd(), torch.randn(*bias_shape))


def bshd_bias_reference(m, args, kwargs):
    query, key, value, bias = args
    return reference_attention(*(t.transpose(1, 2) for t in (query, key, value)), scale=1.0, mask=bias)


@functional(
    "inductor-21-inplace-bias-float-softmax-type", bshd_with_bias(1, 1, 1, SEQ), bshd_bias_reference,
    {"inductor:21", "mask-inplace", "mask-float", "no-scale", "cast", "k-permute"}, form="matmul",
    masked=True,
)
def inplace_bias_float_softmax(m, query, key, value, bias):
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scores = torch.matmul(query, key.permute(0, 1, 3, 2))
    scores += bias
    return scores.float().softmax(dim=-1).type(value.dtype).matmul(value)


def strided_bias_inputs():
    return (*bshd(), torch.randn(1, 1, SEQ, SEQ).transpose(2, 3))


def returns_key_value_reference(m, args, kwargs):
    query, key, value, bias = args
    out = reference_attention(*(t.transpose(1, 2) for t in (query, key, value)), scale=1.0, mask=bias)
    return out, key.transpose(1, 2), value.transpose(1, 2)


@functional(
    "inductor-22-strided-bias-returns-key-value", strided_bias_inputs, returns_key_value_reference,
    {"inductor:22", "mask-inplace", "mask-float"}, form="matmul", masked=True,
)
def strided_bias_returns_key_value(m, query, key, value, bias):
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scores = torch.matmul(query, key.permute(0, 1, 3, 2))
    scores += bias
    return scores.float().softmax(dim=-1).type(value.dtype).matmul(value), key, value


def zero_bias_reference(m, args, kwargs):
    query, key, value = args
    out = reference_attention(*(t.transpose(1, 2) for t in args), scale=1.0)
    return out, key.transpose(1, 2), value.transpose(1, 2)


@functional(
    "inductor-23-zero-bias-made-inside", bshd, zero_bias_reference, {"inductor:23", "mask-inplace"},
    form="matmul",
)
def zero_bias_made_inside(m, query, key, value):
    bias = torch.full((1, 1, 1, SEQ), 0.0, device=query.device)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scores = torch.matmul(query, key.permute(0, 1, 3, 2))
    scores += bias
    return scores.float().softmax(dim=-1).type(value.dtype).matmul(value), key, value


def bmm_views_inputs():
    return (*bhsd(), torch.randn(1, 1, SEQ, SEQ))


@functional(
    "inductor-24-bmm-view-round-trip-bias", bmm_views_inputs,
    lambda m, a, kw: reference_attention(*a[:3], scale=1.0, mask=a[3]),
    {"inductor:24", "bmm", "mask-float", "no-scale"}, form="bmm", masked=True,
)
def bmm_view_round_trip(m, query, key, value, bias):
    batch, heads, seq, dim = query.shape
    q = query.view(batch * heads, seq, dim)
    k = key.reshape(batch * heads, seq, dim)
    v = value.reshape(batch * heads, seq, dim)
    scores = torch.bmm(q, k.transpose(1, 2)).view(batch, heads, seq, seq) + bias
    weights = F.softmax(scores.view(batch * heads, seq, seq), dim=-1)
    return torch.bmm(weights, v).view(batch, heads, seq, dim)


@functional(
    "inductor-25-inplace-bias-dropout-training", bshd_with_bias(1, 1, 1, SEQ), bshd_bias_reference,
    {"inductor:25", "mask-inplace", "dropout-train"}, form="matmul", masked=True, training=True, dropout=0.1,
)
def inplace_bias_dropout(m, query, key, value, bias):
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scores = torch.matmul(query, key.permute(0, 1, 3, 2))
    scores += bias
    weights = scores.float().softmax(dim=-1).type(value.dtype)
    return F.dropout(weights, p=0.1, training=m.training).matmul(value)


@functional(
    "inductor-26-inplace-bias-dropout-returns-key-value", bshd_with_bias(1, 1, 1, SEQ),
    lambda m, a, kw: (bshd_bias_reference(m, a, kw), a[1].transpose(1, 2), a[2].transpose(1, 2)),
    {"inductor:26", "mask-inplace", "dropout-eval"}, form="matmul", masked=True,
)
def inplace_bias_dropout_returns_key_value(m, query, key, value, bias):
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scores = torch.matmul(query, key.permute(0, 1, 3, 2))
    scores += bias
    weights = F.dropout(scores.float().softmax(dim=-1).type(value.dtype), p=0.1, training=m.training)
    return weights.matmul(value), key, value


@functional(
    "inductor-27-half-zero-bias-dropout-returns-key-value", lambda: bshd(dtype=torch.float16),
    lambda m, a, kw: (reference_attention(*(t.transpose(1, 2) for t in a), scale=1.0), a[1].transpose(1, 2), a[2].transpose(1, 2)),
    {"inductor:27", "mask-inplace", "half", "cast"}, form="matmul", rtol=5e-3, dtype=None,
)
def half_zero_bias_dropout(m, query, key, value):
    bias = torch.full((1, 1, 1, SEQ), 0.0, dtype=torch.half, device=query.device)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scores = torch.matmul(query, key.permute(0, 1, 3, 2))
    scores += bias
    weights = F.dropout(scores.float().softmax(dim=-1).type(value.dtype), p=0.1, training=m.training)
    return weights.matmul(value), key, value


def checkpointed_attention(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(math.sqrt(k.shape[-1])).softmax(dim=-1).matmul(v)


@functional(
    "inductor-checkpoint-wrapped", bhsd, ref_bhsd(), {"inductor:checkpoint", "checkpoint"}, form="matmul",
)
def checkpoint_wrapped(m, q, k, v):
    return torch.utils.checkpoint.checkpoint(checkpointed_attention, q, k, v, use_reentrant=False)


# --- matmul spellings, layouts, K transposes ---------------------------------------------------


@functional(
    "at-operator-mT-nondefault-scale", bhsd, ref_bhsd(scale=0.3),
    {"matmul-op", "k-mT", "scale-mul", "non-default-scale"}, form="matmul",
)
def at_operator_mT(m, q, k, v):
    return torch.softmax((q @ k.mT) * 0.3, dim=-1) @ v


@functional(
    "tensor-matmul-zero-dim-tensor-scale", bhsd, ref_bhsd(scale=0.25),
    {"Tensor.matmul", "scale-tensor", "scale-mul"}, buffers=lambda: {"scale": torch.tensor(0.25)},
    form="matmul",
)
def tensor_matmul_tensor_scale(m, q, k, v):
    return (q.matmul(k.transpose(2, 3)) * m.scale).softmax(-1).matmul(v)


@functional("einsum-bhsd", bhsd, ref_bhsd(), {"einsum", "bhsd"}, form="einsum")
def einsum_bhsd(m, q, k, v):
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(dim=-1), v)


@functional(
    "einsum-bshd-in-and-out", bshd, lambda m, a, kw: ref_bshd()(m, a, kw).transpose(1, 2), {"einsum", "bshd"},
    form="einsum",
)
def einsum_bshd(m, q, k, v):
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", F.softmax(scores, dim=-1), v)


@functional("bmm-reshape-round-trip", bhsd, ref_bhsd(), {"bmm", "reshape-round-trip"}, form="bmm")
def bmm_reshape_round_trip(m, q, k, v):
    batch, heads, seq, dim = q.shape
    q3, k3, v3 = (t.reshape(batch * heads, t.shape[2], dim) for t in (q, k, v))
    scores = torch.bmm(q3, k3.transpose(1, 2)) * dim**-0.5
    weights = scores.view(batch, heads, seq, -1).softmax(dim=-1).reshape(batch * heads, seq, -1)
    return torch.bmm(weights, v3).view(batch, heads, seq, dim)


@functional("bshd-k-permuted-straight-to-keys-last", bshd, ref_bshd(), {"bshd", "k-permute"}, form="matmul")
def k_permuted_straight(m, query, key, value):
    scores = query.permute(0, 2, 1, 3) @ key.permute(0, 2, 3, 1)
    weights = (scores / math.sqrt(query.shape[-1])).softmax(dim=-1)
    return weights @ value.permute(0, 2, 1, 3)


@functional("no-scale-at-all", bhsd, ref_bhsd(scale=1.0), {"no-scale", "matmul-op"}, form="matmul")
def no_scale(m, q, k, v):
    return (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v


@functional(
    "zero-dim-tensor-divisor-buffer", bhsd, ref_bhsd(scale=0.25), {"scale-tensor", "scale-div"},
    buffers=lambda: {"temperature": torch.tensor(4.0)}, form="matmul",
)
def tensor_divisor(m, q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / m.temperature, dim=-1) @ v


@functional("key-prescaled-only", bhsd, ref_bhsd(), {"scale-k"}, form="matmul")
def key_prescaled(m, q, k, v):
    k = k * k.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


# --- masks ------------------------------------------------------------------------------------


@functional(
    "float-mask-on-left-batch-broadcast", lambda: (*bhsd(), torch.randn(BATCH, 1, 1, SEQ)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3]), {"mask-float", "mask-left"}, form="matmul",
    masked=True,
)
def float_mask_on_left(m, q, k, v, bias):
    return torch.softmax(bias + q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


@functional(
    "float-mask-2d", lambda: (*bhsd(), torch.randn(SEQ, SEQ)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3]), {"mask-float"}, form="matmul", masked=True,
)
def float_mask_2d(m, q, k, v, bias):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return (scores + bias).softmax(dim=-1) @ v


@functional(
    "float-mask-full-shape-add-method", lambda: (*bhsd(), torch.randn(BATCH, HEADS, SEQ, SEQ)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3]), {"mask-float"}, form="matmul", masked=True,
)
def float_mask_full(m, q, k, v, bias):
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.add(bias).softmax(dim=-1), v)


@functional(
    "bool-mask-masked-fill", lambda: (*bhsd(), bool_keep(BATCH, 1, SEQ, SEQ)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3]), {"mask-bool-masked_fill"}, form="matmul",
    masked=True,
)
def bool_mask_masked_fill(m, q, k, v, keep):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v


@functional(
    "bool-mask-where", lambda: (*bhsd(), bool_keep(1, 1, SEQ, SEQ)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3]), {"mask-bool-where"}, form="matmul", masked=True,
)
def bool_mask_where(m, q, k, v, keep):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return torch.where(keep, scores, float("-inf")).softmax(dim=-1) @ v


@functional(
    "bool-mask-added", lambda: (*bhsd(), bool_keep(BATCH, 1, SEQ, SEQ)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3].float()), {"mask-bool-added"}, form="matmul",
    masked=True,
)
def bool_mask_added(m, q, k, v, flags):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return (scores + flags).softmax(dim=-1) @ v


@functional(
    "causal-triu-masked-fill", bhsd, ref_bhsd(causal=True), {"causal-triu", "mask-bool-masked_fill"},
    form="matmul", masked=True,
)
def causal_triu(m, q, k, v):
    future = torch.triu(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device), diagonal=1)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


class DistilBertStyleAttention(nn.Module):
    """Key-padding mask as (mask == 0).view(...).expand_as(scores), filled with finfo.min."""

    def __init__(self) -> None:
        super().__init__()
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape

        def shape(t):
            return t.view(batch, -1, HEADS, HEAD_DIM).transpose(1, 2)

        q = shape(self.q_lin(x)) / math.sqrt(HEAD_DIM)
        k, v = shape(self.k_lin(x)), shape(self.v_lin(x))
        scores = torch.matmul(q, k.transpose(2, 3))
        padded = (mask == 0).view(batch, 1, 1, seq).expand_as(scores)
        scores = scores.masked_fill(padded, torch.tensor(torch.finfo(scores.dtype).min))
        weights = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(weights, v).transpose(1, 2).contiguous().view(batch, -1, WIDTH)
        return self.out_lin(context)


def distilbert_reference(m, args, kwargs):
    x, mask = args
    q, k, v = (split_heads(linear64(x, lin), HEADS) for lin in (m.q_lin, m.k_lin, m.v_lin))
    out = reference_attention(q, k, v, mask=mask.bool()[:, None, None, :])
    return linear64(merge_heads(out), m.out_lin).float()


module_idiom(
    "distilbert-key-padding-finfo-min",
    lambda: (DistilBertStyleAttention(), (torch.randn(BATCH, SEQ, WIDTH), key_padding_keep().long()), {}),
    distilbert_reference, {"key-padding", "finfo-min", "mask-bool-masked_fill", "dropout-eval"},
    form="matmul", masked=True,
)


class BertStyleAttention(nn.Module):
    """BERT's extended mask: (1 − mask) · finfo.min added to the scores; mask passed by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (split_heads(lin(hidden_states), HEADS) for lin in (self.query, self.key, self.value))
        extended = (1.0 - attention_mask[:, None, None, :].to(hidden_states.dtype)) * torch.finfo(hidden_states.dtype).min
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HEAD_DIM) + extended
        return merge_heads(torch.matmul(nn.functional.softmax(scores, dim=-1), v))


def bert_reference(m, args, kwargs):
    q, k, v = (split_heads(linear64(args[0], lin), HEADS) for lin in (m.query, m.key, m.value))
    keep = kwargs["attention_mask"].bool()[:, None, None, :]
    return merge_heads(reference_attention(q, k, v, mask=keep)).float()


module_idiom(
    "bert-extended-mask-keyword",
    lambda: (BertStyleAttention(), (torch.randn(BATCH, SEQ, WIDTH),), {"attention_mask": key_padding_keep().long()}),
    bert_reference, {"finfo-min", "mask-float", "key-padding", "keyword-input"}, form="matmul", masked=True,
)


# --- casts, clone, dropout ---------------------------------------------------------------------


@functional("softmax-dtype-argument", bhsd, ref_bhsd(), {"cast"}, form="matmul")
def softmax_dtype_argument(m, q, k, v):
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


@functional("softmax-float-type-as", bhsd, ref_bhsd(scale=1.0), {"cast", "no-scale"}, form="matmul")
def softmax_float_type_as(m, q, k, v):
    scores = torch.matmul(q, k.transpose(3, 2))
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(scores), v)


class DropoutModuleAttention(nn.Module):
    """timm-style attention with an nn.Dropout on the weights."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.attn_drop = nn.Dropout(p)

    def forward(self, q, k, v):
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return self.attn_drop(weights.softmax(dim=-1)) @ v


module_idiom(
    "dropout-module-eval", lambda: (DropoutModuleAttention(0.25), bhsd(), {}), ref_bhsd(),
    {"dropout-eval", "scale-q"}, form="matmul",
)
module_idiom(
    "dropout-module-training", lambda: (DropoutModuleAttention(0.25), bhsd(), {}), ref_bhsd(),
    {"dropout-train", "scale-q"}, form="matmul", training=True, dropout=0.25,
)


# --- grouped-query attention and cross-attention ----------------------------------------------


def gqa_inputs():
    return bhsd(heads=GQA_HEADS, kv_heads=GQA_KV_HEADS)


GQA_SHAPE = {"H": GQA_HEADS, "Hkv": GQA_KV_HEADS}


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Llama's repeat_kv: (B, Hkv, M, d) → (B, Hkv·groups, M, d)."""
    batch, kv_heads, keys, dim = x.shape
    return x[:, :, None, :, :].expand(batch, kv_heads, groups, keys, dim).reshape(batch, kv_heads * groups, keys, dim)


@functional(
    "gqa-llama-repeat-kv", gqa_inputs, ref_bhsd(), {"gqa-repeat_kv", "cast"}, form="matmul", shape=GQA_SHAPE,
)
def gqa_llama(m, q, k, v):
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


@functional(
    "gqa-unsqueeze-expand-reshape", gqa_inputs, ref_bhsd(), {"gqa-expand"}, form="matmul", shape=GQA_SHAPE,
)
def gqa_expand(m, q, k, v):
    groups = q.shape[1] // k.shape[1]
    k = k.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(q.shape[0], -1, k.shape[2], k.shape[3])
    v = v.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


@functional(
    "gqa-repeat-interleave", gqa_inputs, ref_bhsd(), {"gqa-repeat_interleave"}, form="matmul",
    shape=GQA_SHAPE,
)
def gqa_repeat_interleave(m, q, k, v):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), torch.repeat_interleave(v, groups, dim=1)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


class CrossAttention(nn.Module):
    """Queries from x (N tokens), keys and values from a context of another length and width."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(WIDTH, WIDTH, bias=False)
        self.to_k = nn.Linear(CONTEXT_WIDTH, WIDTH, bias=False)
        self.to_v = nn.Linear(CONTEXT_WIDTH, WIDTH, bias=False)
        self.to_out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x, context):
        q = split_heads(self.to_q(x), HEADS)
        k, v = split_heads(self.to_k(context), HEADS), split_heads(self.to_v(context), HEADS)
        weights = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(dim=-1)
        return self.to_out(merge_heads(weights @ v))


def cross_reference(m, args, kwargs):
    x, context = args
    q = split_heads(linear64(x, m.to_q), HEADS)
    k, v = split_heads(linear64(context, m.to_k), HEADS), split_heads(linear64(context, m.to_v), HEADS)
    return linear64(merge_heads(reference_attention(q, k, v)), m.to_out).float()


def cross_inputs():
    return (torch.randn(BATCH, SEQ, WIDTH), torch.randn(BATCH, KEYS, CONTEXT_WIDTH))


module_idiom(
    "cross-attention-projected", lambda: (CrossAttention(), cross_inputs(), {}), cross_reference, {"cross"},
    form="matmul", shape={"N": SEQ, "M": KEYS},
)


class DiffusersStyleAttention(nn.Module):
    """diffusers' AttnProcessor: heads folded into the batch, scores by baddbmm(alpha=scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(WIDTH, WIDTH, bias=False)
        self.to_k = nn.Linear(CONTEXT_WIDTH, WIDTH, bias=False)
        self.to_v = nn.Linear(CONTEXT_WIDTH, WIDTH, bias=False)
        self.to_out = nn.Linear(WIDTH, WIDTH)
        self.scale = HEAD_DIM**-0.5

    @staticmethod
    def head_to_batch_dim(x):
        batch, seq, width = x.shape
        return x.reshape(batch, seq, HEADS, width // HEADS).permute(0, 2, 1, 3).reshape(batch * HEADS, seq, width // HEADS)

    @staticmethod
    def batch_to_head_dim(x):
        batch_heads, seq, dim = x.shape
        return x.reshape(batch_heads // HEADS, HEADS, seq, dim).permute(0, 2, 1, 3).reshape(batch_heads // HEADS, seq, HEADS * dim)

    def forward(self, x, context, attention_mask=None):
        q = self.head_to_batch_dim(self.to_q(x))
        k, v = self.head_to_batch_dim(self.to_k(context)), self.head_to_batch_dim(self.to_v(context))
        if attention_mask is None:
            baddbmm_input, beta = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device), 0
        else:
            baddbmm_input, beta = attention_mask, 1
        scores = torch.baddbmm(baddbmm_input, q, k.transpose(-1, -2), beta=beta, alpha=self.scale)
        weights = scores.softmax(dim=-1)
        return self.to_out(self.batch_to_head_dim(torch.bmm(weights, v)))


def diffusers_reference(m, args, kwargs):
    x, context = args
    q = split_heads(linear64(x, m.to_q), HEADS)
    k, v = split_heads(linear64(context, m.to_k), HEADS), split_heads(linear64(context, m.to_v), HEADS)
    mask = kwargs.get("attention_mask")
    mask = None if mask is None else mask.reshape(BATCH, HEADS, 1, -1)
    return linear64(merge_heads(reference_attention(q, k, v, mask=mask)), m.to_out).float()


def diffusers_padding_mask():
    """diffusers' prepared mask: (B·H, 1, M) with −10000 on padded context tokens."""
    bias = torch.zeros(BATCH, 1, KEYS)
    bias[1, :, 9:] = -10000.0
    return bias.repeat_interleave(HEADS, dim=0)


module_idiom(
    "diffusers-baddbmm-beta-zero-cross", lambda: (DiffusersStyleAttention(), cross_inputs(), {}),
    diffusers_reference, {"baddbmm", "cross", "scale-alpha"}, form="baddbmm", shape={"N": SEQ, "M": KEYS},
)
module_idiom(
    "diffusers-baddbmm-mask-as-input",
    lambda: (DiffusersStyleAttention(), cross_inputs(), {"attention_mask": diffusers_padding_mask()}),
    diffusers_reference, {"baddbmm", "cross", "mask-float", "keyword-input"}, form="baddbmm", masked=True,
    shape={"N": SEQ, "M": KEYS},
)


# --- Q, K, V from one fused projection ----------------------------------------------------------


class FusedQKV(nn.Module):
    """One Linear makes q, k and v; subclasses differ in how they are separated."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.attn_drop = nn.Dropout(0.1)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        return self.proj(merge_heads(out))


class FusedUnbind(FusedQKV):
    """timm ViT: reshape to (3, B, H, N, d) and unbind."""

    def forward(self, x):
        batch, seq, width = x.shape
        qkv = self.qkv(x).reshape(batch, seq, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * HEAD_DIM**-0.5
        weights = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
        return self.finish(weights @ v)


class FusedChunk(FusedQKV):
    """GPT-2: chunk the last dim, divide by a 0-dim tensor."""

    def forward(self, x):
        q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], HEAD_DIM**0.5, dtype=x.dtype, device=x.device)
        return self.finish(torch.matmul(scores.softmax(dim=-1), v))


class FusedSplit(FusedQKV):
    """split(width, dim=2), then (B, N, H, d) permuted to (B, H, N, d)."""

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = (t.reshape(batch, seq, HEADS, HEAD_DIM).permute(0, 2, 1, 3) for t in self.qkv(x).split(width, dim=2))
        weights = F.softmax(torch.matmul(q, k.permute(0, 1, 3, 2)) * HEAD_DIM**-0.5, dim=-1)
        return self.finish(weights @ v)


class FusedIndex(FusedQKV):
    """Index qkv[0], qkv[1], qkv[2]; the scale split between q and k."""

    def forward(self, x):
        batch, seq, width = x.shape
        qkv = self.qkv(x).reshape(batch, seq, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = q * HEAD_DIM**-0.25, k * HEAD_DIM**-0.25
        return self.finish((q @ k.mT).softmax(dim=-1) @ v)


def fused_reference(m, args, kwargs):
    q, k, v = (split_heads(t, HEADS) for t in linear64(args[0], m.qkv).chunk(3, dim=-1))
    return linear64(merge_heads(reference_attention(q, k, v)), m.proj).float()


for fused_class, tags in (
    (FusedUnbind, {"fused-unbind", "scale-q", "dropout-eval"}),
    (FusedChunk, {"fused-chunk", "scale-tensor", "scale-div"}),
    (FusedSplit, {"fused-split", "k-permute"}),
    (FusedIndex, {"fused-index", "scale-q", "scale-k", "k-mT"}),
):
    module_idiom(
        f"fused-qkv-{fused_class.__name__.removeprefix('Fused').lower()}",
        lambda fused_class=fused_class: (fused_class(), (torch.randn(BATCH, SEQ, WIDTH),), {}),
        fused_reference, tags, form="matmul",
    )


# --- softmax written out by hand ------------------------------------------------------------------


@functional("manual-softmax-amax", bhsd, ref_bhsd(), {"manual-softmax"}, form="manual-softmax")
def manual_softmax_amax(m, q, k, v):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    exps = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (exps / exps.sum(dim=-1, keepdim=True)) @ v


@functional(
    "manual-softmax-max-values", bhsd, ref_bhsd(scale=1.0), {"manual-softmax", "no-scale"},
    form="manual-softmax",
)
def manual_softmax_max_values(m, q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2))
    exps = (scores - scores.max(dim=-1, keepdim=True)[0]).exp()
    return torch.matmul(exps.div(torch.sum(exps, dim=-1, keepdim=True)), v)


@functional("manual-softmax-at-operator-no-scale", bhsd, ref_bhsd(scale=1.0), {"manual-softmax", "matmul-op", "no-scale"}, form="manual-softmax")
def manual_softmax_at_operator(m, q, k, v):
    scores = q @ k.transpose(-2, -1)
    exps = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (exps / exps.sum(dim=-1, keepdim=True)) @ v


# --- scaled_dot_product_attention ---------------------------------------------------------------


@functional("sdpa-plain", bhsd, ref_bhsd(), {"sdpa"}, form="sdpa")
def sdpa_plain(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@functional(
    "sdpa-float-mask", lambda: (*bhsd(), torch.randn(BATCH, 1, SEQ, SEQ)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3]), {"sdpa", "sdpa-mask"}, form="sdpa", masked=True,
)
def sdpa_float_mask(m, q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@functional(
    "sdpa-bool-mask-cross", lambda: (*bhsd(m=KEYS), bool_keep(1, 1, SEQ, KEYS)),
    lambda m, a, kw: reference_attention(*a[:3], mask=a[3]), {"sdpa", "sdpa-mask", "cross"}, form="sdpa",
    masked=True, shape={"N": SEQ, "M": KEYS},
)
def sdpa_bool_mask(m, q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@functional("sdpa-is-causal", bhsd, ref_bhsd(causal=True), {"sdpa", "sdpa-causal"}, form="sdpa", causal=True)
def sdpa_is_causal(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@functional("sdpa-scale", bhsd, ref_bhsd(scale=0.2), {"sdpa", "sdpa-scale", "non-default-scale"}, form="sdpa")
def sdpa_scale(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.2)


@functional("sdpa-enable-gqa", gqa_inputs, ref_bhsd(), {"sdpa", "sdpa-gqa"}, form="sdpa", shape=GQA_SHAPE)
def sdpa_gqa(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@functional("sdpa-dropout-eval", bshd, ref_bshd(), {"sdpa", "dropout-eval", "bshd"}, form="sdpa")
def sdpa_dropout_eval(m, query, key, value):
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if m.training else 0.0)


@functional(
    "sdpa-dropout-training", bhsd, ref_bhsd(), {"sdpa", "dropout-train"}, form="sdpa", training=True,
    dropout=0.1,
)
def sdpa_dropout_training(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if m.training else 0.0)


# --- flex_attention (torch.nn.attention.flex_attention) ------------------------------------------


def _flex_alibi_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functional("flex-plain", bhsd, ref_bhsd(), {"flex"}, form="flex")
def flex_plain(m, q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v)


def _flex_alibi_reference(m, args, kwargs):
    q = args[0]
    n = q.shape[-2]
    positions = torch.arange(n)
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(GQA_HEADS)]).view(GQA_HEADS, 1, 1)
    bias = slopes * (positions[None, :] - positions[:, None]).double()
    return reference_attention(*args[:3], mask=bias.masked_fill(~causal_keep(n, n), -math.inf))


@functional("flex-block-mask-alibi-gqa", gqa_inputs, _flex_alibi_reference, {"flex", "flex-block-mask", "flex-score-mod"},
            form="flex", causal=True, masked=True, shape=GQA_SHAPE)
def flex_block_mask_alibi(m, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(q.shape[1])])
    block_mask = create_block_mask(_flex_alibi_causal, None, None, q.shape[-2], k.shape[-2], device=q.device)
    return flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + slopes[h] * (kv_idx - q_idx),
                          block_mask=block_mask, enable_gqa=True)


# --- torch.nn modules -----------------------------------------------------------------------------


class MultiheadBlock(nn.Module):
    """nn.MultiheadAttention as self-attention; returned weights (if any) are discarded."""

    def __init__(self, batch_first: bool, need_weights: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        out, _ = self.mha(x, x, x, need_weights=self.need_weights, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return out


def mha_reference64(mha: nn.MultiheadAttention, x: torch.Tensor, *, batch_first: bool, key_padding_mask=None, attn_mask=None) -> torch.Tensor:
    """nn.MultiheadAttention self-attention in float64 (masks: True = masked, or additive)."""
    x = x.double() if batch_first else x.double().transpose(0, 1)
    heads = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.double().chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.double().chunk(3)
    q, k, v = (split_heads(F.linear(x, w, b), heads) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    bias = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.float64)
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        bias = bias.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else bias + attn_mask.double()
    out = F.linear(merge_heads(reference_attention(q, k, v, mask=bias)), mha.out_proj.weight.double(), mha.out_proj.bias.double())
    return out if batch_first else out.transpose(0, 1)


def mha_reference(m, args, kwargs):
    x = args[0]
    return mha_reference64(m.mha, x, batch_first=m.mha.batch_first, **kwargs).to(x.dtype)


module_idiom(
    "mha-need-weights",
    lambda: (MultiheadBlock(batch_first=True, need_weights=True), (torch.randn(BATCH, SEQ, WIDTH),), {}),
    mha_reference, {"mha", "mha-need-weights"}, form="mha",
)
module_idiom(
    "mha-no-weights-sequence-first",
    lambda: (MultiheadBlock(batch_first=False, need_weights=False), (torch.randn(SEQ, BATCH, WIDTH),), {}),
    mha_reference, {"mha", "mha-no-weights"}, form="mha",
)
module_idiom(
    "mha-key-padding-mask",
    lambda: (MultiheadBlock(batch_first=True, need_weights=False), (torch.randn(BATCH, SEQ, WIDTH),), {"key_padding_mask": ~key_padding_keep()}),
    mha_reference, {"mha", "mha-key-padding", "key-padding"}, form="mha", masked=True,
)
module_idiom(
    "mha-causal-attn-mask",
    lambda: (MultiheadBlock(batch_first=True, need_weights=True), (torch.randn(BATCH, SEQ, WIDTH),), {"attn_mask": ~causal_keep(SEQ, SEQ)}),
    mha_reference, {"mha", "mha-attn-mask"}, form="mha", masked=True,
)
module_idiom(
    "mha-float-attn-mask",
    lambda: (MultiheadBlock(batch_first=False, need_weights=False), (torch.randn(SEQ, BATCH, WIDTH),), {"attn_mask": torch.randn(SEQ, SEQ)}),
    mha_reference, {"mha", "mha-attn-mask", "mask-float"}, form="mha", masked=True,
)


def encoder_layer(norm_first: bool, frozen: bool) -> nn.TransformerEncoderLayer:
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, dim_feedforward=2 * WIDTH, dropout=0.0, batch_first=True, norm_first=norm_first)
    return layer.requires_grad_(not frozen)


def encoder_layer_reference(layer, args, kwargs):
    x = args[0].double()

    def norm(ln, t):
        return F.layer_norm(t, ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)

    def attend(t):
        return mha_reference64(layer.self_attn, t, batch_first=True)

    def feed_forward(t):
        return linear64(F.relu(linear64(t, layer.linear1)), layer.linear2)

    if layer.norm_first:
        h = x + attend(norm(layer.norm1, x))
        out = h + feed_forward(norm(layer.norm2, h))
    else:
        h = norm(layer.norm1, x + attend(x))
        out = norm(layer.norm2, h + feed_forward(h))
    return out.float()


module_idiom(
    "encoder-layer-fast-path",
    lambda: (encoder_layer(norm_first=False, frozen=True), (torch.randn(BATCH, SEQ, WIDTH),), {}),
    encoder_layer_reference, {"encoder-layer-fastpath"}, no_grad=True,
)
module_idiom(
    "encoder-layer-slow-path-norm-first",
    lambda: (encoder_layer(norm_first=True, frozen=False), (torch.randn(BATCH, SEQ, WIDTH),), {}),
    encoder_layer_reference, {"encoder-layer"},
)

IDIOMS: dict[str, Idiom] = {idiom.name: idiom for idiom in CATALOGUE}
assert len(IDIOMS) == len(CATALOGUE), "idiom names must be unique"
