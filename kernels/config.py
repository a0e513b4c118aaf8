"""Run-time switches of attnopt.kernels: which path an op takes and where generated kernels live.

CPU tensors normally run the plain-PyTorch reference and CUDA tensors the generated Triton
kernels; tests flip `force_triton` (or set ATTNOPT_FORCE_TRITON=1) together with
TRITON_INTERPRET=1 to run the very same Triton kernels on CPU through Triton's interpreter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

force_triton: bool = os.environ.get("ATTNOPT_FORCE_TRITON", "0") not in ("", "0")
"""Send CPU tensors to the Triton kernels too (only meaningful with TRITON_INTERPRET=1)."""


def cache_dir() -> Path:
    """Folder of generated kernel modules: $ATTNOPT_CACHE_DIR, else ~/.cache/attnopt/kernels."""
    configured = os.environ.get("ATTNOPT_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "attnopt" / "kernels"


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(tensor: torch.Tensor) -> bool:
    """True when an op on `tensor` should launch the generated Triton kernel.

    CUDA tensors of a kernel dtype (fp32, fp16, bf16) always do, real or fake, so torch.compile
    traces the kernel launch; other dtypes (fp64) run the reference. Forced CPU tensors do only
    when they hold data: the interpreter cannot run on fake tensors, so tracing a forced CPU call
    records the reference instead.
    """
    if tensor.dtype not in TRITON_DTYPES:
        return False
    if tensor.is_cuda:
        return True
    return force_triton and not is_fake(tensor)
