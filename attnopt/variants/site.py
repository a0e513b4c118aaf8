"""The facts of one attention site: shapes, dtype, mask kind, causality, scale, token grid.

`SiteInfo` is the one immutable record of a site's facts. attnopt/analysis.py computes it once per
analysed site, from the detected match and the tensors the site really received (`facts_of`);
the variants read it to decide whether they apply (`refusal`) and how to build themselves, the
cost model prices it (`shape`, `dtype`, `fused`), and the report shows it (`Site.facts`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

PER_QUERY_MASK_KINDS = frozenset({"boolean", "additive"})
"""Mask kinds (as the detector names them) that differ between query rows in no known pattern.

"causal" is not among them: it comes with `causal=True`, which each variant judges on its own."""


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """Tokens laid out as an image: height × width patches, row-major, optionally after one class token."""

    height: int
    width: int
    has_class_token: bool = False

    @property
    def n_tokens(self) -> int:
        return self.height * self.width + int(self.has_class_token)


def infer_grid(n_tokens: int) -> TokenGrid | None:
    """The square grid that `n_tokens` spells (h·h, or 1 + h·h with a class token), or None."""
    for has_class_token in (False, True):
        side = math.isqrt(n_tokens - int(has_class_token))
        if side > 1 and side * side == n_tokens - int(has_class_token):
            return TokenGrid(side, side, has_class_token)
    return None


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """One attention site as the variants see it.

    Shapes follow the canonical layout q (B, H, N, d), k (B, Hkv, M, d), v (B, Hkv, M, e).
    mask_kind uses the detector's names: None, "key_padding" (one value per key), "causal",
    "boolean" or "additive" (values that differ per query). dropout is the attention-dropout
    probability the site applies (0 in eval mode). scale is the softmax scale (None: 1/√d).
    grid is the token layout when the caller knows it (vision models; None: variants pool 1-D,
    or infer a square grid where their config asks). device is the type of device the site runs
    on ("cpu", "cuda"), which decides the kernels. fused: the model computed this attention with
    one fused kernel call (SDPA, nn.MultiheadAttention), which is how its baseline is priced.
    softcap: c when the site caps its scaled scores to c·tanh(s / c) (Gemma 2), else None. sinks:
    the site adds attention-sink logits to its softmax's normaliser (gpt-oss). Only variants that
    declare them (`VariantSpec.supports`) stand in for such a site.
    """

    B: int
    H: int
    Hkv: int
    N: int
    M: int
    d: int
    e: int
    causal: bool = False
    mask_kind: str | None = None
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32
    scale: float | None = None
    grid: TokenGrid | None = None
    device: str = "cpu"
    fused: bool = False
    softcap: float | None = None
    sinks: bool = False

    @classmethod
    def from_shape(cls, shape: Mapping[str, int], **fields) -> SiteInfo:
        """From a report's shape dict {B, H, Hkv, N, M, d, e}; Hkv, M and e default to H, N and d."""
        return cls(B=shape["B"], H=shape["H"], Hkv=shape.get("Hkv", shape["H"]), N=shape["N"],
                   M=shape.get("M", shape["N"]), d=shape["d"], e=shape.get("e", shape["d"]), **fields)

    @property
    def shape(self) -> dict[str, int]:
        """The shape dict reports and attnopt.costmodel use: {B, H, Hkv, N, M, d, e}."""
        return {"B": self.B, "H": self.H, "Hkv": self.Hkv, "N": self.N, "M": self.M, "d": self.d, "e": self.e}

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.d**-0.5

    @property
    def is_self_attention(self) -> bool:
        """Queries and keys are read as the same tokens (N == M): a padded key marks its query as
        padding too, which the two-stage variants use to leave padded queries out of their agents."""
        return self.N == self.M

    @property
    def score_transforms(self) -> frozenset[str]:
        """What the site does to its scores beyond scaling and masking: "softcap", "sinks"."""
        return frozenset(name for name, on in (("softcap", self.softcap is not None), ("sinks", self.sinks)) if on)

    @property
    def mask_varies_per_query(self) -> bool:
        return self.mask_kind in PER_QUERY_MASK_KINDS
