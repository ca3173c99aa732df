"""Row helpers: counts times a fraction without float64; rows put back in place by merge_rows."""

import math

import pytest
import torch

from redlens_compile.ops.rows import _merge_by_gather, fraction_of, merge_rows, visual_layout


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


@pytest.mark.parametrize("merge", [merge_rows, _merge_by_gather], ids=["eager_writes", "traced_gather"])
def test_merge_rows_puts_every_row_back_and_the_valid_probes_over_their_visual_rows(merge):
    """A ragged batch (sample 1 has fewer visual rows, one invalid probe): each text row from the
    stacked rows, each visual row from the padded visual rows, each valid probe's row over its own;
    rows after the probes (the stack's padding) are not read. Both forms: eager torch writes the
    pieces into the output, traced graphs gather them."""
    visual = torch.tensor([[False, True, True, False, True, True], [True, False, False, True, False, False]])
    vis_pos, vis_valid, vis_count, txt_pos, txt_valid, vis_flat, txt_flat = visual_layout(visual)
    batch, seq, width = 2, 6, 3
    text = torch.randn(int((~visual).sum()), width)
    padded = torch.randn(batch, vis_pos.shape[1], width)
    probe_index = torch.tensor([[2, 0], [1, 0]])
    probe_valid = torch.tensor([[True, True], [True, False]])
    probe_rows = torch.randn(batch * 2, width)
    like = torch.empty(batch, seq, 7)
    want = torch.empty(batch, seq, width)
    want.view(-1, width)[txt_flat] = text
    for b in range(batch):
        for i in range(int(vis_count[b])):
            want[b, vis_pos[b, i]] = padded[b, i]
        for j in range(2):
            if probe_valid[b, j]:
                want[b, vis_pos[b, probe_index[b, j]]] = probe_rows[b * 2 + j]
    stacked = torch.cat([text, probe_rows, torch.full((5, width), float("nan"))])  # padding: never read
    got = merge(like, stacked, txt_flat, padded, vis_valid, vis_flat, probe_index, probe_valid)
    assert torch.equal(got, want)
    plain = merge(like, text, txt_flat, padded, vis_valid, vis_flat)  # without probes: the visual rows as they are
    want_plain = torch.empty(batch, seq, width)
    want_plain.view(-1, width)[txt_flat] = text
    want_plain.view(-1, width)[vis_flat] = padded[vis_valid]
    assert torch.equal(plain, want_plain)
