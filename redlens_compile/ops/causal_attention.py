"""Runtime ops of the causal fast path (inserted by passes/causal_fast_path.py).

Export bakes the family's mask into every SDPA call as a materialized [B, 1, S, S] tensor,
while eager transformers passes `is_causal=True` when nothing is padded, which lets the CPU
flash kernel skip the blocks above the diagonal. These ops check the mask once per forward and
take the same fast path when the mask is exactly causal; any other mask (padding, sliding
windows, bidirectional image spans) is used as it is. `sdpa_causal_chunks` is the export's form of
the fast path for masks that never let a query see a later key, and `sdpa_decomposed` the export's
SDPA over a bool mask (exporters/onnx_lowering.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rows import counted


def is_causal_mask(mask: torch.Tensor) -> bool:
    """True when the bool mask [B, 1, S, S] is exactly lower-triangular for every sample."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        return False
    seq = mask.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril_()
    return bool(torch.equal(mask, causal.expand_as(mask)))


@counted()
def sdpa_causal_fast_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                          mask_is_causal: bool, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    if mask_is_causal and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)


CAUSAL_CHUNKS = 4


def sees_no_later_key(mask: torch.Tensor) -> bool:
    """Does the SDPA mask [B or 1, 1, S, S] (bool or additive) allow no key after its query?"""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return not bool(torch.triu(allowed, diagonal=1).any())


def sdpa_decomposed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention over a bool mask [B or 1, 1 or H, S, T], as two products, one
    additive mask and a softmax: the form of graphs that decompose SDPA themselves (ONNX).

    torch.onnx's own decomposition makes the mask additive with -inf and then guards every
    probability against NaN (IsNaN and Where over all [B, H, S, T] scores: together as costly as the
    QK product in onnxruntime's profile), and expands keys and values to every query head. Here
    blocked keys score the lowest finite value, and a query row that no key may be attended by is
    set to 0 after (what torch's SDPA returns for it), on its [B, H, S, d] output; the query heads
    of each key head are rows of one product. A float mask (or one not [B, H, S, T]) is left to
    F.scaled_dot_product_attention.
    """
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or q.dim() != 4:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
    batch, heads, rows, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    if heads != kv_heads and not enable_gqa:
        raise ValueError(f"{heads} query heads over {kv_heads} key heads need enable_gqa=True")
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    lowest = torch.finfo(q.dtype).min
    bias = torch.where(attn_mask, torch.zeros((), dtype=q.dtype, device=q.device),
                       torch.full((), lowest, dtype=q.dtype, device=q.device))
    # query head h reads key head h // group: [B, H_kv, group, S, T] scores, the mask over the groups
    bias = bias[:, :, None] if bias.shape[1] == 1 else bias.view(bias.shape[0], kv_heads, group, rows, keys)
    scores = torch.matmul(q.reshape(batch, kv_heads, group * rows, dim) * scale, k.transpose(-1, -2))
    weights = torch.softmax(scores.view(batch, kv_heads, group, rows, keys) + bias, dim=-1)
    out = torch.matmul(weights.view(batch, kv_heads, group * rows, keys), v).view(batch, heads, rows, v.shape[-1])
    # where (not a product): in float16 a blocked score can round to -inf, and a row of those is NaN
    has_key = attn_mask.any(dim=-1, keepdim=True)
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


def sdpa_causal_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                       chunks: int = CAUSAL_CHUNKS, scale: float | None = None, enable_gqa: bool = False,
                       decomposed: bool = False) -> torch.Tensor:
    """SDPA over a mask that lets no query see a later key, as `chunks` blocks of queries, each
    against the keys up to its own last row: the keys cut off are masked for every query of the
    block, so the numbers are the masked SDPA's, for (chunks + 1) / (2 * chunks) of its scores
    (5/8 at 4). The causal fast path of graphs with no is_causal switch driven by data (ONNX);
    `decomposed`: each block as sdpa_decomposed."""
    seq = q.shape[2]
    sdpa = sdpa_decomposed if decomposed else F.scaled_dot_product_attention
    outs = []
    for j in range(chunks):
        start, end = (seq * j) // chunks, (seq * (j + 1)) // chunks
        outs.append(sdpa(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=attn_mask[:, :, start:end, :end],
                         scale=scale, enable_gqa=enable_gqa))
    return torch.cat(outs, dim=2)
