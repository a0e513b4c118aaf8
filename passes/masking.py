"""How a site's original code masks its scores, and running any variant under that masking.

The detector reads masks as terms (adds and fills); `Masking` is their meaning in one record, in
the form attnopt's exact op takes, and knows what the original gives on rows where every key is
blocked. `run_attention` hands it to a variant: the exact op models it fully, the reduced
variants get one plain mask and the original's answer on fully blocked rows. Logit softcapping
and attention sinks are part of the masking too (what the original does to the scores around the
softmax); only the exact op computes them, and `run_attention` refuses to drop them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from attnopt.kernels.exact_reference import repeat_kv_heads
from attnopt.numerics import MASKED_AT_OR_BELOW


@dataclasses.dataclass
class Masking:
    """What the original does to the scores, in the form attnopt's exact op takes:
    `softmax(where(fill_mask, fill_value, q kᵀ·scale) + mask)`, with `mask` (bool keep-mask or
    float, added to scores held in `score_dtype`) and, with `zero_empty_rows`, rows whose every
    score is -inf giving 0 (SDPA's rule) instead of NaN (torch.softmax's).

    softcap: the scaled scores are capped to `softcap·tanh(s / softcap)` before the fills and the
    mask (Gemma 2); None: not capped. sinks: one logit per row (broadcastable to (B, H, N, 1))
    that joins the softmax's normaliser and whose column is dropped (gpt-oss); a row whose every
    key is blocked then gives 0."""

    mask: torch.Tensor | None = None
    fill_mask: torch.Tensor | None = None
    fill_value: float = -math.inf
    score_dtype: torch.dtype | None = None
    zero_empty_rows: bool = False
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def map_masks(self, fold) -> Masking:
        """The same masking with `fold` applied to each mask tensor and the sinks (None stays None)."""
        return dataclasses.replace(self, mask=fold(self.mask), fill_mask=fold(self.fill_mask), sinks=fold(self.sinks))

    @property
    def transforms_scores(self) -> bool:
        """Whether the scores are capped or joined by sinks: what only the exact op computes."""
        return self.softcap is not None or self.sinks is not None

    def exact_arguments(self, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of attnopt's exact op for inputs of `dtype`; those at their
        defaults are left out."""
        arguments: dict[str, Any] = {"mask": self.mask}
        if self.fill_mask is not None:
            arguments.update(fill_mask=self.fill_mask, fill_value=self.fill_value)
        if self.score_dtype not in (None, dtype) and self.mask is not None and self.mask.is_floating_point():
            arguments["score_dtype"] = self.score_dtype
        if self.zero_empty_rows:
            arguments["zero_empty_rows"] = True
        if self.softcap is not None:
            arguments["softcap"] = self.softcap
        if self.sinks is not None:
            arguments["sinks"] = self.sinks
        return arguments

    def blocked(self) -> torch.Tensor | None:
        """Bool, broadcastable to the scores: True where the original never attends (filled, or
        masked by False, -inf or a value at most MASKED_AT_OR_BELOW)."""
        blocked = self.fill_mask
        if self.mask is not None:
            masked = ~self.mask if self.mask.dtype == torch.bool else self.mask <= MASKED_AT_OR_BELOW
            blocked = masked if blocked is None else blocked | masked
        return blocked

    def for_reduced_variant(self) -> torch.Tensor | None:
        """One mask for a variant that only knows bool / additive masks: fills become -inf."""
        if self.fill_mask is None:
            return self.mask
        if self.mask is None:
            return ~self.fill_mask
        if self.mask.dtype == torch.bool:
            return self.mask & ~self.fill_mask
        return self.mask.masked_fill(self.fill_mask, -math.inf)

    def empty_rows_as_original(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rows where every key is blocked, as the original computes them: 0 (SDPA's rule), the
        plain mean of the values (every score replaced by one finite fill), or NaN (-inf)."""
        blocked = self.blocked()
        if blocked is None:
            return out
        empty = blocked.all(dim=-1, keepdim=True)
        if self.zero_empty_rows:
            replacement = out.new_zeros(())
        elif self.fill_mask is not None and math.isfinite(self.fill_value):
            replacement = repeat_kv_heads(v.mean(dim=-2, keepdim=True), out.shape[1]).to(out.dtype)
        else:
            replacement = out.new_full((), math.nan)
        return torch.where(empty, replacement, out)


def run_attention(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masking: Masking, *,
                  scale: float, causal: bool, dropout_p: float) -> torch.Tensor:
    """Call a variant module on canonical (B, H, N, d) tensors with the site's masking.

    Attention modules that model torch's masking exactly (`exact_masking = True`: the exact
    variant) get all of it; the others get one bool/additive mask, and rows where every key is
    blocked are then set to what the original gives there, so no variant turns them into NaN
    (or a number) the original does not give. Softcapping and sinks reach only the exact op: a
    variant without `exact_masking` raises ValueError rather than drop them (the variants refuse
    such sites before: attnopt/variants/registry.py `refusal`)."""
    if getattr(attention, "exact_masking", False):
        return attention(q, k, v, scale=scale, causal=causal, dropout_p=dropout_p, **masking.exact_arguments(q.dtype))
    if masking.transforms_scores:
        what = " and ".join(name for name, on in (("softcap", masking.softcap is not None),
                                                  ("attention sinks", masking.sinks is not None)) if on)
        raise ValueError(f"{type(attention).__name__} cannot compute this site's {what}: only attnopt's exact "
                         "attention does")
    out = attention(q, k, v, mask=masking.for_reduced_variant(), scale=scale, causal=causal, dropout_p=dropout_p)
    return masking.empty_rows_as_original(out, v)
