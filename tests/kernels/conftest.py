"""Kernel tests run the generated Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel is generated (triton.jit reads it when a kernel is
defined), so it is set here at import, before the tests import attnopt.kernels' launchers. On a
machine with CUDA the same tests run the kernels natively on the GPU instead. Generated modules
go to a per-session temporary cache unless ATTNOPT_CACHE_DIR is already set. A test that takes
the `triton_device` fixture fails unless it launched a Triton kernel.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("ATTNOPT_CACHE_DIR", tempfile.mkdtemp(prefix="attnopt-kernels-"))

from attnopt.kernels import config  # noqa: E402  (after the environment is set)


# The Triton kernels' launchers, which the ops call when they take the Triton path (the generated
# kernels', and the hand-written chosen-keys kernel's).
LAUNCHERS = {"exact_triton": "exact_attention_triton", "agent_triton": "agent_attention_triton",
             "linear_triton": "linear_attention_triton", "chosen_keys_triton": "chosen_keys_attention_triton"}


def _counted(launcher: Callable, launched: list[str]) -> Callable:
    def launch(*args, **kwargs):
        launched.append(launcher.__name__)
        return launcher(*args, **kwargs)

    return launch


@pytest.fixture
def triton_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.device]:
    """Device on which the ops take their Triton path: CUDA if present, else forced CPU.

    A test that asks for it must launch a Triton kernel: one that ran only the reference
    compared the reference with itself and could not fail, so the fixture fails it."""
    launched: list[str] = []
    for module_name, launcher in LAUNCHERS.items():
        module = importlib.import_module(f"attnopt.kernels.{module_name}")
        monkeypatch.setattr(module, launcher, _counted(getattr(module, launcher), launched))
    if torch.cuda.is_available():
        yield torch.device("cuda")
    else:
        monkeypatch.setattr(config, "force_triton", True)
        yield torch.device("cpu")
    assert launched, "no Triton kernel was launched: the ops took the reference path"


def pytest_configure(config: pytest.Config) -> None:
    # the interpreter evaluates masked-out lanes too (0/0 in all-masked rows); numpy warns
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
