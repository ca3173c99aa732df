"""Row helpers: counts times a fraction without float64; rows put back in place by merge_rows."""

import math

import pytest
import torch

from redlens_compile.ops.rows import _merge_by_gather, contiguous_run, fraction_of, gather_padded, merge_rows, visual_layout


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


@pytest.mark.parametrize("visual", [
    [[False, False, True, True, True, False]],  # one image between text rows
    [[False, False, False, True, True, True], [True, True, True, False, False, False]],  # one run across samples
], ids=["one_sample", "run_across_samples"])
def test_rows_in_one_run_are_sliced_with_the_same_result(visual):
    """Where the visual rows are one run of the flattened rows, eager gather_padded is a view of them and
    merge_rows concatenates (then writes the valid probes over theirs): the same rows as the gather forms."""
    visual = torch.tensor(visual)
    vis_pos, vis_valid, vis_count, txt_pos, txt_valid, vis_flat, txt_flat = visual_layout(visual)
    assert contiguous_run(vis_flat) == int(vis_flat[0])
    batch, seq, width = *visual.shape, 4
    x = torch.randn(batch, seq, width)
    rows = gather_padded(x, vis_pos)
    assert rows.data_ptr() == x.view(-1, width)[int(vis_flat[0])].data_ptr()  # a view: no copy
    assert torch.equal(rows.reshape(-1, width), x.view(-1, width)[vis_flat])
    text = torch.randn(int((~visual).sum()), width)
    padded = torch.randn(batch, vis_pos.shape[1], width)
    probe_index = torch.tensor([[1, 2]] * batch)
    probe_valid = torch.tensor([[True, False]] * batch)
    stacked = torch.cat([text, torch.randn(batch * 2, width), torch.full((3, width), float("nan"))])
    like = torch.empty(batch, seq, 7)
    for args in ((), (probe_index, probe_valid)):
        got = merge_rows(like, stacked, txt_flat, padded, vis_valid, vis_flat, *args)
        assert torch.equal(got, _merge_by_gather(like, stacked, txt_flat, padded, vis_valid, vis_flat, *args))
        assert torch.equal(got.view(-1, width)[txt_flat], text)
    for b in range(batch):
        assert torch.equal(got[b, vis_pos[b, 1]], stacked[len(text) + 2 * b])  # the valid probe's row
        assert torch.equal(got[b, vis_pos[b, 2]], padded[b, 2])  # the invalid one's: its visual row


def test_contiguous_run_refuses_anything_but_one_run():
    assert contiguous_run(torch.tensor([3, 4, 5])) == 3
    for flat in ([3, 5, 6], [5, 4, 3], [3, 4, 4], [0, 1, 2, 0]):
        assert contiguous_run(torch.tensor(flat)) is None
    assert contiguous_run(torch.tensor([], dtype=torch.int64)) is None
