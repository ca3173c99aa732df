"""prune.onnx: the pruning stage before the first layer, exported, gives the eager stage's rows,
positions, masks and key bias in onnxruntime on a batch it was not exported with (other length,
ragged visual counts, tied scores, M-RoPE positions)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from redlens_compile.capture.decoder_inputs import DecoderInputs
from redlens_compile.exporters import prune_graph
from redlens_compile.runtime.token_pruning import TokenPruning

DIM = 16


def decoder_inputs(seq: int, visual_rows: list[range], position_rows: int, seed: int) -> DecoderInputs:
    generator = torch.Generator().manual_seed(seed)
    batch = len(visual_rows)
    embeds = torch.randn(batch, seq, DIM, generator=generator)
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    for b, rows in enumerate(visual_rows):
        visual[b, list(rows)] = True
    embeds[:, 5:9] = embeds[:, 4:5]  # equal rows: tied scores, settled by position
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded second sample
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if position_rows > 1:
        positions = torch.stack([positions, positions * 2, positions + 3])
    return DecoderInputs(embeds, mask, positions, visual)


def export(pruning: TokenPruning, example: DecoderInputs, path) -> ort.InferenceSession:
    program = torch.onnx.export(prune_graph.PruneGraph(pruning).eval(), prune_graph.example_args(pruning, example),
                                input_names=prune_graph.input_names(pruning),
                                output_names=prune_graph.output_names(pruning),
                                dynamic_shapes=prune_graph.dynamic_shapes(pruning, example), dynamo=True)
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


PRUNINGS = {
    "random-proportional": lambda: TokenPruning("random", 0.25, seed=3, proportional=True),
    "random-count": lambda: TokenPruning("random", 5, seed=1),
    "codebook-proportional": lambda: TokenPruning(
        "codebook", 0.3, prototypes=torch.randn(7, DIM, generator=torch.Generator().manual_seed(9)), proportional=True),
}


@pytest.mark.parametrize("position_rows", [1, 3])
@pytest.mark.parametrize("name", list(PRUNINGS))
def test_onnxruntime_keeps_the_rows_the_eager_stage_keeps(name, position_rows, tmp_path):
    pruning = PRUNINGS[name]()
    session = export(pruning, decoder_inputs(30, [range(3, 23), range(4, 24)], position_rows, seed=0),
                     tmp_path / "prune.onnx")
    # another length, other visual counts per sample (ragged: 32 and 20)
    inputs = decoder_inputs(44, [range(2, 34), range(10, 30)], position_rows, seed=1)
    want = pruning(inputs)
    args = prune_graph.example_args(pruning, inputs)
    got = session.run(None, dict(zip(prune_graph.input_names(pruning), [a.numpy() for a in args])))
    assert got[0].shape == tuple(want.inputs.inputs_embeds.shape)
    assert np.array_equal(got[0], want.inputs.inputs_embeds.numpy())
    for out, field in zip(got[1:4], ("attention_mask", "position_ids", "visual_mask")):
        assert np.array_equal(out, getattr(want.inputs, field).numpy()), field
    if pruning.key_bias:
        assert np.abs(got[4] - want.inputs.key_bias.numpy()).max() <= 1e-6
        assert (want.inputs.key_bias > 0).any()  # some kept row stands for dropped ones
    else:
        assert len(got) == 4


def test_stages_after_a_layer_are_not_a_prune_graph():
    with pytest.raises(ValueError, match="after layer 1"):
        prune_graph.PruneGraph(TokenPruning("vtw", 0, layer=1))
