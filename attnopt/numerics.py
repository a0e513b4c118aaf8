"""Numerics in one place: the error measures, the tolerances and the mask threshold.

Two error measures with different meanings, never to be mixed up:

* `mismatch` — for "is this the same function?" (verification, the end-to-end check of exact
  rewrites): NaN and ±inf must sit in the same places, the finite entries are compared.
* `output_error` — for "how far is an approximation?" (candidates, plans): relative L2 error
  over the rows the reference computes (rows with every key masked are NaN in softmax attention
  and are left out); an output that is not finite on such a row is infinitely wrong.
"""

from __future__ import annotations

import torch

MASKED_AT_OR_BELOW = -1e4
"""Scores or mask values this low mean "never attend": -inf, finfo.min, -1e9 and the old
-10000 convention. A fill above it is not a mask value; a float key at or below it is masked."""

VERIFY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}
"""`mismatch` allowed between a site's original subgraph and its canonical call on random inputs."""

END_TO_END_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}
"""`mismatch` allowed between a whole graph and its exact rewrite (errors add up over layers)."""


def tolerance(table: dict[torch.dtype, float], dtype: torch.dtype) -> float:
    """The tolerance of `table` for `dtype` (fp32's for dtypes the table does not name)."""
    return table.get(dtype, table[torch.float32])


def mismatch(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a − e‖ / ‖e‖ over the finite entries; inf when the shapes differ or NaN/±inf sit in
    different places."""
    if actual.shape != expected.shape:
        return float("inf")
    actual, expected = actual.detach().double(), expected.detach().double()
    if bool(torch.isfinite(expected).all()) and bool(torch.isfinite(actual).all()):  # the usual case, no masks
        return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-30))
    if not torch.equal(torch.isnan(actual), torch.isnan(expected)):
        return float("inf")
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)) or not torch.equal(actual[~finite & ~actual.isnan()],
                                                                          expected[~finite & ~expected.isnan()]):
        return float("inf")
    diff = (actual - expected)[finite].norm()
    scale = expected[finite].norm().clamp_min(1e-30)
    return float(diff / scale)


def output_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖output − reference‖ / ‖reference‖ over the rows (last dim) where the reference is finite."""
    output, reference = output.float(), reference.float()
    scale = torch.linalg.vector_norm(reference)
    if bool(scale.isfinite()):  # every reference entry finite (the usual case): no row to leave out
        error = torch.linalg.vector_norm(output - reference) / scale.clamp_min(1e-30)
        return error.item() if bool(error.isfinite()) else float("inf")
    finite_rows = reference.isfinite().all(-1, keepdim=True)
    difference = torch.where(finite_rows, output - reference, 0)
    if not bool(difference.isfinite().all()):
        return float("inf")
    reference = torch.where(finite_rows, reference, 0)
    return (torch.linalg.vector_norm(difference) / torch.linalg.vector_norm(reference).clamp_min(1e-30)).item()
