"""CausalFastPathPass: unreduced SDPA calls take is_causal when the mask is exactly causal."""

import torch
from tiny_families import make_inputs

from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.ops.causal_attention import is_causal_mask, sdpa_causal_fast_path
from redlens_compile.passes import CausalFastPathPass, StripAssertsPass, run_passes
from redlens_compile.passes.selectors import clone_graph_module

TOL = 1e-5


def test_fast_path_on_llava_decoder(captured_family):
    model, _, captured = captured_family("llava")
    gm, records = run_passes(clone_graph_module(captured.graph_module), [StripAssertsPass(), CausalFastPathPass()])
    assert records[1].modified
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(sdpa_causal_fast_path) == 3 and targets.count(is_causal_mask) == 1
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    padded = capture_decoder_inputs(model, captured.adapter,
                                    make_inputs("llava", model, batch=2, pad_left=(3,), seed=2))
    for inputs in (captured.example, padded):  # causal, then padded (the mask is used as it is)
        with torch.no_grad():
            want, got = captured.decoder(*inputs.as_args()), gm(*inputs.as_args())
        for a, b in zip(got, want):
            assert (a - b).abs().max().item() <= TOL
    _, again = run_passes(gm, [CausalFastPathPass()])
    assert not again[0].modified


def test_is_causal_mask():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    assert is_causal_mask(causal)
    padded = causal.clone()
    padded[1, 0, :, 0] = False
    assert not is_causal_mask(padded)
    assert not is_causal_mask(causal.float())  # additive masks are used as they are
