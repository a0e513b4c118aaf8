"""The `attnopt::chosen_keys_attention` op: each query's exact softmax attention over its own t keys.

    out_i = softmax_{j ∈ keys_i}(q_i·k_j·scale + bias_j) · v_{keys_i}

with keys (B, H, N, t) the indices (int64 or int32) of the keys query i reads (clustered
attention's exact part, attnopt/kernels/clustered_reference.py). A row whose chosen keys are all
masked gives 0.

Three implementations of the same sums:
- `chosen_keys_attention_reference`: gathers each query's t key and value rows (index_select
  of whole rows, `chunk_elements` at a time), then a batched matvec each way. Differentiable;
  backward of the op is autograd through it.
- on CPU, without gradients: one sampled dense-dense product (`torch.sparse.sampled_addmm`, the
  scores at the chosen (query, key) pairs only, as CSR values with exactly t per row), a dense
  softmax over those values viewed (rows, t), and one sparse-dense product with V. Nothing of
  size N·t·d is written: ~10× faster than the gathers at all-MiniLM-L6-v2's shape. The CSR
  indices are int32 where every flat index fits (half the memory of int64; a fresh 25 MB index
  costs thousands of page faults a call on CPU).
- CUDA tensors of fp32/fp16/bf16 (or forced CPU ones under TRITON_INTERPRET=1, see config): the
  Triton kernel of chosen_keys_triton.py, gathering each query's key and value rows in chunks
  with an fp32 online softmax; forward only.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import register_flop_formula

from . import config
from .autograd_reference import reference_gradients

CHUNK_ELEMENTS = 1 << 22
"""Gathered key and value elements per chunk of queries in the reference (16 MiB in fp32)."""


def softmax_or_zero(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; 0 on a row whose logits are all −inf (it sees no key), where
    softmax gives NaN. A NaN in the logits still gives NaN."""
    weights = torch.softmax(logits, dim=-1)
    blind = logits.amax(-1, keepdim=True) == float("-inf")
    return weights.masked_fill(blind, 0.0)


def _check(q, k, v, keys, key_bias) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or keys.dim() != 4:
        raise ValueError("q, k, v and keys must be 4-D: (B, H, N, d), (B, H, M, d), (B, H, M, e), (B, H, N, t)")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or keys.shape[:3] != q.shape[:3]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"keys {tuple(keys.shape)}")
    if keys.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"keys must be int64 or int32, got {keys.dtype}")
    if key_bias is not None and (not key_bias.is_floating_point() or key_bias.shape != (*q.shape[:2], 1, k.shape[2])):
        raise ValueError(f"key_bias must be floating (B, H, 1, M), got {key_bias.dtype} {tuple(key_bias.shape)}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, ·) → (B·H·L, ·)."""
    return x.reshape(-1, x.shape[-1])


def _flat_keys(keys: torch.Tensor, n_keys: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Each chosen key as a row of the flattened (B·H·M, ·) keys: (B, H, N, t), in `dtype`."""
    offsets = torch.arange(keys.shape[0] * keys.shape[1], device=keys.device, dtype=dtype) * n_keys
    return keys.to(dtype) + offsets.view(keys.shape[0], keys.shape[1], 1, 1)


def chosen_keys_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                                    key_bias: torch.Tensor | None = None, *, scale: float,
                                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The gather form (module docstring); computes in q's dtype."""
    n_chosen, key_dim, value_dim = keys.shape[-1], k.shape[-1], v.shape[-1]
    flat_keys = _flat_keys(keys, k.shape[2])
    k_rows, v_rows = _rows(k), _rows(v)
    bias_rows = None if key_bias is None else key_bias.reshape(-1)
    step = max(1, chunk_elements // max(1, n_chosen * (key_dim + value_dim)))
    parts = []
    for start in range(0, q.shape[2], step):
        chosen = flat_keys[:, :, start:start + step]  # (B, H, c, t)
        flat = chosen.reshape(-1)
        k_chosen = k_rows.index_select(0, flat).view(*chosen.shape, key_dim)
        v_chosen = v_rows.index_select(0, flat).view(*chosen.shape, value_dim)
        logits = torch.matmul(k_chosen, q[:, :, start:start + step].unsqueeze(-1)).squeeze(-1) * scale
        if bias_rows is not None:
            logits = logits + bias_rows.index_select(0, flat).view(chosen.shape)
        parts.append(torch.matmul(softmax_or_zero(logits).unsqueeze(-2), v_chosen).squeeze(-2))
    return torch.cat(parts, dim=2)


def _sparse_cpu(q, k, v, keys, key_bias, scale):
    """The CSR form (module docstring): scores at the chosen pairs, softmax, one sparse-dense product."""
    n_rows, n_chosen = q.shape[0] * q.shape[1] * q.shape[2], keys.shape[-1]
    n_key_rows = k.shape[0] * k.shape[1] * k.shape[2]
    index_dtype = torch.int32 if max(n_rows * n_chosen, n_key_rows) < 2**31 else torch.int64
    columns = _flat_keys(keys, k.shape[2], index_dtype).reshape(-1)
    row_starts = torch.arange(0, n_rows * n_chosen + 1, n_chosen, device=q.device, dtype=index_dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(row_starts, columns, q.new_zeros(n_rows * n_chosen),
                                          size=(n_rows, n_key_rows))
        scores = torch.sparse.sampled_addmm(pattern, _rows(q), _rows(k).T, beta=0.0, alpha=scale)
        logits = scores.values().view(n_rows, n_chosen)
        if key_bias is not None:
            logits = logits + key_bias.reshape(-1).index_select(0, columns).view(n_rows, n_chosen)
        weights = torch.sparse_csr_tensor(row_starts, columns, softmax_or_zero(logits).reshape(-1),
                                          size=(n_rows, n_key_rows))
        out = weights @ _rows(v)
    return out.view(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("attnopt::chosen_keys_attention", mutates_args=())
def _chosen_keys_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                              key_bias: torch.Tensor | None = None, *, scale: float) -> torch.Tensor:
    _check(q, k, v, keys, key_bias)
    if config.use_triton(q):
        from .chosen_keys_triton import chosen_keys_attention_triton

        return chosen_keys_attention_triton(q, k, v, keys.long(), key_bias, scale=scale)  # int64 offsets
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and keys.shape[-1] > 0:
        return _sparse_cpu(q.contiguous(), k.contiguous(), v.contiguous(), keys, key_bias, scale)
    return chosen_keys_attention_reference(q, k, v, keys, key_bias, scale=scale).contiguous()


@_chosen_keys_attention_op.register_fake
def _(q, k, v, keys, key_bias=None, *, scale):
    _check(q, k, v, keys, key_bias)
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.options = keyword_only_inputs


def _backward(ctx, grad_output):
    return reference_gradients(chosen_keys_attention_reference, ctx.saved_tensors, ctx.needs_input_grad[:5],
                               grad_output, **ctx.options)


_chosen_keys_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.attnopt.chosen_keys_attention)
def _flops(q_shape, k_shape, v_shape, keys_shape, *args, out_shape=None, **kwargs) -> int:
    """2·B·H·N·t·(d+e): each query's t scores and its weighted sum of t values."""
    batch, n_heads, n_queries, head_dim = q_shape
    return 2 * batch * n_heads * n_queries * keys_shape[-1] * (head_dim + v_shape[-1])


def chosen_keys_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                          key_bias: torch.Tensor | None = None, *, scale: float) -> torch.Tensor:
    """Exact softmax attention of each query over its own keys → (B, H, N, e) in q's dtype.

    q (B, H, N, d); k (B, H, M, d); v (B, H, M, e); keys (B, H, N, t) int64 or int32 in [0, M);
    key_bias (B, H, 1, M) additive (−inf: masked) or None.
    """
    return torch.ops.attnopt.chosen_keys_attention(q, k, v, keys, key_bias, scale=scale)
