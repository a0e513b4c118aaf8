"""Exact attention: the site's own softmax attention computed by attnopt's op (never refused).

Its cost formula is the cost model's softmax attention, which also prices the model's own
attention at every site (fused when the model called SDPA or MultiheadAttention).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from attnopt import costmodel
from attnopt.kernels import exact_attention

from .registry import Example, VariantSpec, register_variant
from .site import SiteInfo


@dataclasses.dataclass(frozen=True)
class ExactConfig:
    """Same function as the model's softmax attention; only the kernel changes."""


class ExactAttention(nn.Module):
    """softmax(q kᵀ·scale + mask) v, with causality, dropout and the site's masking exactly as
    the original had them (fills, the dtype masks are added in, fully masked rows, logit
    softcapping, attention sinks)."""

    exact_masking = True  # takes attnopt.masking.Masking's arguments (see attnopt.site_call)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float, causal: bool = False, dropout_p: float = 0.0, **masking) -> torch.Tensor:
        return exact_attention(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, **masking)


def _refusal(config: ExactConfig, site_info: SiteInfo) -> str | None:
    return None


def _build(config: ExactConfig, site_info: SiteInfo, example: Example | None) -> nn.Module:
    return ExactAttention()


def _cost_params(config: ExactConfig, site_info: SiteInfo) -> dict:
    """attnopt's exact op runs one fused kernel — Triton on CUDA, torch's SDPA on CPU — except
    with dropout, which runs matmul-softmax-matmul (kernels/exact.py: `_sdpa_computes`; a
    hand-written half-precision site whose scores round before a float mask also runs the
    reference, which this formula prices as fused: the kernel count measured on the built module
    corrects its per-call term)."""
    # softcap and sinks: the Triton kernel computes them on CUDA; on CPU they run the reference (SDPA computes neither)
    return {"fused": site_info.device == "cuda" or (site_info.dropout == 0 and not site_info.score_transforms)}


register_variant(VariantSpec(
    name="exact", config_type=ExactConfig, refusal=_refusal, build=_build, cost=costmodel.softmax_attention,
    cost_params=_cost_params, candidates=lambda site_info: (ExactConfig(),),
    supports=frozenset({"softcap", "sinks"})))
