"""The measured verdict when the optimized prefill is slower than the original (the report's
prefill_latency_s.how and the CLI summary's note)."""

import torch

from redlens_compile.artifact.verify import Comparison


def _comparison(before: float, after: float) -> Comparison:
    ids = torch.zeros(1, 2, dtype=torch.long)
    return Comparison(before, after, 5, 0.0, 0.0, 1.0, 2, ids, ids, True, 2, 2)


class _Report:
    flops_ratio = 0.52

    def add_measurements(self, **measured):
        self.measured = measured


def test_slower_reduced_prefill_is_reported_with_both_times():
    line = _comparison(0.0875, 0.1022).does_not_pay(0.52)
    assert line.startswith("reductions do not pay on this model: prefill 102.2 ms vs 87.5 ms") and "0.520" in line
    report = _Report()
    _comparison(0.0875, 0.1022).record(report)
    assert report.measured["prefill_latency_s"]["how"].endswith(line)


def test_faster_or_unreduced_prefill_says_nothing():
    assert _comparison(0.1, 0.06).does_not_pay(0.5) is None
    assert _comparison(0.1, 0.11).does_not_pay(1.0) is None  # identity: nothing was reduced
    report = _Report()
    _comparison(0.1, 0.06).record(report)
    assert "do not pay" not in report.measured["prefill_latency_s"]["how"]
