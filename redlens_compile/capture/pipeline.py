"""capture(): split the model, export its decoder, annotate the graph, check it against eager."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import fx, nn

from ..errors import CaptureError
from .annotate import annotate_graph
from .decoder_inputs import DecoderInputs, capture_decoder_inputs
from .decoder_module import DecoderWithHead
from .decoder_parts import DecoderPart
from .export import export_decoder, served_seq_range
from .families import FamilyAdapter, adapter_for

# Max abs logit difference between the captured graph and the eager model on the example.
CAPTURE_TOLERANCE = 1e-4


@dataclass
class CapturedDecoder:
    adapter: FamilyAdapter
    decoder: DecoderWithHead
    example: DecoderInputs
    graph_module: fx.GraphModule
    seq_range: tuple[int, int | None] = (2, None)  # (shortest, longest) sequence the graph serves


@dataclass
class SplitDecoder:
    """The decoder as two graphs cut after `layer` (capture_split): head runs layers 0..K -> hidden
    state, tail layers K+1.. -> logits."""

    layer: int
    head: fx.GraphModule
    tail: fx.GraphModule
    seq_range: tuple[int, int | None]  # the head's (the served prompt lengths)


def max_seq_len(language_model: nn.Module) -> int:
    """The longest sequence the exported graph's dynamic axis admits."""
    return int(getattr(language_model.config, "max_position_embeddings", 4096) or 4096)


def capture(model: nn.Module, example_inputs: Mapping[str, Any]) -> CapturedDecoder:
    """Split `model`, export its decoder with dynamic batch/sequence and annotate the graph."""
    adapter = adapter_for(model)
    model.eval()
    example = capture_decoder_inputs(model, adapter, example_inputs)
    decoder = DecoderWithHead(adapter.language_model(model), adapter.lm_head(model), adapter.decoder_masks(model)).eval()
    longest = max_seq_len(adapter.language_model(model))
    program = export_decoder(decoder, example, max_seq_len=longest)
    graph_module = program.module()
    annotate_graph(graph_module)
    return CapturedDecoder(adapter, decoder, example, graph_module, served_seq_range(program, longest))


def check_capture(captured: CapturedDecoder, reference_logits: torch.Tensor) -> None:
    """Never a silent wrong answer: the captured graph must reproduce the eager logits."""
    with torch.no_grad():
        logits = captured.graph_module(*captured.example.as_args())[0]
    diff = (logits - reference_logits).abs().max().item()
    if not diff <= CAPTURE_TOLERANCE:
        raise CaptureError(
            f"the captured decoder graph differs from the eager model on the example (max abs logit diff "
            f"{diff:.3g} > {CAPTURE_TOLERANCE}); please report this model and transformers version"
        )


def capture_split(captured: CapturedDecoder, model: nn.Module, layer: int) -> SplitDecoder:
    """Export the decoder as two graphs cut after `layer`: (layers 0..K -> hidden, K+1.. -> logits)."""
    language_model = captured.adapter.language_model(model)
    num_layers = len(language_model.layers)
    max_len = max_seq_len(language_model)
    masks = captured.adapter.decoder_masks(model)
    head = DecoderPart(language_model, 0, layer + 1, None, masks).eval()
    tail = DecoderPart(language_model, layer + 1, num_layers, captured.adapter.lm_head(model), masks).eval()
    head_program = export_decoder(head, captured.example, max_seq_len=max_len)
    head_gm = head_program.module()
    annotate_graph(head_gm)
    with torch.no_grad():
        hidden = head_gm(*captured.example.as_args())[0]
    example = captured.example
    tail_gm = export_decoder(tail, DecoderInputs(hidden, example.attention_mask, example.position_ids,
                                                 example.visual_mask), max_seq_len=max_len).module()
    annotate_graph(tail_gm)
    # The two graphs chained must be the decoder: checked on the example before any pass runs.
    with torch.no_grad():
        logits = tail_gm(hidden, example.attention_mask, example.position_ids, example.visual_mask)[0]
        want = captured.graph_module(*example.as_args())[0]
    diff = (logits - want).abs().max().item()
    if not diff <= CAPTURE_TOLERANCE:
        raise CaptureError(f"the decoder cut after layer {layer} does not reproduce the whole decoder (max abs logit "
                           f"diff {diff:.3g}); prune before the first layer (codebook, random) instead")
    return SplitDecoder(layer, head_gm, tail_gm, served_seq_range(head_program, max_len))
