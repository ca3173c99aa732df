"""Linear layers over few rows, computed output-features-major (inserted by passes/thin_linear.py).

A reduction leaves GEMMs thinner than the original's: the pruned sequence (text + R kept
rows), the text and probe rows of a reduced FFN. MKL's `x @ W.T` runs those at a lower rate
than the full sequence on this project's 2-core CPU, while the same product as `W @ x.T` runs
near it (`benchmarks/gemm_shapes.py` measures both). So between THIN_ROWS[0] and THIN_ROWS[1]
rows the op computes `(W @ x.T).T`, rows padded to a multiple of ROW_ALIGN (an unaligned
leading dimension cost the most at 167 rows), and returns the transposed view (downstream ops read any layout; a copy back would cost what
was saved). Each output element is the same dot product; measured bit-equal to F.linear from
64 rows up. Outside the range, under tracing or export, and for autograd, it is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rows import counted

THIN_ROWS = (64, 512)
ROW_ALIGN = 16


@counted()  # fvcore counts the F.linear it runs while traced
def thin_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), output-features-major when x has few rows."""
    if not _plain_eager(x, weight):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not THIN_ROWS[0] <= rows <= THIN_ROWS[1]:
        return F.linear(x, weight, bias)
    out = output_major_mm(x.reshape(rows, x.shape[-1]), weight)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def output_major_mm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [R, in] @ weight.T as (weight @ rows.T).T, R padded to ROW_ALIGN: [R, out], column-major."""
    count = rows.shape[0]
    pad = -count % ROW_ALIGN
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    return torch.mm(weight, rows.t())[:, :count].t()


def row_padding(rows: int, x: torch.Tensor) -> int:
    """Zero rows to append to an operand of `rows` rows that thin linears will read, so that every
    one of them runs output-major with no pad of its own: the pad is a copy per linear, and for a
    column-major input (the output of an output-major linear, e.g. the FFN's hidden rows before
    its down projection) a transposing one; an operand padded once serves all its linears.
    0 where thin_linear takes F.linear (another device, too few or many rows) and under
    torch.compile or export (no data-sized pad in a compiled or exported graph). fvcore's jit
    trace gets the pad, so the FLOPs audit counts the rows that run."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return 0
    if not THIN_ROWS[0] <= rows <= THIN_ROWS[1]:
        return 0
    return -rows % ROW_ALIGN


def _plain_eager(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Tracers (fvcore's jit trace, torch.export for ONNX) must see the plain op; autograd, too. The
    # rates above are MKL's on a CPU.
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or x.device.type != "cpu":
        return False
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter):
        return False
    if x.dim() < 2 or weight.dim() != 2 or x.dtype != weight.dtype:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


__all__ = ["ROW_ALIGN", "THIN_ROWS", "output_major_mm", "row_padding", "thin_linear"]
