"""Backward of the attnopt ops by autograd through their plain-PyTorch reference.

The Triton kernels are forward-only; gradients recompute the forward densely with the reference
(N×M memory, like an unfused attention) and differentiate it. Correct on every device, not fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def reference_gradients(
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[Any],
    needs_grad: Sequence[bool],
    grad_output: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of reference(*inputs, **kwargs) for each input flagged in needs_grad, else None."""
    with torch.enable_grad():
        leaves = [
            x.detach().requires_grad_(True) if need else x
            for x, need in zip(inputs, needs_grad)
        ]
        out = reference(*leaves, **kwargs)
        wanted = [leaf for leaf, need in zip(leaves, needs_grad) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_output, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs_grad)
