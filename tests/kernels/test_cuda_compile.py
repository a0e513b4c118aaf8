"""Generated kernels compile for a real GPU target (sm_90), not only run in the interpreter.

The interpreter is lenient (it runs numpy on whole blocks); Triton's compiler is not. Compiling
to a cubin needs no GPU, so this runs on CPU machines too, in a
subprocess outside the interpreter mode the other kernel tests use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnopt.kernels import kernel_cache
from attnopt.kernels.codegen import GENERATORS
from attnopt.kernels.linear_template import LinearKernelConfig
from attnopt.kernels.softmax_template import AgentKernelConfig, ExactKernelConfig

pytestmark = pytest.mark.slow  # compiles eight kernels in a subprocess

BF16, FP16, FP32, U8 = "*bf16", "*fp16", "*fp32", "*u8"
CASES = [
    (
        "exact_attention",
        ExactKernelConfig(head_dim=64, value_dim=64, dtype="bfloat16", causal=True, mask="bool", mask_broadcast=(False, True, False, False), block_m=128, block_n=64),
        "exact_attention_kernel",
        dict(Q=BF16, K=BF16, V=BF16, Out=BF16, Mask=U8),
    ),
    (
        "exact_attention",
        ExactKernelConfig(head_dim=64, value_dim=64, dtype="float16", mask="additive", block_m=128, block_n=64, fill=True,
                          fill_broadcast=(False, True, True, False), mask_sum_dtype="float16", zero_empty_rows=True),
        "exact_attention_kernel",
        dict(Q=FP16, K=FP16, V=FP16, Out=FP16, Mask=FP16, FillMask=U8),
    ),
    (
        "exact_attention",
        ExactKernelConfig(head_dim=64, value_dim=64, dtype="bfloat16", mask="additive", block_m=128, block_n=64, mask_sum_dtype="bfloat16"),
        "exact_attention_kernel",
        dict(Q=BF16, K=BF16, V=BF16, Out=BF16, Mask=BF16),
    ),
    (  # logit softcapping and per-head attention sinks, scores in log2 units
        "exact_attention",
        ExactKernelConfig(head_dim=64, value_dim=64, dtype="bfloat16", causal=True, mask="bool", block_m=128, block_n=64,
                          softcap=True, sinks=True, sinks_broadcast=(True, False, True, True)),
        "exact_attention_kernel",
        dict(Q=BF16, K=BF16, V=BF16, Out=BF16, Mask=U8, Sinks=BF16),
    ),
    (  # the same in natural units (a float mask and a fill), per-row fp32 sinks, empty rows as 0
        "exact_attention",
        ExactKernelConfig(head_dim=128, value_dim=128, dtype="float16", mask="additive", block_m=128, block_n=64,
                          fill=True, zero_empty_rows=True, softcap=True, sinks=True,
                          sinks_broadcast=(False, False, False, True)),
        "exact_attention_kernel",
        dict(Q=FP16, K=FP16, V=FP16, Out=FP16, Mask=FP32, FillMask=U8, Sinks=FP32),
    ),
    (
        "agent_attention",
        AgentKernelConfig(head_dim=64, value_dim=64, agent_block=64, dtype="bfloat16", mask="additive", block_m=128, block_n=64),
        "agent_stage1_kernel",
        dict(Q=BF16, K=BF16, V=BF16, Out=FP32, Mask=BF16, RowMax=FP32, RowSum=FP32),
    ),
    (
        "agent_attention",
        AgentKernelConfig(head_dim=64, value_dim=64, agent_block=64, dtype="bfloat16", block_m=128, block_n=64, agent_bias=True, bias_broadcast=(True, False, True, False)),
        "agent_stage2_kernel",
        dict(Q=BF16, K=BF16, V=FP32, Out=BF16, Mask=FP32),
    ),
    (
        "linear_attention",
        LinearKernelConfig(head_dim=64, value_dim=64, dtype="bfloat16", feature_map="focused", normalization="inline", causal=True, key_mask=True),
        "linear_output_kernel",
        dict(Q=BF16, K=BF16, V=BF16, KeyMask=U8, State=FP32, KeySum=FP32, ValueSum=FP32, Count=FP32, Out=BF16),
    ),
]


def compile_cases() -> None:
    """Compile every case to a cubin; run in a process where Triton is not in interpreter mode."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for op, config, kernel_name, pointers in CASES:
        kernel = getattr(kernel_cache.load_module(GENERATORS[op][1](config)), kernel_name)
        signature = {name: pointers.get(name, "fp32" if name in ("scale", "eps", "fill_value", "softcap") else "i32") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        assert compiled.asm["cubin"], f"{op}.{kernel_name} produced no cubin"
        print(f"{op}.{kernel_name} compiled")


def run_outside_interpreter(module: str, function: str) -> str:
    """stdout of `module.function()` (a module of this folder) run in a fresh process without
    TRITON_INTERPRET: Triton cannot compile in a process whose standard library was loaded in
    interpreter mode. Fails the test if it raised."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), environment.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}; {module}.{function}()"],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_generated_kernels_compile_for_sm90():
    assert run_outside_interpreter("test_cuda_compile", "compile_cases").count("compiled") == len(CASES)
