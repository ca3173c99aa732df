"""DynamicFFNPass: exact at ffn_keep=1.0, text rows untouched, sliced matmuls counted, idempotent."""

import pytest
import torch
from conftest import ALL_FAMILIES
from tiny_families import ffn_output, make_inputs

from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.ops.dynamic_ffn import batched_matmul, top_channels
from redlens_compile.ops.rows import merge_rows
from redlens_compile.passes import DeadCodeEliminationPass, DynamicFFNPass, StripAssertsPass, run_passes
from redlens_compile.passes.dynamic_ffn import kept_channels
from redlens_compile.passes.selectors import clone_graph_module, ffn_of_layer

TOL = 1e-5


def reduced(captured, keep: float, probes=0.25, gm=None):
    layers = len(captured.decoder.language_model.layers)
    gm = clone_graph_module(captured.graph_module) if gm is None else gm
    passes = [StripAssertsPass(), DynamicFFNPass(keep={i: keep for i in range(layers)}, probe_tokens=probes),
              DeadCodeEliminationPass()]
    gm, records = run_passes(gm, passes)
    return gm, records, layers


def other_inputs(family, model, adapter):
    longer = make_inputs(family, model, text_before=9, text_after=6, seed=3)
    batch = make_inputs(family, model, text_before=5, text_after=3, batch=2, pad_left=(4,), seed=5)
    return [capture_decoder_inputs(model, adapter, x) for x in (longer, batch)]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_keep_all_channels_is_exact_and_idempotent(captured_family, family):
    model, _, captured = captured_family(family)
    gm, records, layers = reduced(captured, keep=1.0)
    assert records[1].modified
    matmuls = [n for n in gm.graph.nodes if n.target is batched_matmul]
    assert len(matmuls) == 3 * layers  # gate, up and down of the visual rows, per layer
    for inputs in [captured.example, *other_inputs(family, model, captured.adapter)]:
        with torch.no_grad():
            want = captured.graph_module(*inputs.as_args())
            got = gm(*inputs.as_args())
        for a, b in zip(got, want):
            assert (a - b).abs().max().item() <= TOL
    _, again = run_passes(gm, [DynamicFFNPass(keep={i: 1.0 for i in range(layers)})])
    assert not again[0].modified


def test_text_rows_equal_the_original_ffn_bit_for_bit(captured_family):
    model, _, captured = captured_family("llava")
    gm = clone_graph_module(captured.graph_module)
    match, _ = ffn_of_layer(gm, 1)
    reader = next(iter(match.down.users))  # reads the FFN's output: after the rewrite, the merged rows
    gm, _, _ = reduced(captured, keep=0.25, gm=gm)
    ffn = captured.decoder.language_model.layers[1].mlp
    x = torch.randn(2, captured.example.seq_len, ffn.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    visual = captured.example.repeat_batch(2).visual_mask.clone()
    visual[1, :5] = False  # ragged visual counts
    # Feed x to the FFN's entry node; everything else runs as the rewritten graph says.

    merged, = (n for n in reader.all_input_nodes if n.target is merge_rows)  # text and visual rows back together
    inputs = captured.example.repeat_batch(2)
    inputs.visual_mask = visual
    out = ffn_output(gm, match.entry, merged, x, inputs.as_args())
    with torch.no_grad():
        want = ffn(x)
    text = ~visual
    assert torch.equal(out[text], want[text])
    assert not torch.allclose(out[visual], want[visual], atol=1e-3)  # visual rows did change


def test_top_channels_picks_the_largest_mean_activation():
    act = torch.tensor([[[1.0, -5.0, 0.1, 2.0], [1.0, -3.0, 0.1, -6.0], [100.0, 100.0, 100.0, 100.0]]])
    valid = torch.tensor([[True, True, False]])  # the third probe is padding and must not count
    assert top_channels(act, valid, 2).tolist() == [[1, 3]]


def test_kept_channels_round_up_to_aligned_counts_on_real_widths():
    assert kept_channels(0.5, 8960) == 4480
    assert kept_channels(0.2109375, 8960) == 1904  # ceil gives 1890: rounded up to 16
    assert kept_channels(0.11865234375, 8960) == 1072
    assert kept_channels(0.999, 1030) == 1030  # never above the width
    assert kept_channels(0.25, 96) == 24 and kept_channels(0.3, 96) == 29  # small widths: ceil(keep * F) as is
    assert kept_channels(0.0001, 96) == 1
