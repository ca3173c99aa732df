"""LastPositionLogitsPass: the lm_head reads the last position only; its logits equal the full graph's."""

import torch

from redlens_compile.passes import StripAssertsPass, run_passes
from redlens_compile.passes.last_position_logits import LastPositionLogitsPass
from redlens_compile.passes.selectors import clone_graph_module


def test_last_position_logits(captured_family):
    _, _, captured = captured_family("qwen2-vl")
    gm, records = run_passes(clone_graph_module(captured.graph_module), [StripAssertsPass(), LastPositionLogitsPass()])
    assert records[1].modified
    args = captured.example.as_args()
    with torch.no_grad():
        full, last = captured.graph_module(*args), gm(*args)
    assert last[0].shape == (full[0].shape[0], 1, full[0].shape[2])
    assert (last[0][:, 0] - full[0][:, -1]).abs().max().item() <= 1e-6  # one-row GEMM: rounding only
    for a, b in zip(last[1:], full[1:]):  # the KV cache is untouched
        assert torch.equal(a, b)
    _, again = run_passes(gm, [LastPositionLogitsPass()])
    assert not again[0].modified
