"""Two-stage attention through a few tokens (agents or mediators), with a per-token stage-2 bias.

The kernel op computes softmax(q Tᵀ·token_scale + b) · softmax(T kᵀ·scale + mask) v. Two
refinements need the bias b per token in stage 2 (logits q·t·token_scale + b):
- distance weighting, b = −token_scale·‖t‖²/2: the logits become −token_scale·‖q − t‖²/2 up to a
  per-query constant, so a query listens to the *nearest* tokens, not to the longest ones;
- size weighting, b += log(size): a token standing for s queries counts s times (ToMe's
  proportional attention), so merging tokens does not change how loud a cluster is.
The bias is the op's `agent_bias` argument, so q, k and the tokens reach the op as they are (no
copies) and the op stays the single place where the attention math lives.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from attnopt import costmodel
from attnopt.kernels import agent_attention, exact_attention

from .masks import key_validity, per_key_mask, valid_queries
from .shortcut import ValueShortcut
from .site import SiteInfo

EMPTY_TOKEN_PENALTY = 30.0
"""How far (in logits) an empty token sits below the token it copies: weight e⁻³⁰, i.e. none."""


def require_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError naming the parameter unless `value` is an integer ≥ minimum (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def require_real(name: str, value: Any, low: float, high: float = math.inf, *, low_closed: bool = False,
                 high_closed: bool = True) -> None:
    """Raise ValueError naming the parameter unless `value` is a finite real number in the interval."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    above = real and (low <= value if low_closed else low < value)
    if not above or not (value <= high if high_closed else value < high):
        interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed and high < math.inf else ')'}"
        raise ValueError(f"{name} must be a finite real number in {interval}, got {value!r}")


def require_offsets(name: str, offsets: Any) -> None:
    """Raise ValueError naming the parameter unless `offsets` is a tuple of distinct integers."""
    integers = isinstance(offsets, tuple) and all(
        isinstance(o, numbers.Integral) and not isinstance(o, bool) for o in offsets)
    if not integers or len(set(offsets)) != len(offsets):
        raise ValueError(f"{name} must be a tuple of distinct integer token offsets, got {offsets!r}")


def two_stage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                        bias: torch.Tensor, key_mask: torch.Tensor | None, *, scale: float,
                        token_scale: float) -> torch.Tensor:
    """softmax(q tokensᵀ·token_scale + bias) · softmax(tokens kᵀ·scale + key_mask) v.

    q (B, H, N, d); k, v (B, Hkv, M, ·); tokens (B or 1, H, n, d); bias (B or 1, H, n), kept in
    its own (fp32) precision; key_mask broadcastable to (B, H, 1, M). Returns (B, H, N, e) in
    q's dtype.
    """
    return agent_attention(q, k, v, tokens, key_mask, scale=scale, agent_scale=token_scale, agent_bias=bias)


def agent_bias(agents: torch.Tensor, sizes: torch.Tensor, token_scale: float | torch.Tensor, *, distance_weighting: bool,
               size_weighting: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-2 bias for agents of the given sizes, and the agents with empty ones replaced.

    agents (…, n, d) fp32, sizes (…, n) (0 = an agent no valid query fell into). An empty agent
    becomes a copy of the largest agent with EMPTY_TOKEN_PENALTY less bias, so it attends to
    valid keys only and gets no weight, without a -inf that would turn into NaN in half precision.
    """
    empty = sizes <= 0
    largest = sizes.argmax(-1, keepdim=True)
    twin = agents.gather(-2, largest.unsqueeze(-1).expand(*largest.shape, agents.shape[-1]))
    agents = torch.where(empty.unsqueeze(-1), twin, agents)
    bias = torch.zeros_like(sizes, dtype=agents.dtype)
    if distance_weighting:
        bias = bias - 0.5 * token_scale * agents.pow(2).sum(-1)
    if size_weighting:
        bias = bias + torch.where(empty, sizes.gather(-1, largest), sizes).clamp_min(1e-30).log()
    return agents, torch.where(empty, bias - EMPTY_TOKEN_PENALTY, bias)


def shortcut_offsets_at(offsets: tuple[int, ...], site_info: SiteInfo) -> tuple[int, ...]:
    """The V shortcut's offsets where the site uses one (self-attention only), else ()."""
    return tuple(offsets) if site_info.is_self_attention else ()


def two_stage_cost(n_tokens: costmodel.Expr, shortcut_offsets: tuple[int, ...]) -> costmodel.CostFormula:
    """The two stages through n tokens, then the V shortcut at `shortcut_offsets` (with none, the
    formula still counts the one pass over the output it always has, so predictions stay comparable)."""
    return costmodel.two_stage(n_tokens) + costmodel.value_shortcut(len(shortcut_offsets))


class TwoStageSiteAttention(nn.Module):
    """What agent and mediator site modules share: the per-key mask, the V shortcut, calibration.

    Subclasses define `reduced` (the two-stage attention itself); forward adds the shortcut
    for self-attention calls (N == M) and refuses causal calls and dropout at run time.
    """

    variant = "two-stage"

    def __init__(self, site_info: SiteInfo, shortcut_offsets: tuple[int, ...]):
        super().__init__()
        self.site_info = site_info
        offsets = shortcut_offsets_at(shortcut_offsets, site_info)
        self.shortcut = ValueShortcut(site_info.H, offsets) if offsets else None

    def reduced(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        """The two-stage attention (B, H, N, e) before the shortcut; key_mask is (B|1, H|1, 1, M)."""
        raise NotImplementedError(f"{type(self).__name__} must define reduced()")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                scale: float, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
        if causal or dropout_p > 0:
            raise ValueError(f"{self.variant} attention cannot run a causal site or attention dropout")
        key_mask = per_key_mask(mask)
        out = self.reduced(q, k, v, key_mask, scale)
        if self.shortcut is None or q.shape[2] != k.shape[2]:
            return out
        key_valid = None if key_mask is None else key_validity(key_mask)[:, :, 0, :]
        return self.shortcut(out, v, key_valid, reuse_output=True)

    @torch.no_grad()
    def calibrate(self, example: tuple, scale: float) -> None:
        """Fit the V shortcut against exact attention on example (q, k, v, mask[, exact output])
        (closed form); the exact output is computed here unless the example carries it."""
        q, k, v, mask = example[:4]
        if self.shortcut is None or q.shape[2] != k.shape[2]:
            return
        key_mask = per_key_mask(mask)
        target = example[4] if len(example) > 4 else exact_attention(q, k, v, mask, scale=scale)
        rows = valid_queries(key_mask, q.shape[0], q.shape[1], q.shape[2], True, q.device)
        key_valid = None if key_mask is None else key_validity(key_mask)[:, :, 0, :]
        self.shortcut.fit(self.reduced(q, k, v, key_mask, scale), v, key_valid, target, rows)
