"""Timing shared by the benchmarks: interleaved best-of runs, fair to every candidate on a busy machine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping


def interleaved_best_seconds(
    runs: Mapping[str, Callable[[], object]], seconds: float, min_rounds: int = 3, slice_s: float = 0.25
) -> dict[str, float]:
    """Fastest time of each run, after one warm-up each.

    Round after round, each run in turn is repeated for `slice_s` (at least once), until `seconds`
    have passed and at least `min_rounds` rounds are done. Load from other processes then falls
    on all runs alike, and quick runs get many chances at an undisturbed moment.
    """
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, math.inf)
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or time.perf_counter() - start < seconds:
        for name, run in runs.items():
            slice_end = time.perf_counter() + slice_s
            while True:
                began = time.perf_counter()
                run()
                finished = time.perf_counter()
                best[name] = min(best[name], finished - began)
                if finished >= slice_end:
                    break
        rounds += 1
    return best
