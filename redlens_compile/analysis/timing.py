"""Wall-clock timing for side-by-side comparisons: interleaved runs, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int, settle: int = 1) -> dict[str, float]:
    """Median seconds of each function, running them in turn so drift hits all alike.

    In each round every function first runs `settle` untimed calls, then its timed one: each is timed
    right after a call of its own, as a model serving requests runs, not in the state another
    function's run left behind. Measured on the SmolVLM-geometry prefill (2 threads, 15 rounds of
    original, optimized, the same optimized again): the optimized call right after the original's ran
    1.5% slower than the one right after itself, while the original showed no such cost, so strict
    alternation charged the difference to one side only.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
