"""The dynamic FFN's row stack (padded once for the thin linears) and its weight slices."""

import torch
import torch.nn.functional as F

from redlens_compile.ops.dynamic_ffn import probe_part, slice_in_features, stack_rows, text_part
from redlens_compile.ops.thin_linear import ROW_ALIGN, THIN_ROWS, row_padding, thin_linear


def test_stack_is_padded_once_and_its_parts_and_linears_read_the_real_rows():
    g = torch.Generator().manual_seed(0)
    text, probes = torch.randn(64, 24, generator=g), torch.randn(2, 52, 24, generator=g)
    stacked = stack_rows(text, probes)
    assert stacked.shape == (176, 24)  # 168 rows up to the next multiple of ROW_ALIGN
    assert torch.equal(stacked[168:], torch.zeros(8, 24))
    assert torch.equal(text_part(stacked, text), text)
    assert torch.equal(probe_part(stacked, text, probes), probes)
    # up then down through thin linears: the down reads the column-major hidden rows as they are
    up, down = torch.randn(40, 24, generator=g), torch.randn(24, 40, generator=g)
    with torch.no_grad():
        hidden = thin_linear(stacked, up)
        assert hidden.stride(0) == 1  # output-major, and no pad of its own (already aligned)
        out = thin_linear(F.silu(hidden), down)
    want = F.linear(F.silu(F.linear(stacked, up)), down)
    assert (out - want).abs().max().item() < 1e-5
    # no pad where thin_linear takes F.linear, nor where the rows are aligned already
    assert row_padding(THIN_ROWS[0] - 1, text) == 0 and row_padding(THIN_ROWS[1] + 1, text) == 0
    assert row_padding(176, text) == 0 and row_padding(167, text) == -167 % ROW_ALIGN


def test_slice_in_features_keeps_each_samples_columns():
    weight = torch.randn(6, 10)
    channels = torch.tensor([[1, 4, 7], [0, 2, 9]])
    got = slice_in_features(weight, channels)
    assert got.shape == (2, 3, 6)
    for b in range(2):
        assert torch.equal(got[b], weight[:, channels[b]].t())
