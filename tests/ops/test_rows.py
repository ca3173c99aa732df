"""Integer helpers of the row ops: counts times a fraction without float64."""

import math

import pytest
import torch

from redlens_compile.ops.rows import fraction_of


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 1 / 3, 0.375, 0.5, 0.75, 0.9, 1.0])
def test_fraction_of_counts_rounds_as_python_does(fraction):
    counts = torch.arange(0, 3000)
    assert fraction_of(counts, fraction, "ceil").tolist() == [math.ceil(fraction * n) for n in range(3000)]
    assert fraction_of(counts, fraction, "round").tolist() == [round(fraction * n) for n in range(3000)]  # half to even
    assert fraction_of(counts, fraction, "ceil").dtype == torch.int64


def test_fraction_of_rounds_halves_to_even_and_refuses_other_modes():
    assert fraction_of(torch.tensor([1, 3, 5, 7]), 0.5, "round").tolist() == [0, 2, 2, 4]
    with pytest.raises(ValueError, match="rounding"):
        fraction_of(torch.tensor([1]), 0.5, "floor")
