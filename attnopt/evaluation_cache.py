"""The candidate evaluations of one `optimize` call, kept across its planning rounds.

A loop budget (attnopt.loops) plans the same model on the same inputs again and again under
tighter per-call budgets; only the knapsack's budget changes between rounds. `EvaluationCache`
keeps what `candidates.evaluate_site` measured at each site (and the output gains of each
graph) so later rounds plan from it instead of building and measuring every candidate again;
the keys (`capture_digest`, `outputs_digest`) make sure a kept evaluation is only ever taken for
the very site and inputs it was made on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .analysis import SiteCapture
from .candidates import Evaluated

Evaluations = tuple[Evaluated, list[Evaluated]]
"""A site's `evaluate_site` result: its baseline and every alternative evaluated at it."""


class EvaluationCache:
    """The candidate evaluations of one `optimize` call, kept across its planning rounds.

    A loop budget (attnopt.loops) plans the same model on the same inputs again under tighter
    per-call budgets: only the knapsack's budget changes, while building and measuring every
    candidate of every site (`evaluate_site`) is most of a round's work. A `BudgetPolicy` given
    this cache keeps each site's evaluations (baseline and alternatives, with the modules built
    for them) and takes them again, instead of evaluating, only when everything the evaluation
    read is the same:

    - the policy's evaluation settings — candidates, device, calibration — the very objects of
      the first policy that used the cache (a policy with others never uses it);
    - the site: its graph, the graph's input signature, its id, module path, source line, form
      and facts (`SiteInfo`); with calibration, its calibration key (`calibration.site_keys`:
      it names the weights by identity);
    - what the site received on the call it is planned for: a BLAKE2b digest of the bytes of the
      capture's q, k, v, mask and exact output (each with its shape, stride, dtype and device)
      and its scale, causality, dropout, softcap and sinks (`capture_digest`).

    Anything else (a key that cannot be hashed included) is evaluated as without a cache. Output
    gains (`output_gains=True`) are kept per graph likewise: keyed by the keys of all its sites
    with evaluations, its canonical code and a digest of its outputs.

    What is kept is read only from then on: a round weighs per-round copies of the candidates
    (`BudgetPolicy._weigh`), never a kept `Evaluated`, its candidate or its report row; a site
    module is changed only while `evaluate` builds and calibrates it, before it is kept, and no
    forward pass changes it (mediator counts are read per call, agents remember selections only
    inside a calibration). So a module chosen in a discarded round is, unchanged, what a later
    round may choose again. `Evaluated.built()` (a head split priced without its module) builds
    into the kept record, so the module is built once for all rounds.

    `close()` empties the cache and turns it off: plan_for_loop closes it when its rounds are
    over, so the returned module plans later signatures as usual and holds no evaluations. A copy
    (deepcopy, pickle) is a closed cache: a copied module plans for its own weights.
    """

    def __init__(self) -> None:
        self._evaluations: dict[tuple, Evaluations] = {}
        self._gains: dict[tuple, dict[int, float]] = {}
        self._settings: tuple | None = None
        self.open = True
        self.hits = 0
        """Site evaluations taken from the cache instead of evaluated."""
        self.misses = 0
        """Site evaluations made (and kept) while the cache was open."""

    def serves(self, policy: Any) -> bool:
        """Whether `policy` may use the cache: it is open, and the policy evaluates with the same
        candidates, device and calibration objects as the first policy that used it."""
        if not self.open:
            return False
        settings = (policy.candidates, policy.device, policy.calibration)
        if self._settings is None:
            self._settings = settings
        return all(mine is theirs for mine, theirs in zip(self._settings, settings))

    def evaluations(self, key: tuple | None, evaluate: Callable[[], Evaluations]) -> Evaluations:
        """The kept evaluations for `key`, else `evaluate()` (kept for later rounds)."""
        if key is None or not self.open:
            return evaluate()
        kept = self._evaluations.get(key)
        if kept is not None:
            self.hits += 1
            return kept
        kept = evaluate()
        self.misses += 1
        self._evaluations[key] = kept
        return kept

    def gains(self, key: tuple | None, measure: Callable[[], dict[int, float]]) -> dict[int, float]:
        """The kept output gains for a graph's `key`, else `measure()` (kept for later rounds)."""
        if key is None or not self.open:
            return measure()
        if key not in self._gains:
            self._gains[key] = dict(measure())
        return dict(self._gains[key])

    def close(self) -> None:
        """Drop everything kept and evaluate anew from now on."""
        self._evaluations.clear()
        self._gains.clear()
        self._settings = None
        self.open = False

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.open = False


def hashable(key: tuple) -> tuple | None:
    """`key`, or None when it cannot be hashed (then nothing is kept under it)."""
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _tensor_digest(digest: Any, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        digest.update(b"None;")
        return
    tensor = tensor.detach()
    digest.update(repr((tuple(tensor.shape), tensor.stride(), str(tensor.dtype), str(tensor.device))).encode())
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).cpu()
    if raw.numel():
        digest.update(memoryview(raw.numpy()))
    digest.update(b";")


def capture_digest(capture: SiteCapture) -> tuple:
    """What a site received, as a hashable value: a BLAKE2b digest of its tensors' bytes (with
    their shapes, strides, dtypes and devices), and its numbers."""
    digest = hashlib.blake2b(digest_size=32)
    for tensor in (capture.q, capture.k, capture.v, capture.mask, capture.output):
        _tensor_digest(digest, tensor)
    return (digest.hexdigest(), capture.scale, capture.causal, capture.dropout_p, capture.softcap, capture.sinks)


def outputs_digest(outputs: Sequence[torch.Tensor]) -> str:
    """A BLAKE2b digest of a graph's output tensors (bytes, shapes, strides, dtypes, devices)."""
    digest = hashlib.blake2b(digest_size=32)
    for tensor in outputs:
        _tensor_digest(digest, tensor)
    return digest.hexdigest()
