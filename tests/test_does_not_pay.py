"""The CLI's measured verdict when the optimized prefill is slower than the original."""

from redlens_compile.cli import _does_not_pay


def test_slower_reduced_prefill_is_reported_with_both_times():
    line = _does_not_pay(0.0875, 0.1022, 0.52)
    assert line.startswith("reductions do not pay on this model: prefill 102.2 ms vs 87.5 ms") and "0.520" in line


def test_faster_or_unreduced_prefill_says_nothing():
    assert _does_not_pay(0.1, 0.06, 0.5) is None
    assert _does_not_pay(0.1, 0.11, 1.0) is None  # identity: nothing was reduced
