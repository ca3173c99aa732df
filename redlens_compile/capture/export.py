"""torch.export of the decoder with a dynamic batch and sequence axis."""

from __future__ import annotations

import logging

import torch
from torch.export import Dim, ExportedProgram

from ..errors import CaptureError
from .decoder_inputs import DecoderInputs
from .decoder_module import DecoderWithHead

logger = logging.getLogger(__name__)

MAX_BATCH = 1024


def export_decoder(decoder: DecoderWithHead, example: DecoderInputs, max_seq_len: int) -> ExportedProgram:
    """Export `decoder` non-strict; batch and sequence stay symbolic.

    A batch of 1 would be specialized by export (0/1 specialization), so the example is traced
    at batch 2 with the batch Dim starting at 1; the graph then serves any batch size.
    """
    if example.batch_size == 1:
        example = example.repeat_batch(2)
    if example.seq_len > max_seq_len:
        raise CaptureError(f"example sequence length {example.seq_len} exceeds the model's maximum {max_seq_len}")
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=2, max=max(max_seq_len, 3))
    pos_batch_axis = example.position_ids.dim() - 2
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        {pos_batch_axis: batch, pos_batch_axis + 1: seq},
        {0: batch, 1: seq},
    )
    logger.info("exporting decoder (batch=%d, seq=%d)", example.batch_size, example.seq_len)
    try:
        with torch.no_grad():
            return torch.export.export(decoder, example.as_args(), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export failures are long; keep the cause attached
        raise CaptureError(
            f"torch.export could not capture the decoder of {type(decoder.language_model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
