"""When is a rewritten program's output "equal" to the original's? Defined once, here.

Two outputs are equal when they have the same structure (containers, shapes, dtypes) and, tensor
by tensor:

* NaN, +inf and -inf sit at exactly the same positions (NaN where the original gives NaN counts as
  equal; NaN or inf where the original is finite is a failure, and so is a finite value where the
  original gives NaN or inf);
* over the entries finite in both, the relative L2 error ‖a − e‖ / ‖e‖ is at most the tolerance of
  the original's dtype (TOLERANCE).

Gradients are compared the same way, with GRADIENT_TOLERANCE (fp32 only).

One allowance, for differences the original's own rounding explains: where the relative error
exceeds the tolerance but NaN/inf positions agree, the original program is evaluated again in
float64. If the rewritten output is no further from that evaluation than the tolerance plus twice
the original's own distance from it, the two are equal. This matters where the original is
ill-conditioned — e.g. a row whose every key carries a -1e4 additive mask keeps only three
digits of its scores in fp32, so any reordering of the same arithmetic moves it by ~1e-4 — and
excuses nothing else: a wrong rewrite is far from the float64 evaluation where the original is not.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from detection.support import structure_of, tensors_of

# Relative L2 error allowed over the finite entries, by the dtype of the original's output.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}
# First-order gradients (w.r.t. q/k/v and parameters), compared in fp32 only.
GRADIENT_TOLERANCE = 1e-5


def tolerance_for(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-5)


@dataclasses.dataclass
class Mismatch:
    """Why two outputs are not equal, and where."""

    kind: str  # "structure", "nan-where-finite", "inf-where-finite", "finite-where-nan", "finite-where-inf", "values"
    message: str
    tensor: int = 0
    error: float | None = None
    # Output rows (all dims but the last) that disagree: a bool tensor of the output's leading shape.
    rows: torch.Tensor | None = None

    def __str__(self) -> str:
        return self.message


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a − e‖₂ / ‖e‖₂ over the entries finite in both, in float64 (0 when there are none)."""
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(a) & torch.isfinite(e)
    if not bool(finite.any()):
        return 0.0
    diff = torch.linalg.vector_norm((a - e)[finite])
    norm = torch.linalg.vector_norm(e[finite])
    return float(diff / norm.clamp_min(1e-30))


def _row_view(mask: torch.Tensor) -> torch.Tensor:
    """Per output row (all dims but the last): does any entry of the row disagree?"""
    return mask.any(dim=-1) if mask.dim() else mask


def compare_tensor(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None, index: int = 0) -> Mismatch | None:
    """None when `actual` equals `expected` in the sense above, else why not."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return Mismatch("structure", f"tensor {index}: {tuple(actual.shape)} {actual.dtype} where the original "
                                     f"gives {tuple(expected.shape)} {expected.dtype}", index)
    if not expected.is_floating_point() and not expected.is_complex():
        if torch.equal(actual, expected):
            return None
        return Mismatch("values", f"tensor {index}: integer/bool values differ", index,
                        rows=_row_view(actual != expected))
    a, e = actual.detach(), expected.detach()
    tol = tolerance_for(expected.dtype) if tol is None else tol
    checks = (
        ("nan-where-finite", torch.isnan(a) & ~torch.isnan(e), "NaN where the original is not NaN"),
        ("finite-where-nan", torch.isnan(e) & ~torch.isnan(a), "not NaN where the original is NaN"),
        ("inf-where-finite", torch.isinf(a) & (a != e), "±inf where the original is not that inf"),
        ("finite-where-inf", torch.isinf(e) & (a != e), "not ±inf where the original is inf"),
    )
    for kind, where, what in checks:
        if bool(where.any()):
            return Mismatch(kind, f"tensor {index}: {what} at {int(where.sum())} of {where.numel()} entries", index,
                            rows=_row_view(where))
    error = relative_l2(a, e)
    if error > tol:
        finite = torch.isfinite(a) & torch.isfinite(e)
        a0, e0 = a.double().where(finite, 0), e.double().where(finite, 0)
        scale = float(torch.linalg.vector_norm(e0)) / max(e0.numel() ** 0.5, 1)
        bad = (a0 - e0).abs() > max(tol * scale, 1e-30)
        return Mismatch("values", f"tensor {index}: relative L2 error {error:.3g} > {tol:.0e}", index, error,
                        rows=_row_view(bad))
    return None


def within_rounding(actual: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor, tol: float) -> bool:
    """The allowance above: `actual` is within tol + 2·(the original's own error) of `reference`."""
    if reference.shape != expected.shape:
        return False
    a, e, r = actual.detach().double(), expected.detach().double(), reference.detach().double()
    finite = torch.isfinite(a) & torch.isfinite(e) & torch.isfinite(r)
    if not bool(finite.any()):
        return False
    norm = torch.linalg.vector_norm(r[finite]).clamp_min(1e-30)
    own = float(torch.linalg.vector_norm((e - r)[finite]) / norm)
    ours = float(torch.linalg.vector_norm((a - r)[finite]) / norm)
    return ours <= tol + 2 * own


def compare(actual: Any, expected: Any, tol: float | None = None,
            reference: Callable[[], Any] | None = None) -> Mismatch | None:
    """None when the outputs are equal (structure and every tensor), else the first difference.

    `reference`, if given, evaluates the original in float64 (same structure), for the allowance
    above; it is called only when some tensor's values differ by more than the tolerance."""
    if structure_of(actual) != structure_of(expected):
        return Mismatch("structure", f"output structure {structure_of(actual)} differs from the original's "
                                     f"{structure_of(expected)}")
    references: list[torch.Tensor] | None = None
    for index, (a, e) in enumerate(zip(tensors_of(actual), tensors_of(expected), strict=True)):
        mismatch = compare_tensor(a, e, tol, index)
        if mismatch is not None and mismatch.kind == "values" and reference is not None:
            if references is None:
                try:
                    references = tensors_of(reference())
                except Exception:
                    references = []
            if index < len(references) and within_rounding(a, e, references[index], tolerance_for(e.dtype) if tol is None else tol):
                continue
        if mismatch is not None:
            return mismatch
    return None
