"""`prune.onnx`: the token pruning stage before the first layer as an ONNX graph.

The eager stage (runtime/token_pruning.py `TokenPruning.prune`) is written in whole-batch tensor
ops ONNX has, so the graph is that code exported: score the visual rows (the codebook's
prototypes are a constant of the graph), keep each sample's best rows in order with their
original position ids, left-pad the batch, and with proportional attention compute the key bias.
The random baseline's scores (an integer hash of the seed and each sample's own content,
ops/token_pruning.py `random_scores`) are computed by the same torch function as the torch
module's and enter as the `keep_score` input.

Inputs: inputs_embeds, attention_mask, position_ids, visual_mask (+ keep_score for random);
outputs: the same four cut to the kept rows, prefixed `kept_`, and `key_bias` where the prefill
graph takes one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture.decoder_inputs import DecoderInputs
from ..runtime.token_pruning import TokenPruning

PRUNE = "prune.onnx"
INPUTS = ["inputs_embeds", "attention_mask", "position_ids", "visual_mask"]


def output_names(pruning: TokenPruning) -> list[str]:
    return [f"kept_{name}" for name in INPUTS] + (["key_bias"] if pruning.key_bias else [])


def input_names(pruning: TokenPruning) -> list[str]:
    return INPUTS + (["keep_score"] if pruning.method == "random" else [])


class PruneGraph(nn.Module):
    """TokenPruning.prune as a module to export (before-the-first-layer methods only)."""

    def __init__(self, pruning: TokenPruning):
        super().__init__()
        if pruning.after_layer is not None:
            raise ValueError(f"prune={pruning.method!r} prunes after layer {pruning.layer}: not a stage before the graph")
        self.pruning = pruning
        if pruning.method == "codebook":
            self.register_buffer("prototypes", pruning.prototypes.to(torch.float32))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                visual_mask: torch.Tensor, keep_score: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        inputs = DecoderInputs(inputs_embeds, attention_mask, position_ids, visual_mask)
        scores = keep_score if self.pruning.method == "random" else self.pruning.keep_scores(inputs)
        return self.pruning.prune(inputs, scores).inputs.as_args()


def example_args(pruning: TokenPruning, inputs: DecoderInputs) -> tuple[torch.Tensor, ...]:
    args = (inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, inputs.visual_mask)
    return (*args, pruning.keep_scores(inputs)) if pruning.method == "random" else args


def dynamic_shapes(pruning: TokenPruning, inputs: DecoderInputs) -> dict:
    auto = torch.export.Dim.AUTO
    pos_axis = inputs.position_ids.dim() - 2
    shapes = {"inputs_embeds": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
              "position_ids": {pos_axis: auto, pos_axis + 1: auto}, "visual_mask": {0: auto, 1: auto}}
    if pruning.method == "random":
        shapes["keep_score"] = {0: auto, 1: auto}
    return shapes
