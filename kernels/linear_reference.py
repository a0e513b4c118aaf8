"""Plain-PyTorch linear attention (kernelised, with sum or InLine normalisation): CPU path and oracle.

Two spellings of the same function:
- `linear_attention_reference`, what the op runs on CPU and what its backward differentiates:
  the d×e state S = Σ φ(k)ᵀv and key sum z = Σ φ(k), O(N·d·e) time and memory. Non-causal, one
  state per (batch, kv head); causal, chunked: the queries of a chunk of CHUNK tokens read the
  exclusive prefix state of the chunks before it, plus their own chunk quadratically (a tril of
  CHUNK × CHUNK weights). Masked keys get zero features, so they drop out of every sum.
- `linear_attention_quadratic`, the test oracle: the N×M weight matrix φ(q)φ(k)ᵀ spelled out and
  masked, so that causality, key masks and both normalisations are evident (O(N·M) memory).
The Triton kernels compute the state form as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .exact_reference import accumulation_dtype, repeat_kv_heads

FEATURE_MAPS = ("elu1", "relu", "focused", "identity")
NORMALIZATIONS = ("sum", "inline")


def apply_feature_map(x: torch.Tensor, name: str, power: float, scale: float = 1.0) -> torch.Tensor:
    """φ(scale·x) over the last (head) dim, in fp32 for half inputs.

    elu1: elu(x) + 1; relu: max(x, 0); identity: x unchanged (features mapped by the caller);
    focused (FLatten): y = relu(x), φ = y**power · ‖y‖ / ‖y**power‖, and 0 where y is all zero.
    A positive scale is folded into the map, so that it costs no tensor of its own: elu(s·x) is
    aten.elu with scale s, input_scale s and alpha 1/s; relu(s·x) = s·relu(x), multiplied in
    place; focused(s·x) = s·focused(x) (relu and the norm ratio are homogeneous), s goes onto the
    (…, 1) ratio. Any other scale is applied to x first. (The inference path of
    linear_attention_reference maps with `_raw_features` instead, which leaves such factors out.)
    """
    x = x.to(accumulation_dtype(x.dtype))
    if scale != 1 and not scale > 0:  # 0, negative or NaN: spelled out
        x, scale = x * scale, 1.0
    if name == "elu1":
        # in place is safe: elu's backward reads its input, not its output
        if scale == 1:
            return F.elu(x).add_(1)
        return torch.ops.aten.elu(x, 1 / scale, scale, scale).add_(1)
    if name == "relu":
        # relu(s·x) = s·relu(x): a relu and a multiply, not aten.elu with alpha 0 (which still
        # evaluates exp everywhere, ten times the cost); in place where autograd does not follow
        features = torch.relu(x)
        if scale == 1:
            return features
        return features * scale if features.requires_grad else features.mul_(scale)
    if name == "identity":
        return x if scale == 1 else x * scale
    if name == "focused":
        y = torch.relu(x)
        y_pow = y**power
        norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        norm_pow = torch.linalg.vector_norm(y_pow, dim=-1, keepdim=True)
        ratio = torch.where(norm_pow > 0, norm_y / norm_pow.clamp_min(torch.finfo(x.dtype).tiny), 0)
        return y_pow * (ratio if scale == 1 else ratio * scale)
    raise ValueError(f"unknown feature_map {name!r}; expected one of {FEATURE_MAPS}")


def visible_keys(
    batch: int,
    n_queries: int,
    n_keys: int,
    causal: bool,
    key_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Bool (B or 1, 1, N, M): which keys each query sums over (causal j <= i, valid keys)."""
    visible = torch.ones(1, 1, n_queries, n_keys, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril()
    if key_mask is not None:
        visible = visible & key_mask.reshape(batch, 1, 1, n_keys)
    return visible


def linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    normalization: str = "sum",
    power: float = 3.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    feature_scale: float = 1.0,
) -> torch.Tensor:
    """Linear attention in quadratic form (the oracle); see attnopt.kernels.linear_attention for the contract."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    n_heads = q.shape[1]
    query_features = apply_feature_map(q * feature_scale, feature_map, power)
    key_features = repeat_kv_heads(apply_feature_map(k * feature_scale, feature_map, power), n_heads)
    values = repeat_kv_heads(v, n_heads).to(query_features.dtype)
    visible = visible_keys(q.shape[0], q.shape[2], k.shape[2], causal, key_mask, q.device)
    weights = torch.where(visible, query_features @ key_features.transpose(-1, -2), 0)
    if normalization == "sum":
        out = (weights @ values) / (weights.sum(-1, keepdim=True) + eps)
    else:
        n_visible = visible.sum(-1, keepdim=True).clamp_min(1).to(weights.dtype)
        mean = weights.sum(-1, keepdim=True) / n_visible
        injective = torch.where(visible, weights - mean + 1 / n_visible, 0)
        out = injective @ values
    return out.to(q.dtype)


CHUNK = 64
"""Tokens per chunk of the causal state form: its in-chunk part costs 2·N·CHUNK·(d + e) FLOPs."""

SLAB_ELEMENTS = 1 << 21
"""Non-causal inference works through slabs of whole heads holding at most about this many
features (8 MiB in fp32; at least one head): big enough that a typical call is one slab, so few
ops run, small enough to bound the temporaries of long sequences. Few ops matter more than
cache-sized slabs on a shared CPU: every op is a parallel region whose threads must all be
scheduled before it ends (measured with 2 threads on 2 busy cores, H = 6, d = 64, N = 4096: 1 MiB
slabs, 6× the ops, were 6× slower in the median call, though 25 % faster on one idle thread)."""

SINGLE_THREAD_SLAB_ELEMENTS = 1 << 18
"""The slab bound when torch runs ops on one thread (at most SLAB_ELEMENTS): with no parallel
regions to wait on, cache-sized slabs win. 1 MiB in fp32: the reused feature buffer stays in L2
between the map and the matmul, and stays mapped between calls, where glibc hands multi-MiB
temporaries back to the system and every call faults them in again (measured, H = 6, d = 64,
N = 4096, one thread: 8.5 ms of CPU time per call against 11 ms with 8 MiB slabs)."""


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    normalization: str = "sum",
    power: float = 3.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    feature_scale: float = 1.0,
) -> torch.Tensor:
    """Linear attention in state form (the CPU path); see attnopt.kernels.linear_attention for the contract.

    With S = Σ_j φ(k_j)ᵀ v_j, z = Σ_j φ(k_j) and mean = Σ_j v_j / count over the keys query i
    sees: sum: out_i = φ(q_i)·S / (φ(q_i)·z + eps); InLine: out_i = φ(q_i)·S + (1 − φ(q_i)·z)·mean,
    which is Σ_j (φ(q_i)·φ(k_j) − mean_s φ(q_i)·φ(k_s) + 1/count) v_j rearranged (0 for a row
    that sees no key: S, z and Σ v are then 0). φ is applied to feature_scale·q and feature_scale·k,
    the scale folded into the feature map (apply_feature_map), so no scaled copy is made.

    Non-causal calls that need no gradient go through slabs of whole heads (SLAB_ELEMENTS
    features at most, SINGLE_THREAD_SLAB_ELEMENTS on one thread, unless one head is larger) with
    one reused feature buffer, and the output
    is written in place (_inference_state_form). With gradients, causal, or traced by
    torch.compile (where Inductor fuses the maps and the division into the matmuls' neighbours and
    plans the buffers itself) the same sums run on whole tensors, out of place.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    options = dict(name=feature_map, power=power, scale=feature_scale)
    dtype = accumulation_dtype(q.dtype)
    valid = None if key_mask is None else key_mask[:, None, :, None]  # (B, 1, M, 1)
    value_mean = None
    if normalization == "inline":
        value_mean = repeat_kv_heads(_visible_value_mean(v.to(dtype), valid, causal), q.shape[1])
    if causal:
        key_features = _masked(apply_feature_map(k, **options), valid)
        out = _causal_state_form(apply_feature_map(q, **options), key_features, v.to(dtype), value_mean, eps)
        return out.to(q.dtype)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not needs_grad and not torch.compiler.is_compiling():  # traced, the whole-tensor form fuses best
        return _inference_state_form(q, k, v, valid, value_mean, eps, feature_map, power, feature_scale)
    state, key_sum = _key_state(k, v, valid, **options)
    state, key_sum = repeat_kv_heads(state, q.shape[1]), repeat_kv_heads(key_sum, q.shape[1])
    query_features = apply_feature_map(q, **options)
    if value_mean is None:
        out = _normalized(query_features @ state, query_features @ key_sum.mT, None, eps)
    else:  # InLine: φ(q)·S + (1 − φ(q)·z)·mean = mean + φ(q)·(S − z ⊗ mean)
        out = query_features @ (state - key_sum.mT * value_mean) + value_mean
    return out.to(q.dtype)


def _masked(key_features: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the features of masked keys (where, not ·: a masked key's inf or NaN features stay out)."""
    return key_features if valid is None else torch.where(valid, key_features, 0)


def _slabs(batch: int, heads: int, per_head: int, bound: int) -> list[tuple[slice, slice]]:
    """(batch, head) index pairs covering every head once, each slab about `bound` elements large.

    A slab is a run of whole batch rows or a run of heads within one row, so that it is a view
    of any (B, H, ·, ·) tensor and a contiguous block of a fresh one.
    """
    heads_per_slab = max(1, bound // per_head)
    if heads_per_slab >= heads:
        step = heads_per_slab // heads
        return [(slice(start, start + step), slice(None)) for start in range(0, batch, step)]
    return [(slice(row, row + 1), slice(start, start + heads_per_slab))
            for row in range(batch) for start in range(0, heads, heads_per_slab)]


def _key_state(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
               **options) -> tuple[torch.Tensor, torch.Tensor]:
    """S = Σ φ(k)ᵀv (B, Hkv, d, e) and z = Σ φ(k) (B, Hkv, 1, d) over the valid keys, out of place
    (the autograd path)."""
    key_features = _masked(apply_feature_map(k, **options), valid)
    return key_features.mT @ v.to(key_features.dtype), key_features.sum(-2, keepdim=True)


def _raw_features(x: torch.Tensor, name: str, power: float, scale: float,
                  out: torch.Tensor | None) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(raw, factor) with φ(scale·x) = factor·raw, raw written into `out` where given (the
    inference path's reused buffer, x's shape, fp32 or wider), factor a number or (…, 1) per row.

    The factors of the homogeneous maps are left out of the big tensor, so the caller folds them
    into the small d×e state (a number) or into the per-row normaliser (focused's (…, 1) ratio)
    instead of spending a pass on them: relu(s·x) = s·relu(x); focused(s·x) = s·ratio·relu(x)**p.
    identity returns x itself (not a copy; `out` unused). elu1 is aten.elu with the
    scale folded (see apply_feature_map), then +1 in place: two passes, one tensor.
    """
    x = x.to(accumulation_dtype(x.dtype))
    if scale != 1 and not scale > 0:  # 0, negative or NaN: spelled out
        x, scale = x * scale, 1.0
    if name == "elu1":
        raw = torch.ops.aten.elu.out(x, 1 / scale, scale, scale, out=out) if out is not None else (
            torch.ops.aten.elu(x, 1 / scale, scale, scale))
        return raw.add_(1), 1.0
    if name == "relu":
        return (torch.clamp_min(x, 0, out=out) if out is not None else torch.relu(x)), scale
    if name == "identity":
        return x, scale
    if name == "focused":
        y = torch.clamp_min(x, 0, out=out) if out is not None else torch.relu(x)
        norm_y = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        y_pow = y.pow_(power)
        norm_pow = torch.linalg.vector_norm(y_pow, dim=-1, keepdim=True)
        ratio = torch.where(norm_pow > 0, norm_y.div_(norm_pow.clamp_min(torch.finfo(y.dtype).tiny)), 0)
        return y_pow, (ratio if scale == 1 else ratio.mul_(scale))
    raise ValueError(f"unknown feature_map {name!r}; expected one of {FEATURE_MAPS}")


def _inference_state_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                          value_mean: torch.Tensor | None, eps: float, name: str, power: float,
                          scale: float) -> torch.Tensor:
    """Non-causal, no gradient: the state form in slabs of whole heads, with as few passes over
    the (N, d) tensors and as few fresh tensors as the maths allows.

    One feature buffer (the largest slab's) is reused for every slab of keys and then of queries,
    so a call allocates the output and that buffer only (fresh memory costs page faults, and a
    slab's features are still in cache when the matmul reads them). The maps' factors
    (_raw_features) go into the d×e state and the (·, 1) key sum, never onto an (N, d) tensor,
    except focused's per-key ratio (one in-place multiply; per query it joins the normaliser).
    Per slab of queries: φ(q) (one or two passes), φ(q)·S straight into the output, then one pass:
    sum, the division by φ(q)·z + eps (a (·, 1) matmul); InLine, + mean fused into the matmul
    (baddbmm), or one addcmul with focused's ratio.
    """
    dtype = accumulation_dtype(q.dtype)
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys, value_dim = k.shape[1], k.shape[2], v.shape[3]
    bound = SLAB_ELEMENTS if torch.get_num_threads() > 1 else min(SLAB_ELEMENTS, SINGLE_THREAD_SLAB_ELEMENTS)
    query_slabs = _slabs(batch, n_heads, n_queries * head_dim, bound)
    key_slabs = _slabs(batch, n_kv_heads, n_keys * head_dim, bound)
    largest = max([q[rows].numel() for rows in query_slabs] + [k[rows].numel() for rows in key_slabs], default=0)
    buffer = q.new_empty(largest, dtype=dtype)

    def features(x: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
        return _raw_features(x, name, power, scale, None if name == "identity" else buffer[:x.numel()].view(x.shape))

    state = k.new_empty(batch, n_kv_heads, head_dim, value_dim, dtype=dtype)
    key_sum = k.new_empty(batch, n_kv_heads, 1, head_dim, dtype=dtype)
    hidden = None if valid is None else ~valid
    for rows in key_slabs:
        raw, key_factor = features(k[rows])
        if isinstance(key_factor, torch.Tensor):  # focused: the per-key ratio, on the buffer
            raw.mul_(key_factor)
        if hidden is not None:  # after the maps: a masked key's inf or NaN features are dropped
            raw = raw.masked_fill_(hidden[rows[0]], 0) if name != "identity" else raw.masked_fill(hidden[rows[0]], 0)
        torch.matmul(raw.mT, v[rows].to(dtype), out=state[rows])
        torch.sum(raw, dim=-2, keepdim=True, out=key_sum[rows])
    # relu and identity leave out the same number s on both sides (equal maps): s² goes onto the
    # d×e state and the key sum, so φ(q) and φ(k) are used without it
    factor = scale * scale if name in ("relu", "identity") and scale > 0 else 1.0
    if factor != 1:
        state.mul_(factor)
        key_sum.mul_(factor)
    state, key_sum = repeat_kv_heads(state, n_heads), repeat_kv_heads(key_sum, n_heads)
    if value_mean is not None:  # InLine: φ(q)·S + (1 − φ(q)·z)·mean = mean + φ(q)·(S − z ⊗ mean)
        state = state - key_sum.mT * value_mean
    out = q.new_empty(batch, n_heads, n_queries, value_dim, dtype=dtype)
    for rows in query_slabs:
        raw, row_factor = features(q[rows])
        slab = out[rows]
        per_row = isinstance(row_factor, torch.Tensor)
        if value_mean is not None and not per_row:  # mean + φ(q)·S', the addition inside the matmul
            _batched_addmm(value_mean[rows], raw, state[rows], out=slab)
            continue
        torch.matmul(raw, state[rows], out=slab)
        if value_mean is not None:  # focused: mean + ratio·(y·S'), one pass
            torch.addcmul(value_mean[rows], slab, row_factor, out=slab)
        elif per_row:  # focused: ratio·(y·S) / (ratio·(y·z) + eps), one pass over the output
            denominator = raw @ key_sum[rows].mT
            slab.mul_(row_factor.div_(denominator.mul_(row_factor).add_(eps)))
        else:
            slab.div_((raw @ key_sum[rows].mT).add_(eps))
    return out.to(q.dtype)


def _visible_value_mean(values: torch.Tensor, valid: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Mean of the visible keys' values, (B, Hkv, 1, e), or (B, Hkv, N, e) prefix means when causal."""
    if valid is not None:
        values = torch.where(valid, values, 0)
        counts = valid.to(values.dtype)
    else:
        counts = torch.ones_like(values[:1, :1, :, :1])
    if causal:
        return values.cumsum(-2) / counts.cumsum(-2).clamp_min(1)
    return values.sum(-2, keepdim=True) / counts.sum(-2, keepdim=True).clamp_min(1)


def _normalized(numerator: torch.Tensor, denominator: torch.Tensor, value_mean: torch.Tensor | None,
                eps: float) -> torch.Tensor:
    """Sum: numerator / (denominator + eps); InLine: numerator + (1 − denominator)·mean.

    numerator φ(q)·S (…, N, e) and denominator φ(q)·z (…, N, 1), both fresh (they are overwritten).
    """
    if value_mean is None:  # in place: both are fresh matmul outputs that no backward reads
        return numerator.div_(denominator.add_(eps))
    return numerator.addcmul_(1 - denominator, value_mean)


def _causal_state_form(query_features: torch.Tensor, key_features: torch.Tensor, values: torch.Tensor,
                       value_mean: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Causal, in chunks of CHUNK tokens: prefix states of the earlier chunks plus a tril within the chunk.

    The full chunks run batched (the tokens viewed as (chunks, CHUNK)); the last N mod CHUNK
    tokens are a shorter chunk of their own, so nothing is padded or copied to chunk them.
    """
    n_heads, n_tokens = query_features.shape[1], query_features.shape[2]
    key_features, values = repeat_kv_heads(key_features, n_heads), repeat_kv_heads(values, n_heads)
    n_chunks = n_tokens // CHUNK
    split = n_chunks * CHUNK
    pieces = []
    state = key_sum = None  # Σ φ(k)ᵀv and Σ φ(k) over the full chunks
    if n_chunks:
        def chunked(x: torch.Tensor) -> torch.Tensor:  # (B, H, chunks, CHUNK, ·), a view
            return x[..., :split, :].reshape(*x.shape[:2], n_chunks, CHUNK, x.shape[-1])

        chunk_q, chunk_k, chunk_v = chunked(query_features), chunked(key_features), chunked(values)
        states = (chunk_k.transpose(-1, -2) @ chunk_v).cumsum(2)  # (B, H, chunks, d, e), inclusive
        key_sums = chunk_k.sum(-2, keepdim=True).cumsum(2)  # (B, H, chunks, 1, d)
        before = torch.cat([torch.zeros_like(states[:, :, :1]), states[:, :, :-1]], dim=2)
        keys_before = torch.cat([torch.zeros_like(key_sums[:, :, :1]), key_sums[:, :, :-1]], dim=2)
        within = (chunk_q @ chunk_k.transpose(-1, -2)).tril()  # (B, H, chunks, CHUNK, CHUNK)
        numerator = _batched_addmm(chunk_q @ before, within, chunk_v)
        denominator = within.sum(-1, keepdim=True) + chunk_q @ keys_before.mT
        mean = None if value_mean is None else chunked(value_mean)
        out = _normalized(numerator, denominator, mean, eps)
        pieces.append(out.reshape(*out.shape[:2], split, out.shape[-1]))
        state, key_sum = states[:, :, -1], key_sums[:, :, -1]
    if split < n_tokens:
        tail_q, tail_k, tail_v = (x[..., split:, :] for x in (query_features, key_features, values))
        within = (tail_q @ tail_k.transpose(-1, -2)).tril()
        numerator, denominator = within @ tail_v, within.sum(-1, keepdim=True)
        if state is not None:
            numerator = numerator + tail_q @ state
            denominator = denominator + tail_q @ key_sum.mT
        mean = None if value_mean is None else value_mean[..., split:, :]
        pieces.append(_normalized(numerator, denominator, mean, eps))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


def _batched_addmm(bias: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """bias + left @ right over any leading dims, the addition fused into the matmul (baddbmm).

    out: where to write it (left's leading dims, contiguous), else a fresh tensor.
    """
    lead = left.shape[:-2]
    flat = (lambda x: x.reshape(-1, *x.shape[-2:]))
    if out is not None:
        torch.baddbmm(flat(bias), flat(left), flat(right), out=out.view(-1, *out.shape[-2:]))
        return out
    result = torch.baddbmm(flat(bias), flat(left), flat(right))
    return result.reshape(*lead, *result.shape[-2:])
