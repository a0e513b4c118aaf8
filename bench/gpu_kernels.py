"""Throughput of attnopt's generated Triton kernels against torch SDPA (flash backend).

    python bench/gpu_kernels.py            # one CUDA GPU: the table below, bf16, H = 16
    python bench/gpu_kernels.py --check    # CPU: correctness on tiny shapes via TRITON_INTERPRET=1

For N = 1K…32K tokens (batch = 32K // N, so every row moves the same number of tokens) and head
dims 64 and 128 it times SDPA's flash kernel, attnopt's exact kernel (non-causal and causal, and
causal with Gemma 2's logit softcapping (50) and gpt-oss's per-head attention sinks, against
plain causal SDPA), agent attention with 64 agents, linear attention (elu+1, sum; non-causal
and causal) and chosen-keys attention (each query's softmax over t = 64 random keys of its own,
clustered attention's exact part, against non-causal SDPA; its GB/s counts the key indices, and
each key and value row once though the gather reads t of them per query). Each row reports ms,
TFLOP/s (FLOPs of the op's registered formula, 2 per multiply-add; SDPA rows use the exact formula, causal rows too — so causal TFLOP/s read as
"dense-equivalent"), GB/s (bytes of inputs read once plus output written once), and the time
ratio SDPA / kernel of the same N, d (and causality) — above 1 is faster than SDPA. A copy of 1 GiB measures the device's
achievable memory bandwidth, the ceiling for the GB/s column.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

TOKENS = 32 * 1024
HEADS = 16
N_AGENTS = 64
N_CHOSEN = 64


@dataclass
class Case:
    """One benchmarked call: what it is, how to run it, and its FLOPs and minimum bytes."""

    kernel: str
    causal: bool
    run: Callable[[], torch.Tensor]
    flops: int
    bytes_moved: int


def _cases(n_tokens: int, head_dim: int) -> list[Case]:
    import torch.nn.functional as F

    from attnopt.kernels import agent_attention, exact_attention, linear_attention
    from attnopt.kernels.chosen_keys import chosen_keys_attention

    batch = max(1, TOKENS // n_tokens)
    shape = (batch, HEADS, n_tokens, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    agents = torch.randn(1, HEADS, N_AGENTS, head_dim, device="cuda", dtype=torch.bfloat16)
    sinks = torch.randn(1, HEADS, 1, 1, device="cuda", dtype=torch.bfloat16)  # one learned logit per head
    keys = torch.randint(0, n_tokens, (batch, HEADS, n_tokens, N_CHOSEN), device="cuda")
    scale = head_dim**-0.5
    io_bytes = 4 * q.numel() * q.element_size()  # q, k, v read, out written
    exact_flops = 2 * batch * HEADS * n_tokens * n_tokens * 2 * head_dim
    agent_flops = 2 * batch * HEADS * N_AGENTS * 2 * n_tokens * 2 * head_dim
    linear_flops = 2 * batch * HEADS * (2 * n_tokens * head_dim * head_dim + 2 * n_tokens * head_dim)
    chosen_flops = 2 * batch * HEADS * n_tokens * N_CHOSEN * 2 * head_dim

    def sdpa(causal: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

        return run

    return [
        Case("sdpa-flash", False, sdpa(False), exact_flops, io_bytes),
        Case("exact", False, lambda: exact_attention(q, k, v, scale=scale), exact_flops, io_bytes),
        Case("sdpa-flash", True, sdpa(True), exact_flops, io_bytes),
        Case("exact", True, lambda: exact_attention(q, k, v, scale=scale, causal=True), exact_flops, io_bytes),
        Case(
            "exact softcap+sinks", True,
            lambda: exact_attention(q, k, v, scale=scale, causal=True, softcap=50.0, sinks=sinks),
            exact_flops, io_bytes,
        ),
        Case(
            f"agent n={N_AGENTS}", False,
            lambda: agent_attention(q, k, v, agents, scale=scale, agent_scale=scale),
            agent_flops, io_bytes + agents.numel() * agents.element_size(),
        ),
        Case("linear elu1", False, lambda: linear_attention(q, k, v), linear_flops, io_bytes),
        Case("linear elu1", True, lambda: linear_attention(q, k, v, causal=True), linear_flops, io_bytes),
        Case(
            f"chosen keys t={N_CHOSEN}", False, lambda: chosen_keys_attention(q, k, v, keys, scale=scale),
            chosen_flops, io_bytes + keys.numel() * keys.element_size(),
        ),
    ]


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted)."""
    import triton.testing

    source = torch.empty(512 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / (ms * 1e-3) / 1e9


def benchmark() -> None:
    """Time every case on the current CUDA device and print one table."""
    import triton.testing
    from rich.console import Console
    from rich.table import Table

    bandwidth = copy_bandwidth()
    table = Table(title=f"attnopt kernels vs SDPA flash — {torch.cuda.get_device_name()}, bf16, H={HEADS}, B·N={TOKENS}")
    for column in ("kernel", "causal", "d", "N", "B", "ms", "TFLOP/s", "GB/s", "% copy BW", "SDPA/kernel"):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for head_dim in (64, 128):
        for n_tokens in (1024, 2048, 4096, 8192, 16384, 32768):
            sdpa_ms: dict[bool, float] = {}
            for case in _cases(n_tokens, head_dim):
                ms = triton.testing.do_bench(case.run)
                if case.kernel == "sdpa-flash":
                    sdpa_ms[case.causal] = ms
                gbps = case.bytes_moved / (ms * 1e-3) / 1e9
                table.add_row(
                    case.kernel, "yes" if case.causal else "", str(head_dim), str(n_tokens),
                    str(max(1, TOKENS // n_tokens)), f"{ms:.3f}", f"{case.flops / (ms * 1e-3) / 1e12:.1f}",
                    f"{gbps:.0f}", f"{100 * gbps / bandwidth:.0f}", f"{sdpa_ms[case.causal] / ms:.2f}",
                )
            torch.cuda.empty_cache()
    console = Console()
    console.print(table)
    console.print(f"device copy bandwidth: {bandwidth:.0f} GB/s")


def check() -> bool:
    """Run every generated kernel on tiny CPU shapes through the interpreter against its reference."""
    from rich.console import Console
    from rich.table import Table

    from attnopt.kernels import (
        agent_attention,
        agent_attention_reference,
        config,
        exact_attention,
        exact_attention_reference,
        linear_attention,
        linear_attention_reference,
    )
    from attnopt.kernels.chosen_keys import chosen_keys_attention, chosen_keys_attention_reference

    config.force_triton = True
    torch.manual_seed(0)
    table = Table(title="attnopt kernels, interpreted on CPU, vs references")
    for column in ("kernel", "dtype", "max |error| / max(1, max |reference|)", "ok"):
        table.add_column(column)
    all_ok = True
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        q, k, v = (torch.randn(1, 2, 37, 32).to(dtype) for _ in range(3))
        agents, mask = torch.randn(1, 2, 5, 32).to(dtype), torch.rand(1, 1, 37, 37) > 0.2
        mask[..., 0] = True
        sinks = torch.randn(1, 2, 1, 1).to(dtype)
        keys = torch.randint(0, 37, (1, 2, 37, 13))
        key_bias = torch.randn(1, 2, 1, 37).to(dtype).masked_fill(torch.rand(37) < 0.3, float("-inf"))
        calls = {
            "exact + bool mask": (exact_attention, exact_attention_reference, (q, k, v, mask), dict(scale=0.2)),
            "exact causal": (exact_attention, exact_attention_reference, (q, k, v), dict(scale=0.2, causal=True)),
            "exact causal softcap+sinks": (exact_attention, exact_attention_reference, (q, k, v, mask),
                                           dict(scale=0.2, causal=True, softcap=5.0, sinks=sinks)),
            "agent": (agent_attention, agent_attention_reference, (q, k, v, agents), dict(scale=0.2, agent_scale=0.3)),
            "linear focused/sum": (linear_attention, linear_attention_reference, (q, k, v), dict(feature_map="focused")),
            "linear causal inline": (linear_attention, linear_attention_reference, (q, k, v), dict(causal=True, normalization="inline")),
            "chosen keys + bias": (chosen_keys_attention, chosen_keys_attention_reference, (q, k, v, keys, key_bias), dict(scale=0.2)),
        }
        for name, (op, reference, args, options) in calls.items():
            expected = reference(*args, **options).float()
            error = ((op(*args, **options).float() - expected).abs().max() / expected.abs().max().clamp_min(1)).item()
            ok = error < tolerance
            all_ok &= ok
            table.add_row(name, str(dtype).removeprefix("torch."), f"{error:.2e}", "yes" if ok else "NO")
    Console().print(table)
    return all_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="correctness on CPU through the Triton interpreter")
    if parser.parse_args().check:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is generated
        # the interpreter also evaluates padding rows past N, where 0/0 is expected and discarded
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        sys.exit(0 if check() else 1)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --check for the CPU correctness pass")
    benchmark()


if __name__ == "__main__":
    main()
