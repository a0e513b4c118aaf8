"""Timing shared by the benchmarks: interleaved runs, fair to every candidate on a busy machine.

`interleaved_best_seconds` gives each run's fastest time over a time budget; `interleaved_times`
every call's time over a fixed number of rounds (for medians); `interleaved_median_seconds` those
medians."""

from __future__ import annotations

import math
import statistics
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


def interleaved_times(runs: Mapping[str, Callable[[], object]], rounds: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every call of each run: one warm-up call each, then `rounds` rounds of one call
    of each in turn (load from other processes then falls on all runs alike). `clock`:
    time.perf_counter (wall) or time.thread_time (the calling thread's CPU time)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            began = clock()
            run()
            times[name].append(clock() - began)
    return times


def interleaved_median_seconds(runs: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """The median of `interleaved_times` for each run."""
    return {name: statistics.median(seconds) for name, seconds in interleaved_times(runs, rounds).items()}
