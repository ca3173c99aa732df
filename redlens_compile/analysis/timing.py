"""Wall-clock timing for side-by-side comparisons: interleaved runs, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, running them in turn so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
