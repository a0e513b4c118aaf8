"""Launch choices shared by the Triton launchers: tile sizes per device, dtype names, mask layout.

Under TRITON_INTERPRET=1 (CPU) tiles are the smallest tl.dot accepts (16) to keep interpreted
runs fast; on a GPU they follow the usual FlashAttention-2 choices for the head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TRITON_DTYPES


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch resources of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def attention_tiles(device: torch.device, head_dim: int) -> Tiles:
    """Query/key tile sizes for softmax attention with this head dim on this device."""
    if device.type != "cuda":
        return Tiles(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return Tiles(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return Tiles(block_m=128, block_n=64, num_warps=8, num_stages=2)


def linear_tiles(device: torch.device, head_dim: int, value_dim: int) -> Tiles:
    """Token tile sizes for linear attention; the d×e state lives in registers."""
    if device.type != "cuda":
        return Tiles(block_m=16, block_n=16, num_warps=4, num_stages=1)
    big_state = max(head_dim, value_dim) > 64
    return Tiles(block_m=64, block_n=64, num_warps=8 if big_state else 4, num_stages=2)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'float16'; only the dtypes the templates support."""
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"Triton attention kernels support {TRITON_DTYPES}, not {dtype}")
    return str(dtype).removeprefix("torch.")


Broadcast = tuple[bool, bool, bool, bool]


def mask_layout(mask: torch.Tensor | None) -> tuple[str, Broadcast, torch.Tensor | None, tuple[int, ...]]:
    """Kind, broadcast pattern, kernel-ready tensor and strides of an attention mask.

    The mask is viewed as 4-D (missing leading dims become size 1); a size-1 dim broadcasts and
    is left out of the kernel's address arithmetic. Bool masks are reinterpreted as uint8.
    """
    if mask is None:
        return "none", (False, False, False, False), None, (0, 0, 0, 0)
    mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    broadcast = tuple(size == 1 for size in mask4.shape)
    if mask4.dtype == torch.bool:
        return "bool", broadcast, mask4.view(torch.uint8), mask4.stride()
    return "additive", broadcast, mask4, mask4.stride()
