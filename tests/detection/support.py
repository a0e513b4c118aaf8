"""Helpers shared by the detection tests: an fp64 attention oracle, output comparison,
run-time counting of attention calls, and snapshots proving a model was left untouched."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FP32_RTOL = 1e-5


class Lambda(nn.Module):
    """A module whose forward is `fn`: a hand-written attention spelling as a model."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v in float64, q/k/v in (B, H, N, d) layout.

    A bool mask keeps positions where it is True; a float mask is added. Fewer key heads than
    query heads means grouped-query attention (key head j serves query heads j·g … j·g+g−1).
    The result is cast back to q's dtype."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    groups = q64.shape[-3] // k64.shape[-3]
    if groups > 1:
        k64 = k64.repeat_interleave(groups, dim=-3)
        v64 = v64.repeat_interleave(groups, dim=-3)
    if scale is None:
        scale = q64.shape[-1] ** -0.5
    scores = torch.einsum("...nd,...md->...nm", q64, k64) * scale
    if causal:
        n, m = scores.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("...nm,...me->...ne", weights, v64).to(q.dtype)


def linear64(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A Linear layer applied in float64 (for references built from a module's own weights)."""
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) → (B, N, H·d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def tensors_of(out: Any) -> list[torch.Tensor]:
    """The tensors of a nested output (tuples, lists, dicts, HF ModelOutputs) in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for key in out for t in tensors_of(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors_of(item)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in tensors_of(getattr(out, f.name))]
    return []


def structure_of(out: Any) -> Any:
    """The container skeleton of an output: container types and keys, tensor shapes and dtypes."""
    if isinstance(out, torch.Tensor):
        return ("Tensor", tuple(out.shape), out.dtype)
    if isinstance(out, Mapping):
        return (type(out).__name__, tuple((key, structure_of(out[key])) for key in out))
    if isinstance(out, (tuple, list)):
        return (type(out).__name__, tuple(structure_of(item) for item in out))
    if out is None or isinstance(out, (bool, int, float, str)):
        return (type(out).__name__, out)
    return (type(out).__name__,)  # an opaque object (e.g. a KV cache): its type only


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return float("inf")
    if e.numel() == 0:
        return 0.0
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("inf")
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_outputs_close(actual: Any, expected: Any, rtol: float = FP32_RTOL) -> None:
    """Same output structure, and every tensor within rtol relative error of the expected one."""
    assert structure_of(actual) == structure_of(expected), "output structure differs"
    for index, (a, e) in enumerate(zip(tensors_of(actual), tensors_of(expected), strict=True)):
        err = relative_error(a, e)
        assert err <= rtol, f"output tensor {index}: relative error {err:.3g} > {rtol:.1g}"


ATTENTION_FUNCTIONS = {
    F.softmax: "softmax",
    torch.softmax: "softmax",
    torch.Tensor.softmax: "softmax",
    F.scaled_dot_product_attention: "sdpa",
    F.multi_head_attention_forward: "mha",
    torch._transformer_encoder_layer_fwd: "encoder-layer-fastpath",
    torch._native_multi_head_attention: "mha",
}


class AttentionCallCounter(TorchFunctionMode):
    """Counts top-level softmax / SDPA / multi-head-attention calls while a model runs.

    Calls made inside another counted call (e.g. the softmax inside multi_head_attention_forward)
    are not seen: a torch-function mode is switched off while it handles a call."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = ATTENTION_FUNCTIONS.get(func)
        if name is not None:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_attention_calls(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> collections.Counter[str]:
    """Ground truth: which attention calls one eager forward makes, by kind."""
    with AttentionCallCounter() as counter, torch.no_grad():
        model(*args, **(kwargs or {}))
    return counter.counts


@dataclasses.dataclass
class ModelSnapshot:
    """Everything about a module that a rewrite must leave as it was."""

    model_type: type
    parameter_ids: dict[str, int]
    state: dict[str, torch.Tensor]
    attributes: dict[str, tuple[str, ...]]
    hooks: dict[str, tuple[int, ...]]
    training: dict[str, bool]
    classes: dict[str, type]


def snapshot(model: nn.Module) -> ModelSnapshot:
    """Records parameters (identity and values), buffers, attribute names, hooks and modes."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")
    return ModelSnapshot(
        model_type=type(model),
        parameter_ids={name: id(p) for name, p in model.named_parameters()},
        state={name: t.detach().clone() for name, t in model.state_dict().items()},
        attributes={name: tuple(sorted(vars(m))) for name, m in model.named_modules()},
        hooks={name: tuple(len(getattr(m, h, {})) for h in hook_dicts) for name, m in model.named_modules()},
        training={name: m.training for name, m in model.named_modules()},
        classes={name: type(m) for name, m in model.named_modules()},
    )


def assert_unchanged(model: nn.Module, before: ModelSnapshot) -> None:
    """Fails with the first difference between the model now and its snapshot."""
    after = snapshot(model)
    assert after.model_type is before.model_type, "the model's class was replaced"
    assert after.classes == before.classes, "a submodule was replaced"
    assert after.parameter_ids == before.parameter_ids, "parameters were replaced or renamed"
    assert after.state.keys() == before.state.keys(), "state_dict keys changed"
    for name, value in before.state.items():
        assert torch.equal(after.state[name], value), f"{name} changed value"
    assert after.attributes == before.attributes, "attributes were added to or removed from a module"
    assert after.hooks == before.hooks, "hooks were added"
    assert after.training == before.training, "train/eval mode changed"


def assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = FP32_RTOL) -> None:
    """Every expected gradient has a counterpart in `actual` within rtol.

    A rewritten module may wrap the original, so parameter 'a.b' may appear as 'x.a.b'. Errors are
    relative to the gradient itself, but at least to 1e-3 of the largest gradient: some are zero in
    exact arithmetic (a key bias cannot change a softmax) and hold only rounding noise."""
    floor = 1e-3 * max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        candidates = [key for key in actual if key == name or key.endswith("." + name)]
        assert len(candidates) == 1, f"no unique gradient for {name!r} among {sorted(actual)}"
        difference = (actual[candidates[0]].double() - grad.double()).abs().max().item()
        err = difference / max(grad.abs().max().item(), floor)
        assert err <= rtol, f"gradient of {name}: relative error {err:.3g} > {rtol:.1g}"


def gradients(model: nn.Module, args: tuple, kwargs: dict, cotangent_seed: int = 7) -> dict[str, torch.Tensor]:
    """Gradients of ⟨output, fixed random cotangent⟩ w.r.t. float inputs (as 'input:i') and parameters.

    Leaves .grad cleared afterwards, so parameters shared with another module are not polluted."""
    inputs = [a.detach().clone().requires_grad_(True) if _is_float_tensor(a) else a for a in args]
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    out = model(*inputs, **kwargs)
    generator = torch.Generator().manual_seed(cotangent_seed)
    total = sum((t.float() * torch.randn(t.shape, generator=generator)).sum() for t in tensors_of(out) if t.requires_grad)
    total.backward()
    grads = {f"input:{i}": a.grad.clone() for i, a in enumerate(inputs) if _is_float_tensor(a) and a.grad is not None}
    for name, p in params.items():
        if p.grad is not None:
            grads[name] = p.grad.clone()
        p.grad = None
    return grads


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()
