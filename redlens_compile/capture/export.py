"""torch.export of the decoder with a dynamic batch and sequence axis."""

from __future__ import annotations

import logging

import sympy
import torch
from torch.utils._sympy.numbers import int_oo
from torch.export import Dim, ExportedProgram

from ..errors import CaptureError
from .decoder_inputs import DecoderInputs
from .decoder_module import DecoderWithHead

logger = logging.getLogger(__name__)

MAX_BATCH = 1024


# graph_module.meta key: (shortest, longest) sequence the exported graph serves.
def _export(decoder, example: DecoderInputs, seq) -> ExportedProgram:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    pos_batch_axis = example.position_ids.dim() - 2
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        {pos_batch_axis: batch, pos_batch_axis + 1: seq},
        {0: batch, 1: seq},
    )
    with torch.no_grad():
        return torch.export.export(decoder, example.as_args(), dynamic_shapes=dynamic_shapes, strict=False)


def export_decoder(decoder: DecoderWithHead, example: DecoderInputs, max_seq_len: int) -> ExportedProgram:
    """Export `decoder` non-strict; batch and sequence stay symbolic.

    A batch of 1 would be specialized by export (0/1 specialization), so the example is traced
    at batch 2 with the batch Dim starting at 1; the graph then serves any batch size. Where the
    family's code constrains the length (sliding-window masks branch on it), export is asked
    for the range it can serve instead, and `served_seq_range` reads it back (the masks the graph
    builds itself, capture/decoder_module.py DecoderMasks, serve every length).
    """
    if example.batch_size == 1:
        example = example.repeat_batch(2)
    if example.seq_len > max_seq_len:
        raise CaptureError(f"example sequence length {example.seq_len} exceeds the model's maximum {max_seq_len}")
    logger.info("exporting decoder (batch=%d, seq=%d)", example.batch_size, example.seq_len)
    try:
        try:
            return _export(decoder, example, Dim("seq", min=2, max=max(max_seq_len, 3)))
        except torch._dynamo.exc.UserError as exc:
            if "Constraints violated" not in str(exc):
                raise
            logger.info("the decoder constrains the sequence length; exporting the range it serves")
            return _export(decoder, example, Dim.AUTO)
    except Exception as exc:  # export failures are long; keep the cause attached
        raise CaptureError(
            f"torch.export could not capture the decoder of {type(decoder.language_model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def served_seq_range(program: ExportedProgram, max_seq_len: int) -> tuple[int, int]:
    """(shortest, longest) sequence the program's graph serves: its range for the sequence axis."""
    embeds = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "inputs_embeds")
    seq = embeds.meta["val"].shape[1]
    if isinstance(seq, int):
        return seq, seq
    bounds = program.range_constraints.get(seq.node.expr)
    if bounds is None:
        return 2, max_seq_len
    # torch.export's unbounded range ends at int_oo, whose sympy `is_finite` is True: compare it.
    upper = bounds.upper
    longest = max_seq_len if upper == int_oo or upper == sympy.oo else min(max_seq_len, int(upper))
    return int(bounds.lower), longest
