"""Row layout of a batch: where the visual and the text tokens of each sample sit.

Rewritten graphs compute visual and text rows apart. `visual_layout` turns the graph's
`visual_mask` input into index tensors once per forward; every reduced layer reads them.
Samples may hold different numbers of visual tokens (ragged): per-sample indices are padded
to the longest sample, with a validity mask beside them.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def counted(flops=None):
    """Mark a runtime op that does matrix work, so the FLOPs audit gives it a row of its own.

    `flops(*args, **kwargs) -> (visual, text)` counts what the op computes from its real
    inputs; without it fvcore counts the op's own aten calls.
    """

    def mark(fn):
        fn._redlens_counted = True
        fn._redlens_flops = flops
        return fn

    return mark


def data_size(value: torch.Tensor, bound: int, low: int = 0) -> int:
    """A size read from data (a count, at least `low`: clamp the value first), stated to export as
    one in [low, bound] so that graphs of symbolic shape (torch.onnx) can slice with it without
    guarding on its value; in eager torch it is just int(value)."""
    size = value.item()
    # a symbol while exporting and under torch.compile (where dynamo's isinstance says int, hence
    # is_compiling: without the checks inductor cannot lower a slice at it); eager and jit tracing get an int
    if isinstance(size, torch.SymInt) or torch.compiler.is_compiling():
        torch._check(size >= max(low, 0))
        torch._check(size <= bound)
        return size
    return int(size)


@torch.library.custom_op("redlens::select_rows", mutates_args=())
def _select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index)


@_select_rows.register_fake
def _(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.new_empty((index.shape[0], *x.shape[1:]))


def select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(0, index): whole rows, one copy each.

    Under torch.compile an opaque call of that same aten kernel: inductor's own lowering computes
    an index (divisions, a bounds check) per element, unvectorized where sizes are read from data,
    and folds the rows' producer (rotary's sin and cos) into every gathered copy; profiled on a
    SmolVLM-sized decoder that made the hollow layers' key/value gathers cost more than their SDPA.
    """
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _select_rows(x, index)
    return x.index_select(0, index)


def fraction_of(counts: torch.Tensor, fraction: float, rounding: str) -> torch.Tensor:
    """counts [B] (ints) times `fraction`, rounded up ("ceil") or half to even ("round", as ONNX's
    Round), in int64 arithmetic on the counts' device: exact, and no float64 (which some
    accelerators lack). The fraction is taken as the nearest ratio with a denominator up to 2**16
    (0.1 is 1/10); for the fractions configs use this equals Python's float rounding of count * fraction."""
    ratio = Fraction(fraction).limit_denominator(1 << 16)
    num, den = ratio.numerator, ratio.denominator
    scaled = counts.to(torch.int64) * num
    if rounding == "ceil":
        return (scaled + (den - 1)) // den  # non-negative: floor division is ONNX's truncating Div
    if rounding != "round":
        raise ValueError(f"rounding={rounding!r}: 'ceil' or 'round'")
    quotient = scaled // den
    twice_rest = 2 * (scaled - quotient * den)
    up = (twice_rest > den) | ((twice_rest == den) & (quotient % 2 == 1))
    return quotient + up.to(torch.int64)


def _padded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence positions where `mask` [B, S] is True, per sample, left-aligned and padded."""
    counts = mask.sum(dim=1)
    # at least one column (all invalid when no row is True): the same shapes for every input, so an
    # exported graph needs no branch on an empty side
    width = data_size(counts.max().clamp(min=1), max(mask.shape[1], 1), low=1) if mask.numel() else 0
    # The `width` smallest keys are the True positions, in order (keys are unique: no stable sort,
    # which ONNX lacks, is needed).
    seq = mask.shape[1]
    key = (~mask).to(torch.int64) * seq + torch.arange(seq, device=mask.device)
    order = torch.topk(key, width, dim=1, largest=False, sorted=True).indices
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid, counts


def visual_layout(visual_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(vis_pos, vis_valid, vis_count, txt_pos, txt_valid, vis_flat, txt_flat).

    vis_pos/txt_pos [B, Vmax]/[B, Tmax]: sequence positions of each sample's visual/text rows
    (padded with 0, `*_valid` says which are real); vis_count [B]; vis_flat/txt_flat: the same
    rows as indices into the flattened [B * S] rows, in row-major order.
    """
    mask = visual_mask.to(torch.bool)
    vis_pos, vis_valid, vis_count = _padded_positions(mask)
    txt_pos, txt_valid, _ = _padded_positions(~mask)
    flat = torch.arange(mask.numel(), device=mask.device).view_as(mask)
    return vis_pos, vis_valid, vis_count, txt_pos, txt_valid, masked_rows(flat, mask), masked_rows(flat, ~mask)


def masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[mask] for a bool mask over x's leading dims, as an index_select of the True positions:
    the same rows, in an op every exporter translates (ONNX has no boolean indexing)."""
    return select_rows(x.reshape(-1, *x.shape[mask.dim():]), mask.reshape(-1).nonzero().reshape(-1))


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, S, D] -> [B * S, D]."""
    return x.reshape(-1, x.shape[-1])


def flat_positions(positions: torch.Tensor, seq: int) -> torch.Tensor:
    """Positions [B, N] in sequences of `seq` rows as row indices into the flattened [B * seq] rows."""
    return (positions + torch.arange(positions.shape[0], device=positions.device)[:, None] * seq).reshape(-1)


def gather_padded(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, S, ...] at positions [B, N] -> [B, N, ...]: one select of whole rows of the
    flattened [B * S] rows (a gather with an index expanded over D cost 10x more, profiled)."""
    batch, seq = x.shape[:2]
    rows = select_rows(x.reshape(batch * seq, *x.shape[2:]), flat_positions(positions, seq))
    return rows.view(*positions.shape, *x.shape[2:])


def merge_rows(
    like: torch.Tensor,
    text_rows: torch.Tensor,
    txt_flat: torch.Tensor,
    visual_rows: torch.Tensor,
    vis_valid: torch.Tensor,
    vis_flat: torch.Tensor,
    probe_index: torch.Tensor | None = None,
    probe_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text rows and the valid padded visual rows [B, Vmax, D] back in a [B, S, D] tensor like `like`.

    text_rows [N, D]: the first len(txt_flat) rows are the text rows; with probe_index [B, M] (and
    probe_valid) the next B * M rows are each sample's probe rows, which take the place of its
    visual rows at probe_index where valid (the routed probes' full FFN output); rows after those
    (padding) are not read.

    Eager torch writes each piece into the output (three row copies, no concatenation). A traced
    graph (torch.compile, export) gathers instead: one concatenation and one gather of whole rows by
    a source index computed on ints, because writing each piece into a copy of the output cost
    onnxruntime a pass over the whole output per write (ScatterND copies its input).
    """
    if torch.compiler.is_compiling():
        return _merge_by_gather(like, text_rows, txt_flat, visual_rows, vis_valid, vis_flat, probe_index, probe_valid)
    batch, vmax, width = visual_rows.shape
    text, rows = txt_flat.shape[0], like.numel() // like.shape[-1]
    device = txt_flat.device
    # one spare row past the end takes every padded entry's write, and is dropped
    out = torch.empty(rows + 1, text_rows.shape[-1], dtype=like.dtype, device=device)
    out.index_copy_(0, txt_flat, text_rows[:text].to(like.dtype))
    # each padded visual row's output row [B * Vmax]
    target = torch.full((batch * vmax,), rows, dtype=torch.int64, device=device)
    target.index_copy_(0, vis_valid.reshape(-1).nonzero().reshape(-1), vis_flat)
    out.index_copy_(0, target, visual_rows.reshape(-1, width).to(like.dtype))
    if probe_index is not None:
        at = target.view(batch, vmax).gather(1, probe_index).reshape(-1)
        at = torch.where(probe_valid.reshape(-1), at, torch.full_like(at, rows))
        out.index_copy_(0, at, text_rows[text:text + probe_index.numel()].to(like.dtype))
    return out[:rows].view(like.shape[:-1] + text_rows.shape[-1:])


def _merge_by_gather(like, text_rows, txt_flat, visual_rows, vis_valid, vis_flat, probe_index=None, probe_valid=None):
    """merge_rows as one gather of cat([text_rows, visual rows]) (graphs that are traced)."""
    batch, vmax, width = visual_rows.shape
    text, stacked = txt_flat.shape[0], text_rows.shape[0]
    device = txt_flat.device
    # where each padded visual row [B * Vmax] sits in cat([text_rows, visual rows])
    vis_source = torch.arange(batch * vmax, device=device) + stacked
    if probe_index is not None:
        # invalid probes write to a spare entry past the end, dropped after (no clash with a real row)
        spare = batch * vmax
        target = torch.where(probe_valid.reshape(-1), flat_positions(probe_index, vmax),
                             torch.full_like(probe_index.reshape(-1), spare))
        probe_rows = torch.arange(probe_index.numel(), device=device) + text
        vis_source = torch.cat([vis_source, vis_source.new_zeros(1)]).index_copy(0, target, probe_rows)[:spare]
    source = torch.empty(like.shape[:-1], dtype=torch.int64, device=device).view(-1)
    source.index_copy_(0, txt_flat, torch.arange(text, device=device))
    source.index_copy_(0, vis_flat, masked_rows(vis_source.view(batch, vmax), vis_valid))
    rows = torch.cat([text_rows.to(like.dtype), visual_rows.reshape(-1, width).to(like.dtype)])
    return select_rows(rows, source).view(like.shape[:-1] + text_rows.shape[-1:])
