"""The variants in their dense N×M matrix forms, written out independently of attnopt's code.

Each function builds the full (B, H, N, M) weight matrix a variant applies to v, so a test can
check the variant's output and also look at the weights themselves (masked keys, row sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, M, ·) → (B, H, M, ·): query head h reads kv head h // (H // Hkv)."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def two_stage_weights(q, k, tokens, sizes, key_valid, *, scale, token_scale):
    """Dense agent/mediator weights: stage-2 weights (B, H, N, n) @ stage-1 weights (B, H, n, M).

    Stage 2 is the distance- and size-weighted softmax: logits −token_scale·‖q − t‖²/2 + log size
    (equal to q·t·token_scale − token_scale·‖t‖²/2 + log size up to a per-row constant).
    """
    q, k, tokens = q.double(), expand_heads(k, q.shape[1]).double(), tokens.double()
    stage1 = (tokens @ k.transpose(-1, -2)) * scale
    if key_valid is not None:
        stage1 = stage1.masked_fill(~key_valid[:, :, None, :], float("-inf"))
    distance = (q.unsqueeze(-2) - tokens.unsqueeze(-3)).pow(2).sum(-1)
    stage2 = -0.5 * token_scale * distance + sizes.double().log().unsqueeze(-2)
    return stage2.softmax(-1) @ stage1.softmax(-1)


def linear_weights(q, k, *, feature, causal, key_valid, normalization):
    """Dense linear-attention weights (B, H, N, M) for features φ (applied to q and k as given)."""
    weights = feature(q.double()) @ expand_heads(feature(k.double()), q.shape[1]).transpose(-1, -2)
    visible = torch.ones(weights.shape[-2:], dtype=torch.bool)
    if causal:
        visible = visible.tril()
    visible = visible.expand_as(weights)
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :]
    weights = weights.masked_fill(~visible, 0)
    if normalization == "sum":
        return weights / (weights.sum(-1, keepdim=True) + 1e-6)
    count = visible.sum(-1, keepdim=True).double()
    return torch.where(visible, weights - weights.sum(-1, keepdim=True) / count + 1 / count, 0)


def apply(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights (B, H, N, M) @ v (B, Hkv, M, e) in float64."""
    return weights @ expand_heads(v, weights.shape[1]).double()


def elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def focused(power: float):
    """FLatten's focused map: y = relu(x), y^p · ‖y‖ / ‖y^p‖ (0 where y is all zero)."""
    def feature(x):
        y = torch.relu(x)
        powered = y**power
        ratio = y.norm(dim=-1, keepdim=True) / powered.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        return powered * ratio
    return feature
