"""ThinLinearPass: every linear calls ops.thin_linear; logits as before, thin or not; idempotent."""

import torch
from tiny_families import make_inputs

from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.ops.thin_linear import THIN_ROWS, thin_linear
from redlens_compile.passes import DynamicFFNPass, StripAssertsPass, ThinLinearPass, run_passes
from redlens_compile.passes.selectors import clone_graph_module

TOL = 1e-5


def test_linears_lowered_exact_on_thin_and_short_inputs(captured_family):
    model, _, captured = captured_family("llava")
    linears = [n for n in captured.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]
    gm, records = run_passes(clone_graph_module(captured.graph_module), [StripAssertsPass(), ThinLinearPass()])
    assert records[1].modified
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(thin_linear) == len(linears) > 0
    assert torch.ops.aten.linear.default not in targets
    thin = capture_decoder_inputs(model, captured.adapter, make_inputs(
        "llava", model, text_before=20, text_after=12, batch=2, pad_left=(5,), seed=4))
    assert THIN_ROWS[0] <= thin.inputs_embeds.shape[0] * thin.seq_len <= THIN_ROWS[1]
    for inputs in (captured.example, thin):
        with torch.no_grad():
            want, got = captured.graph_module(*inputs.as_args()), gm(*inputs.as_args())
        for a, b in zip(got, want):
            assert (a - b).abs().max().item() <= TOL
    _, again = run_passes(gm, [ThinLinearPass()])
    assert not again[0].modified
    # Later passes still find the lowered linears (the dynamic FFN matches them).
    _, ffn = run_passes(gm, [DynamicFFNPass(keep={0: 0.5})])
    assert ffn[0].modified
