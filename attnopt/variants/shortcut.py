"""The V shortcut: a per-head mix of the reduced attention's output and a few nearby tokens' values.

out_i = w₀·attention_i + Σ_o w_o·v_{i+o}   (o in `offsets`, e.g. −1, 0, +1; per head h)

Agents and mediators summarise many queries, so they blur heads that look at fixed neighbours
(BERT's previous/next-token heads, a token's own value). The shortcut gives such heads their
neighbours back at N·e cost. The weights start as (1, 0, …) — no shortcut — and `fit` sets them
by least squares against exact attention on example inputs (closed form, no training); they are
an nn.Parameter so later calibration can move them. Positions i+o outside the sequence or on a
masked key contribute nothing, so masked keys are never read. Only for self-attention (N == M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnopt.kernels.exact_reference import repeat_kv_heads


def shifted_values(values: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """(…, N, e, len(offsets)): entry i of offset o is values_{i+o}, or 0 outside the sequence."""
    n_tokens = values.shape[-2]
    shifted = []
    for offset in offsets:
        first, last = min(max(-offset, 0), n_tokens), max(n_tokens - max(offset, 0), 0)  # rows i with i+o inside
        kept = values[..., first + offset:max(last, first) + offset, :]
        shifted.append(F.pad(kept, (0, 0, first, n_tokens - first - kept.shape[-2])))
    return torch.stack(shifted, dim=-1)


class ValueShortcut(nn.Module):
    """Learnable per-head weights of the attention output and of the values at fixed offsets."""

    def __init__(self, n_heads: int, offsets: tuple[int, ...]):
        super().__init__()
        self.offsets = tuple(offsets)
        initial = torch.zeros(n_heads, 1 + len(self.offsets))
        initial[:, 0] = 1.0
        self.weights = nn.Parameter(initial)

    def features(self, attention_out: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """(B, H, N, e, 1 + len(offsets)): the attention output and the shifted values per query head.

        v (B, Hkv, N, e) is read by query head h through kv head h // (H // Hkv); key_valid
        (B or 1, H or 1, N) zeroes masked keys before shifting.
        """
        values = repeat_kv_heads(v, attention_out.shape[1]).to(attention_out.dtype)
        if key_valid is not None:
            values = values * key_valid.to(values.dtype).unsqueeze(-1)
        return torch.cat([attention_out.unsqueeze(-1), shifted_values(values, self.offsets)], dim=-1)

    def forward(self, attention_out: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
                reuse_output: bool = False) -> torch.Tensor:
        """w₀·attention_out + Σ_o w_o·v_{i+o}, as the weighted sum of `features` but without building them.

        One pass for w₀·attention_out, then one in-place multiply-add of a shifted slice of v per
        offset; query heads read their kv head's values by broadcasting, never by repeating them.
        In eager CPU inference, passes that change nothing (w₀ = 1, an offset weighted 0 in every
        head, as before calibration) are skipped; under torch.compile Inductor fuses all of them
        into one loop.
        reuse_output: the caller owns attention_out and no longer needs it: when nothing is to be
        differentiated, it is overwritten with the result instead of allocating another.
        """
        batch, n_heads, n_tokens, value_dim = attention_out.shape
        n_kv_heads = v.shape[1]
        group = n_heads // n_kv_heads
        weights = self.weights.to(attention_out.dtype)
        needs_grad = torch.is_grad_enabled() and (attention_out.requires_grad or weights.requires_grad)
        offsets, scaled = self._passes_needed(weights, needs_grad)
        if not scaled and not offsets:
            return attention_out if reuse_output else attention_out.clone()
        if not scaled:
            out = attention_out if reuse_output and not needs_grad else attention_out.clone()
        elif reuse_output and not needs_grad:
            out = attention_out.mul_(weights[:, :1, None])
        else:
            out = attention_out * weights[:, :1, None]
        out = out.contiguous()  # views below write into it
        grouped = out.view(batch, n_kv_heads, group, n_tokens, value_dim)
        values = v.to(attention_out.dtype).unsqueeze(2)  # (B, Hkv, 1, N, e)
        if key_valid is not None:
            valid = key_valid.to(values.dtype).unsqueeze(-1)  # (B|1, H|1, N, 1)
            if valid.shape[1] == 1:
                values = values * valid.unsqueeze(2)
            else:
                values = values * valid.reshape(valid.shape[0], n_kv_heads, group, n_tokens, 1)
        offset_weights = weights[:, 1:].reshape(n_kv_heads, group, len(self.offsets), 1, 1)
        for index, offset in offsets:
            first, last = max(-offset, 0), n_tokens - max(offset, 0)  # queries i with i + offset in range
            if first < last:
                grouped[..., first:last, :].addcmul_(values[..., first + offset:last + offset, :],
                                                    offset_weights[:, :, index])
        return out

    def _passes_needed(self, weights: torch.Tensor, needs_grad: bool) -> tuple[list[tuple[int, int]], bool]:
        """The (index, offset) pairs to add and whether w₀ must be applied: in eager CPU inference,
        an offset whose weight is 0 for every head is a pass that adds nothing, and w₀ = 1 for
        every head is one that multiplies by 1 (an uncalibrated shortcut is both). Reading the
        weights is free there; under torch.compile (one fused pass anyway), on other devices (a
        sync) or when gradients flow (a skipped weight still gets one), every pass runs."""
        every = list(enumerate(self.offsets))
        if needs_grad or weights.device.type != "cpu" or torch.compiler.is_compiling():
            return every, True
        values = weights.detach().tolist()  # (H, 1 + len(offsets))
        scaled = any(row[0] != 1 for row in values)
        return [(index, offset) for index, offset in every if any(row[1 + index] != 0 for row in values)], scaled

    @torch.no_grad()
    def fit(self, attention_out: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
            target: torch.Tensor, query_valid: torch.Tensor, ridge: float = 1e-4) -> None:
        """Least-squares weights per head so the shortcut's output best matches `target` (exact).

        query_valid (B, H, N) picks the rows that count (padded queries do not). A small ridge,
        relative to the features' scale, keeps the solve stable when a feature is all zero.
        """
        features = self.features(attention_out.float(), v.float(), key_valid)
        rows = query_valid.to(features.dtype)[..., None, None]
        gram = torch.einsum("bhnef,bhneg->hfg", features * rows, features)
        moment = torch.einsum("bhnef,bhne->hf", features * rows, target.float())
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        self.weights.copy_(torch.linalg.solve(gram + ridge * scale[:, None, None] * identity, moment))
