"""Backward of the attnopt ops by autograd through their plain-PyTorch reference.

The Triton kernels are forward-only; gradients recompute the forward densely with the reference
(N×M memory, like an unfused attention) and differentiate it. Correct on every device, not fast.
Under create_graph=True the gradients are themselves differentiable: the reference is
differentiated on the saved inputs, so higher-order gradients are the reference's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def reference_gradients(
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[Any],
    needs_grad: Sequence[bool],
    grad_output: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of reference(*inputs, **kwargs) for each input flagged in needs_grad, else None.

    Grad mode on (a backward with create_graph=True): taken on the inputs themselves, keeping the
    graph, with SDPA held to its math backend (the fused CPU kernel's backward has no derivative).
    Off: on detached copies, so nothing of the recomputed forward outlives the call.
    """
    create_graph = torch.is_grad_enabled()
    backends = sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), backends:
        leaves = [
            x.detach().requires_grad_(True) if need and not create_graph else x
            for x, need in zip(inputs, needs_grad)
        ]
        out = reference(*leaves, **kwargs)
        wanted = [leaf for leaf, need in zip(leaves, needs_grad) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_output, allow_unused=True, create_graph=create_graph))
    return tuple(next(grads) if need else None for need in needs_grad)
