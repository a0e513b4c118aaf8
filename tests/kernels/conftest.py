"""Kernel tests run the generated Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel is generated (triton.jit reads it when a kernel is
defined), so it is set here at import, before the tests import attnopt.kernels' launchers. On a
machine with CUDA the same tests run the kernels natively on the GPU instead. Generated modules
go to a per-session temporary cache unless ATTNOPT_CACHE_DIR is already set.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("ATTNOPT_CACHE_DIR", tempfile.mkdtemp(prefix="attnopt-kernels-"))

from attnopt.kernels import config  # noqa: E402  (after the environment is set)


@pytest.fixture
def triton_device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Device on which the ops take their Triton path: CUDA if present, else forced CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    monkeypatch.setattr(config, "force_triton", True)
    return torch.device("cpu")


def pytest_configure(config: pytest.Config) -> None:
    # the interpreter evaluates masked-out lanes too (0/0 in all-masked rows); numpy warns
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
