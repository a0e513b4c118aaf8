"""The Triton kernel of attnopt::chosen_keys_attention against its gather reference.

Interpreted on CPU (TRITON_INTERPRET=1, set by the conftests, with config.force_triton), native
on CUDA. Shapes are tiny but cover the kernel's edges at the interpreter's tiles (16 queries per
program, 8 chosen keys per chunk): N and t not multiples of them, d ≠ e, padded head dims.
"""

from __future__ import annotations


import pytest
import torch

from attnopt.kernels.chosen_keys import chosen_keys_attention, chosen_keys_attention_reference

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _inputs(device, dtype, batch, heads, n_queries, n_keys, n_chosen, head_dim, value_dim, biased):
    """Random q, k, v, keys and (if biased) a key bias with a third of the keys at -inf."""
    q = torch.randn(batch, heads, n_queries, head_dim, device=device).to(dtype)
    k = torch.randn(batch, heads, n_keys, head_dim, device=device).to(dtype)
    v = torch.randn(batch, heads, n_keys, value_dim, device=device).to(dtype)
    keys = torch.randint(0, n_keys, (batch, heads, n_queries, n_chosen), device=device)
    bias = None
    if biased:
        bias = torch.randn(batch, heads, 1, n_keys, device=device).to(dtype)
        bias[..., torch.rand(n_keys, device=device) < 1 / 3] = float("-inf")
    return q, k, v, keys, bias


def _assert_matches(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCE[expected.dtype])


SHAPES = {  # batch, heads, N, M, t, d, e
    "ragged blocks": (1, 2, 19, 23, 13, 16, 24),
    "one chunk, padded dims": (2, 1, 5, 7, 3, 20, 8),
    "exact blocks": (1, 1, 16, 40, 16, 32, 16),
}


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernel_matches_the_gather_reference(triton_device, shape, dtype, biased):
    q, k, v, keys, bias = _inputs(triton_device, dtype, *SHAPES[shape], biased)
    _assert_matches(chosen_keys_attention(q, k, v, keys, bias, scale=0.3),
                    chosen_keys_attention_reference(q, k, v, keys, bias, scale=0.3))


def test_int32_keys_give_what_int64_keys_give(triton_device):
    """The op takes int32 key indices (clustered attention passes them); the kernel gets int64
    ones, so its row offsets (index × stride) cannot overflow."""
    q, k, v, keys, bias = _inputs(triton_device, torch.float32, *SHAPES["ragged blocks"], True)
    torch.testing.assert_close(chosen_keys_attention(q, k, v, keys.int(), bias, scale=0.3),
                               chosen_keys_attention(q, k, v, keys, bias, scale=0.3), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_whose_chosen_keys_are_all_masked_give_exactly_zero(triton_device, dtype):
    q, k, v, keys, _ = _inputs(triton_device, dtype, 1, 2, 19, 12, 11, 16, 24, False)
    bias = torch.zeros(1, 2, 1, 12, device=triton_device, dtype=dtype)
    bias[..., :4] = float("-inf")
    keys[0, 1, 3] = torch.arange(11, device=triton_device) % 4  # every chosen key masked
    keys[0, 0, 17] = 2  # one masked key, repeated
    keys[0, 0, 5, :10] = 1  # masked but for its last key
    keys[0, 0, 5, 10] = 7
    out = chosen_keys_attention(q, k, v, keys, bias, scale=0.3)
    assert (out[0, 1, 3] == 0).all() and (out[0, 0, 17] == 0).all()
    _assert_matches(out, chosen_keys_attention_reference(q, k, v, keys, bias, scale=0.3))


def test_repeated_keys_weigh_once_per_occurrence(triton_device):
    q, k, v, keys, bias = _inputs(triton_device, torch.float32, 1, 2, 19, 9, 13, 16, 16, True)
    keys[..., :6] = keys[..., 6:12]  # each of six keys chosen twice in every row
    keys[0, 0, 2] = 4  # one key, thirteen times
    bias[0, 0, 0, 4] = 0.0
    out = chosen_keys_attention(q, k, v, keys, bias, scale=0.3)
    torch.testing.assert_close(out[0, 0, 2], v[0, 0, 4], atol=1e-6, rtol=1e-6)
    _assert_matches(out, chosen_keys_attention_reference(q, k, v, keys, bias, scale=0.3))


def test_kernel_reads_strided_inputs(triton_device):
    """(B, N, H, ·) projections viewed as (B, H, N, ·), keys and bias sliced from larger tensors."""
    q = torch.randn(2, 19, 2, 16, device=triton_device).transpose(1, 2)
    k = torch.randn(2, 23, 2, 16, device=triton_device).transpose(1, 2)
    v = torch.randn(2, 2, 24, 23, device=triton_device).transpose(-1, -2)
    keys = torch.randint(0, 23, (2, 2, 19, 26), device=triton_device)[..., ::2]
    bias = torch.randn(2, 1, 1, 23, device=triton_device).expand(2, 2, 1, 23)
    _assert_matches(chosen_keys_attention(q, k, v, keys, bias, scale=0.3),
                    chosen_keys_attention_reference(q, k, v, keys, bias, scale=0.3))


def test_bfloat16_matches_the_fp32_reference_to_bfloat16_rounding(triton_device):
    q, k, v, keys, bias = _inputs(triton_device, torch.bfloat16, 1, 2, 19, 23, 13, 16, 24, True)
    out = chosen_keys_attention(q, k, v, keys, bias, scale=0.3)
    expected = chosen_keys_attention_reference(q.float(), k.float(), v.float(), keys, bias.float(), scale=0.3)
    assert out.dtype == torch.bfloat16
    # the interpreter truncates the fp32 → bf16 cast of the output: up to one bf16 ulp
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=2 ** -7)


def test_gradients_are_the_references(triton_device):
    q, k, v, keys, bias = _inputs(triton_device, torch.float32, 1, 2, 19, 23, 13, 16, 24, True)
    inputs = [x.requires_grad_(True) for x in (q, k, v, bias)]
    weights = torch.randn(1, 2, 19, 24, device=triton_device)

    def gradients(attention):
        out = attention(q, k, v, keys, bias, scale=0.3)
        return torch.autograd.grad((out * weights).sum(), inputs)

    for grad, want in zip(gradients(chosen_keys_attention), gradients(chosen_keys_attention_reference)):
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


def compile_for_sm90() -> None:
    """Compile the kernel to a cubin at the GPU tiles; run where Triton is not in interpreter mode."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnopt.kernels.chosen_keys_triton import chosen_keys_attention_kernel, chosen_keys_tiles

    def argument_type(name: str, pointer: str, constexprs: dict) -> str:
        if name in constexprs:
            return "constexpr"
        if name[0].isupper():  # Q, K, V, Keys, Bias, Out
            return "*i64" if name == "Keys" else pointer
        return "fp32" if name == "scale" else "i32"

    cases = (("*bf16", 64, 64, 64, True), ("*fp16", 128, 96, 13, False), ("*fp32", 256, 256, 128, True))
    for dtype, head_dim, value_dim, n_chosen, has_bias in cases:
        tiles = chosen_keys_tiles(torch.device("cuda"), head_dim, value_dim, n_chosen)
        constexprs = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, D_PAD=triton.next_power_of_2(head_dim),
                          E_PAD=triton.next_power_of_2(value_dim), BLOCK_M=tiles.block_m, BLOCK_T=tiles.block_n,
                          HAS_BIAS=has_bias)
        signature = {name: argument_type(name, dtype, constexprs) for name in chosen_keys_attention_kernel.arg_names}
        compiled = triton.compile(ASTSource(chosen_keys_attention_kernel, signature, constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
        assert compiled.asm["cubin"], "no cubin"
        print(f"{dtype} d={head_dim} e={value_dim} bias={has_bias} compiled")


@pytest.mark.slow
def test_kernel_compiles_for_sm90():
    """The interpreter is lenient; Triton's compiler is not. Compiling needs no GPU (as
    test_cuda_compile does for the generated kernels), in a process outside interpreter mode."""
    from test_cuda_compile import run_outside_interpreter

    assert run_outside_interpreter("test_chosen_keys_triton", "compile_for_sm90").count("compiled") == 3
