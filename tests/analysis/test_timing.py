"""interleaved_medians: each function's timed call follows a call of its own (settle)."""

import time

from redlens_compile.analysis.timing import interleaved_medians


def _functions_slow_after_the_other():
    """Two functions that take 20 ms when the call before was the other one's, and none after their own."""
    state = {"last": None, "calls": {"a": 0, "b": 0}}

    def make(name):
        def fn():
            if state["last"] not in (None, name):
                time.sleep(0.02)
            state["last"] = name
            state["calls"][name] += 1
        return fn

    return {"a": make("a"), "b": make("b")}, state


def test_each_timed_call_follows_one_of_its_own():
    fns, state = _functions_slow_after_the_other()
    medians = interleaved_medians(fns, repeats=5)
    assert max(medians.values()) < 0.01
    assert state["calls"] == {"a": 1 + 5 * 2, "b": 1 + 5 * 2}  # a warm-up, then a settling and a timed call a round


def test_strict_alternation_times_the_state_the_other_left():
    fns, state = _functions_slow_after_the_other()
    medians = interleaved_medians(fns, repeats=5, settle=0)
    assert min(medians.values()) >= 0.02
    assert state["calls"] == {"a": 6, "b": 6}
