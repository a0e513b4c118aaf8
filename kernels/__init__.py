"""Attention kernels: plain-PyTorch references, generated Triton kernels, and the torch.library
ops (torch.ops.attnopt.*) that dispatch between them.

Public: exact_attention, agent_attention, linear_attention, chosen_keys_attention (wrappers of
the ops of the same name), their references, linear_attention_quadratic (the N×M oracle of linear attention),
`source(op, **config)` (the generated Triton text), and `config` (force_triton, cache_dir).
CPU tensors run the references, CUDA tensors the Triton kernels; set ATTNOPT_FORCE_TRITON=1 (or
config.force_triton = True) with TRITON_INTERPRET=1 to run the Triton kernels on CPU. Importing this package registers the ops; it generates no code.
"""

import sys as _sys

if __name__ != "attnopt.kernels":
    # Imported under another name, e.g. as a top-level `kernels` because the repo root is on
    # sys.path (`python -m pytest`, `python -c` from the root) and a library such as transformers
    # probes for a `kernels` package: hand back attnopt.kernels itself instead of running this
    # package a second time, which would re-register the attnopt::* ops against a second `config`.
    import importlib as _importlib

    _sys.modules[__name__] = _importlib.import_module("attnopt.kernels")
else:
    from . import config
    from .agent import agent_attention
    from .agent_reference import agent_attention_reference
    from .chosen_keys import chosen_keys_attention, chosen_keys_attention_reference
    from .codegen import source
    from .exact import exact_attention
    from .exact_reference import exact_attention_reference
    from .linear import linear_attention
    from .linear_reference import linear_attention_quadratic, linear_attention_reference

__all__ = [
    "agent_attention",
    "agent_attention_reference",
    "chosen_keys_attention",
    "chosen_keys_attention_reference",
    "config",
    "exact_attention",
    "exact_attention_reference",
    "linear_attention",
    "linear_attention_quadratic",
    "linear_attention_reference",
    "source",
]
