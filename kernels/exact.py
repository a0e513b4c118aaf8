"""The `attnopt::exact_attention` op: softmax attention, same function as the model's own.

Paths, in this order:
- Triton: CUDA tensors (or CPU ones with config.force_triton under TRITON_INTERPRET=1) run the
  generated FlashAttention-2 style Triton kernel (see _kernel_computes), logit softcapping and
  attention sinks included. On CUDA the Triton kernel stays the choice even where torch's SDPA
  could compute the same function: it is already fused,
  it models every masking option (fills, the mask's dtype, NaN rows) in one kernel, and CUDA
  SDPA's flash/efficient backends round the probabilities to half before P·V and pick their
  backend by rules this op would have to mirror per torch version.
- SDPA: CPU tensors whose call torch's own `F.scaled_dot_product_attention` computes exactly
  (see _sdpa_computes for the rule) run it, i.e. torch's fused CPU flash kernel: the same
  function as the reference to fp32 rounding (and to half rounding for fp16/bf16 inputs, whose
  probabilities SDPA rounds to the input dtype before P·V), several times faster and without
  the N×M score matrix.
- Reference: everything else (dropout, finite fills, half scores rounding a float mask, logit
  softcapping or attention sinks on CPU, ...). Softcap and sinks never take the SDPA path (SDPA
  computes neither); the Triton kernel computes both.

Backward is autograd through the reference whatever the forward ran (see autograd_reference),
twice differentiable. The op takes fill_mask and sinks as its fifth and sixth positional arguments
(torch.library allows no keyword-only tensors), softcap None for none, and fill_value None for -inf (op schemas hold no infinite
defaults); the Python wrapper keeps fill_mask keyword-only and fill_value -inf. FlopCounterMode
counts 2·B·H·N·M·(d+e).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from . import config
from .autograd_reference import reference_gradients
from .exact_reference import accumulation_dtype, exact_attention_reference, mask_sum_dtype
from .shapes import check_mask, check_qkv


def _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype, sinks=None, softcap=None) -> None:
    check_qkv(q, k, v)
    scores_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    check_mask(mask, scores_shape)
    if fill_mask is not None:
        if fill_mask.dtype != torch.bool:
            raise TypeError(f"fill_mask must be bool, got {fill_mask.dtype}")
        check_mask(fill_mask, scores_shape)
    if score_dtype is not None and not score_dtype.is_floating_point:
        raise TypeError(f"score_dtype must be floating, got {score_dtype}")
    if sinks is not None:
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"sinks must be floating, got {sinks.dtype}")
        check_mask(sinks, scores_shape[:3] + (1,))
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number, got {softcap}")


def _kernel_computes(q, mask, score_dtype, dropout_p, sinks=None, softcap=None) -> bool:
    """Whether the Triton kernel gives the reference's result: not with dropout (the reference
    keeps torch's RNG stream), nor for a float mask added in fp64, nor for fp64 sinks (the
    reference's softmax then runs in fp64, the kernel's is fp32). Logit softcapping and sinks of
    a kernel dtype it computes."""
    if sinks is not None and sinks.dtype == torch.float64:
        return False
    return dropout_p == 0 and mask_sum_dtype(q.dtype, mask, score_dtype) != torch.float64 and config.use_triton(q)


def _fill_value(value: float | None) -> float:
    """The op's fill_value: None stands for -inf."""
    return -math.inf if value is None else value


SDPA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _sdpa_computes(q, k, v, mask, fill_mask, fill_value, score_dtype, dropout_p, scale, sinks=None,
                   softcap=None) -> bool:
    """Whether torch's CPU SDPA (after _sdpa_attention folds the masks) is the reference's
    function; decided from metadata only, so tracing with fake tensors takes the same path.

    - CPU, a dtype of SDPA's flash kernel, a finite scale, no dropout (the reference keeps
      torch's RNG stream), no empty dimension (softmax over M = 0 keys gives 0, not an empty
      row's NaN);
    - fills only with -inf (then a fill is a mask: folded into a bool mask, or into a float one
      as `mask - inf`, which keeps the reference's NaN where the mask is +inf or NaN);
    - a float mask only where the reference adds it to unrounded scores, i.e. in the dtype it
      computes in (fp32 for half inputs, as SDPA does; not half scores of a hand-written half
      model, which round before the add); SDPA takes it in that dtype, an exact cast.
    - no logit softcapping and no attention sinks (SDPA computes neither).
    Causal (top-left, like SDPA's is_causal), GQA, broadcast masks of any rank, d != e and every
    scale are handled by _sdpa_attention; fully masked rows give SDPA's 0 and are set to NaN
    unless zero_empty_rows.
    """
    if q.device.type != "cpu" or q.dtype not in SDPA_DTYPES or dropout_p != 0 or not math.isfinite(scale):
        return False
    if sinks is not None or softcap is not None:
        return False
    if 0 in (*q.shape, k.shape[2], v.shape[3]):
        return False
    if fill_mask is not None and fill_value != -math.inf:
        return False
    if mask is not None and mask.dtype != torch.bool:
        return mask_sum_dtype(q.dtype, mask, score_dtype) == accumulation_dtype(q.dtype)
    return True


def _sdpa_attention(q, k, v, mask, fill_mask, *, scale, causal, zero_empty_rows) -> torch.Tensor:
    """The reference's function through F.scaled_dot_product_attention (where _sdpa_computes).

    Fill, mask and causality become one SDPA mask exactly as the reference applies them in turn
    (fill, then mask, then causal): bool keep-masks are and-ed; a float mask gets `mask - inf`
    where filled and -inf where causally hidden. Causality alone is SDPA's is_causal, except
    with a scale <= 0, for which torch 2.13's CPU flash kernel returns NaN: a tril mask then.
    The mask is given rank 4 (SDPA's CPU flash kernel takes 2-D or 4-D masks, and goes to the
    slower math path for 3-D), q/k/v unit stride
    in their last dimension, and d != e is padded with zeros to the larger of the two (zero
    terms of q kᵀ and zero columns of v change nothing), all for the same reason. GQA runs with
    enable_gqa (no copy of k and v). SDPA gives 0 on a row with no visible key; without
    zero_empty_rows those rows are set to NaN as torch.softmax gives them, found from the mask
    (a row of q·k scores that are all -inf by themselves needs infinite inputs: the contract is
    for finite q, k, v; with non-finite ones, e.g. NaN keys where the mask blocks them, SDPA
    and the reference may disagree on which rows are NaN).
    """
    n_queries, n_keys = q.shape[2], k.shape[2]
    if mask is not None and mask.dtype not in (torch.bool, q.dtype):
        mask = mask.to(accumulation_dtype(q.dtype))  # exact: _sdpa_computes checked the sum dtype
    if fill_mask is not None:
        if mask is None:
            mask = ~fill_mask
        elif mask.dtype == torch.bool:
            mask = mask & ~fill_mask
        else:
            mask = torch.where(fill_mask, mask - math.inf, mask)
    if causal and (mask is not None or not scale > 0):
        visible = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril()
        if mask is None:
            mask = visible  # torch 2.13's CPU flash kernel gives NaN for is_causal with a scale <= 0
        elif mask.dtype == torch.bool:
            mask = mask & visible
        else:
            mask = torch.where(visible, mask, -math.inf)
        causal = False
    if mask is not None and mask.dim() < 4:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    head_dim, value_dim = q.shape[3], v.shape[3]
    if value_dim < head_dim:
        v = F.pad(v, (0, head_dim - value_dim))
    elif head_dim < value_dim:
        q, k = F.pad(q, (0, value_dim - head_dim)), F.pad(k, (0, value_dim - head_dim))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=bool(k.shape[1] != q.shape[1])
    )
    if value_dim < head_dim:
        out = out[..., :value_dim].contiguous()
    if mask is not None and not zero_empty_rows:
        visible = mask if mask.dtype == torch.bool else ~mask.isneginf()
        out.masked_fill_(~visible.any(dim=-1, keepdim=True), math.nan)  # SDPA's fresh output: in place
    return out


@torch.library.triton_op("attnopt::exact_attention", mutates_args=())
def _exact_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    fill_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
    fill_value: float | None = None,
    score_dtype: torch.dtype | None = None,
    zero_empty_rows: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype, sinks, softcap)
    masking = dict(
        fill_mask=fill_mask, fill_value=_fill_value(fill_value), score_dtype=score_dtype, zero_empty_rows=zero_empty_rows
    )
    if _kernel_computes(q, mask, score_dtype, dropout_p, sinks, softcap):
        from .exact_triton import exact_attention_triton  # launchers load on first use, not at import

        return exact_attention_triton(q, k, v, mask, scale=scale, causal=causal, softcap=softcap, sinks=sinks,
                                      **masking)
    # contiguous, as the fake impl promises (Inductor calls the op as an extern kernel and checks
    # its strides; CPU SDPA follows the inputs' layout)
    if _sdpa_computes(q, k, v, mask, fill_mask, masking["fill_value"], score_dtype, dropout_p, scale, sinks, softcap):
        return _sdpa_attention(q, k, v, mask, fill_mask, scale=scale, causal=causal,
                               zero_empty_rows=zero_empty_rows).contiguous()
    return exact_attention_reference(q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, sinks=sinks,
                                     softcap=softcap, **masking).contiguous()


@_exact_attention_op.register_fake
def _exact_attention_fake(
    q, k, v, mask=None, fill_mask=None, sinks=None, *, scale, causal=False, dropout_p=0.0, fill_value=None,
    score_dtype=None, zero_empty_rows=False, softcap=None,
):
    _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype, sinks, softcap)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


N_TENSOR_ARGUMENTS = 6  # q, k, v, mask, fill_mask, sinks


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    # a call may leave trailing optional tensors out: saved as None
    ctx.save_for_backward(*inputs, *(None,) * (N_TENSOR_ARGUMENTS - len(inputs)))
    ctx.n_inputs = len(inputs)
    ctx.options = keyword_only_inputs


def _backward(ctx, grad_output):
    if ctx.options["dropout_p"] > 0:
        raise RuntimeError(
            "attnopt::exact_attention cannot differentiate through dropout (its mask is not kept); "
            "call attnopt.kernels.exact_attention, which differentiates the reference directly"
        )
    q, k, v, mask, fill_mask, sinks = ctx.saved_tensors
    options = {**ctx.options, "fill_value": _fill_value(ctx.options["fill_value"])}

    def reference(q, k, v, mask, sinks):
        return exact_attention_reference(q, k, v, mask, fill_mask=fill_mask, sinks=sinks, **options)

    needs = (*ctx.needs_input_grad, *(False,) * (N_TENSOR_ARGUMENTS - len(ctx.needs_input_grad)))
    grad_q, grad_k, grad_v, grad_mask, grad_sinks = reference_gradients(
        reference, (q, k, v, mask, sinks), (*needs[:4], needs[5]), grad_output
    )
    return (grad_q, grad_k, grad_v, grad_mask, None, grad_sinks)[: ctx.n_inputs]


_exact_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.attnopt.exact_attention)
def _exact_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add of q kᵀ and probs·v; masks and causality are not discounted."""
    batch, n_heads, n_queries, head_dim = q_shape
    return 2 * batch * n_heads * n_queries * k_shape[2] * (head_dim + v_shape[3])


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    dropout_p: float = 0.0,
    fill_mask: torch.Tensor | None = None,
    fill_value: float = -math.inf,
    score_dtype: torch.dtype | None = None,
    zero_empty_rows: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(where(fill_mask, fill_value, cap(q kᵀ·scale)) + mask) v, the function a model's attention computes.

    q (B, H, N, d); k (B, Hkv, M, d); v (B, Hkv, M, e) with H % Hkv == 0 (query head h reads kv
    head h // (H // Hkv)). mask: None, bool (True = may attend) or float of any dtype (added to
    the scores), broadcastable to (B, H, N, M). causal: key j visible to query i iff j <= i
    (top-left). Returns (B, H, N, e) in q's dtype; half inputs are computed in fp32 (SDPA's CPU kernel
    rounds the probabilities to the half dtype before P·V: the same to half rounding).
    fill_mask (bool, broadcastable to (B, H, N, M)): where True the scaled score is replaced by
    fill_value before the mask applies, like `scores.masked_fill(fill_mask, fill_value)`; the value
    is used as given in the (at least fp32) scores, so pass what the original's scores held.
    score_dtype: the dtype the original held its scores in (default q's); a float mask is added in
    torch.promote_types(score_dtype, mask.dtype) with the scores rounded to it first, as
    `scores + mask` rounds in torch (an fp16 `finfo.min` mask swamps the scores), and the softmax
    runs in that dtype or fp32, whichever is wider.
    Rows where every score is -inf give NaN, as torch.softmax does, or 0 with zero_empty_rows
    (SDPA's and nn.MultiheadAttention's rule; gradients there are 0).
    softcap (Gemma 2's logit softcapping): cap(s) = softcap·tanh(s / softcap) on the scaled scores,
    before fills and masks; None leaves them as they are. sinks (gpt-oss's attention sinks; float,
    broadcastable to (B, H, N, 1), usually one learned logit per head (1, H, 1, 1), differentiable):
    the softmax runs over [masked scores, sink] and the sink's column is dropped, so rows weigh
    less than 1 in total and a row whose every key is masked gives 0 (the sink takes all the weight;
    NaN only if that row's sink is -inf too, or 0 with zero_empty_rows). On CUDA both run in the
    Triton kernel (fp64 sinks: the reference); on CPU the reference (SDPA computes neither). dropout_p > 0 applies
    F.dropout(probs, dropout_p, training=True), consuming the RNG exactly like a hand-written
    dropout(softmax(...)) of the same shape; that path always runs (and differentiates) the
    reference, never the Triton kernel or SDPA. On CPU the call runs torch's fused
    F.scaled_dot_product_attention wherever that is this same function (see _sdpa_computes), the
    reference elsewhere; on CUDA the Triton kernel.
    """
    masking = dict(fill_value=fill_value, score_dtype=score_dtype, zero_empty_rows=zero_empty_rows, softcap=softcap)
    if dropout_p > 0:
        _check_exact_inputs(q, k, v, mask, fill_mask, score_dtype, sinks, softcap)
        return exact_attention_reference(
            q, k, v, mask, scale=scale, causal=causal, dropout_p=dropout_p, fill_mask=fill_mask, sinks=sinks, **masking
        )
    if _plain_eager_inference((q, k, v, mask, fill_mask, sinks)):
        return _exact_attention_op._init_fn(q, k, v, mask, fill_mask, sinks, scale=scale, causal=causal,
                                            dropout_p=dropout_p, **masking)
    return torch.ops.attnopt.exact_attention(
        q, k, v, mask, fill_mask, sinks, scale=scale, causal=causal, dropout_p=dropout_p, **masking
    )


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager_inference(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether a call may run the op's implementation directly instead of through the dispatcher.

    The dispatcher's route (autograd wrapper, alias checks, dynamo's disable frame, the Triton
    op's backend lookup) costs tens of microseconds per call: a visible share of a decode step.
    It is only needed for what it does, so it is skipped exactly when none of that applies:
    nothing is being traced or compiled, no dispatch or torch-function mode is active (fake
    tensors, FlopCounterMode, attnopt's kernel counter — these must see the op), no profiler is
    recording (its trace names the op), no functorch transform (vmap, grad) is running, every
    tensor is a plain tensor (no subclass), and no gradient is needed. The implementation is the
    very function the op dispatches to, so the result is the same.
    """
    if (torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled() or torch.autograd._profiler_enabled()
            or torch._C._len_torch_function_stack() > 0
            or _get_current_dispatch_mode() is not None or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is not None and (type(tensor) not in _PLAIN_TENSOR_TYPES or (grad and tensor.requires_grad)):
            return False
    return True
