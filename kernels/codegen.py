"""Code generator: a configuration in, specialised Triton source out (and loaded via the cache).

One table maps each op to its configuration dataclass and renderer; `source` shows the text,
`kernel_module` returns the executed module the launchers take their kernels from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .kernel_cache import load_module
from .linear_template import LinearKernelConfig, render_linear_module
from .softmax_template import AgentKernelConfig, ExactKernelConfig, render_agent_module, render_exact_module

GENERATORS: dict[str, tuple[type, Callable[[Any], str]]] = {
    "exact_attention": (ExactKernelConfig, render_exact_module),
    "agent_attention": (AgentKernelConfig, render_agent_module),
    "linear_attention": (LinearKernelConfig, render_linear_module),
}


def _render(op: str, config: object) -> str:
    if op not in GENERATORS:
        raise ValueError(f"unknown op {op!r}; expected one of {tuple(GENERATORS)}")
    config_type, render = GENERATORS[op]
    if not isinstance(config, config_type):
        raise TypeError(f"{op} is configured by {config_type.__name__}, got {type(config).__name__}")
    return render(config)


def source(op: str, **config: Any) -> str:
    """Generated Triton module text for `op` ("exact_attention", "agent_attention",
    "linear_attention") specialised on `config` — the fields of ExactKernelConfig,
    AgentKernelConfig or LinearKernelConfig (head dims, dtype, causal, mask kind and broadcast,
    feature map, normalisation, block sizes)."""
    if op not in GENERATORS:
        raise ValueError(f"unknown op {op!r}; expected one of {tuple(GENERATORS)}")
    return _render(op, GENERATORS[op][0](**config))


@functools.cache
def kernel_module(op: str, config: object) -> ModuleType:
    """The generated module for `op` and its config dataclass, from the disk cache (memoised)."""
    return load_module(_render(op, config))
