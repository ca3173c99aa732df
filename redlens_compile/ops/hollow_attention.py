"""Runtime op of hollow attention (inserted by passes/hollow_attention.py).

Text queries attend as before: every key the family's mask allows. A visual query at position
i attends to the non-visual keys the mask allows and to the visual keys j with |i - j| < w
that the mask allows (for causal families: i - w < j <= i). Computed blockwise (plan_blocks):
each sample's visual rows are cut into blocks of c = ceil(w / 2) rows; a block's queries see
the text keys before it, the blocks behind it that a window reaches and their own block (and
as many ahead when the family lets image tokens look ahead), with the exact mask inside.
Work per visual query: P + 1.5w keys instead of S. The FLOPs function counts exactly that.

Where the queries and keys sit (positions, blocks, masks, the output's source rows) depends on the
mask, the layout and the window only: `hollow_plan` computes it once per forward (a graph node) and
each hollow layer's `hollow_attention` reads it.

Text queries cost what they cost in the family's SDPA: a query sees itself and the keys before it
(analysis/flops.py's convention for every decoder SDPA). When the mask is exactly causal the text
rows every sample starts with (before its first image) run as one causal SDPA over their own
keys, as the unreduced layer's causal fast path runs them, instead of against all S keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .causal_attention import sdpa_decomposed
from .rows import counted, data_size, flat_positions, select_rows


SMALL_BLOCK = 4  # query blocks of up to this many rows take _block_attention, larger ones SDPA


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A bool view of an SDPA mask: True where a key may be attended (bool or additive float)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _head_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, d] as rows [B * S, H, d], contiguous: a view where x is laid out so (as the
    projections leave q, k and v), one copy where it is not (rotary's output is [B, H, S, d]-major).
    index_select over the strided view took ~4x longer in the forward than over the contiguous copy
    (0.67 ms against 0.16 for a block's keys at SmolVLM geometry, 2 threads), and a layer gathers each
    source more than once."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).contiguous()


def _gather_heads(rows: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """rows [B * S, H, d] (_head_rows) at index [B * N] -> [B, H, N, d]: one index_select of whole rows
    (far faster than a gather with an index expanded over d)."""
    out = select_rows(rows, index)
    return out.view(batch, -1, *rows.shape[1:]).transpose(1, 2)


def _row_source(x: torch.Tensor) -> torch.Tensor:
    """What rows of x [B, H, S, d] are gathered from: per head ([H, B * S, d], _head_major) in eager
    torch, whole rows ([B * S, H, d], _head_rows) in traced graphs (torch.compile's opaque select_rows
    takes whole rows, and the ONNX export keeps the Gathers its records were measured with)."""
    return _head_rows(x) if torch.compiler.is_compiling() else _head_major(x)


def _gather(source: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """_row_source(x) at rows index [B * N] -> [B, H, N, d]."""
    if torch.compiler.is_compiling():
        return _gather_heads(source, index, batch)
    return _gather_head_major(source, index, batch)


def _mask_at(allowed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """allowed [B, 1, S, S] at query positions rows [B, R] x key positions cols [B, R, C] -> [B, R, C]."""
    # one gather over each sample's flattened S x S mask (exports as a plain GatherElements)
    batch, seq = allowed.shape[0], allowed.shape[-1]
    flat = rows[:, :, None] * seq + cols
    return allowed[:, 0].reshape(batch, seq * seq).gather(1, flat.reshape(batch, -1)).view(flat.shape)


def _looks_ahead(allowed: torch.Tensor, visual_mask: torch.Tensor) -> bool:
    """Does the family let an image token see the next image token (bidirectional image attention)?"""
    nxt = visual_mask[:, :-1] & visual_mask[:, 1:]
    diag = torch.diagonal(allowed[:, 0], offset=1, dim1=1, dim2=2)
    return bool((diag & nxt).any())


def mask_looks_ahead(attn_mask: torch.Tensor, visual_mask: torch.Tensor) -> bool:
    """_looks_ahead of an SDPA mask [B or 1, 1, S, S], as a graph node once per forward and mask
    (passes/hollow_attention.py): one host sync per forward, not one per layer."""
    batch, seq = visual_mask.shape
    return _looks_ahead(_allowed(attn_mask).expand(batch, 1, seq, seq), visual_mask.to(torch.bool))


def _nonzero(size) -> bool:
    """size != 0; under torch.compile a size read from data is taken as nonzero rather than guarded on
    (the text rows' width: visual_layout clamps it to at least 1)."""
    if torch.compiler.is_compiling():
        return True
    return bool(size)


def _size_min(a, b):
    """min of two sizes; symbolic (no guard on a size read from data) while exporting or compiling."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) or torch.compiler.is_compiling():
        return torch.sym_min(a, b)
    return min(a, b)


@dataclass(frozen=True)
class BlockPlan:
    """How the visual queries are cut: blocks of `block` rows; each sees its `text_keys`
    candidates and a local run of `width` visual rows starting `lead` rows before it."""

    block: int
    blocks: int
    lead: int
    trail: int
    width: int
    text_keys: int


def plan_blocks(allowed: torch.Tensor, visual_mask: torch.Tensor, vis_pos: torch.Tensor, txt_pos: torch.Tensor,
                window: int, mask_is_causal: bool = False, looks_ahead: bool | None = None) -> BlockPlan | None:
    """Blocks of about w/2 rows: a causal query block then needs the 2 blocks before it, so it
    computes T' + 1.5w keys per query (blocks of w would need T' + 2w). T' is the number of text
    keys before the block's last query (all text keys when image tokens look ahead)."""
    span = vis_pos.shape[1]
    if span == 0:
        return None
    # Under torch.compile the block and the blocks a window reaches behind are the static ones (fewer
    # visual rows than that are padding, masked like any): inductor's index arithmetic then has no
    # min of a size read from data, which it simplifies very slowly.
    static = torch.compiler.is_compiling() and not torch.compiler.is_exporting()  # the ONNX export keeps its plan
    block = max(1, (window + 1) // 2) if static else _size_min(span, max(1, (window + 1) // 2))
    # ceil divisions written as (n - 1) // d + 1 over non-negative n - 1: export then sees
    # blocks >= 1, and ONNX's truncating integer Div gives the same numbers as torch's floor
    blocks = (span - 1) // block + 1
    reach = (window - 2) // block + 1 if window > 1 else 0
    behind = reach if static or window <= 1 else _size_min(reach, blocks - 1)
    if looks_ahead is None:
        looks_ahead = not mask_is_causal and _looks_ahead(allowed, visual_mask.to(torch.bool))
    ahead = behind if looks_ahead and not mask_is_causal else 0
    if ahead or txt_pos.shape[1] == 0:
        text_keys = txt_pos.shape[1]
    else:
        # Text rows are sorted with padding last; count those before each block's last query.
        last = torch.nn.functional.pad(vis_pos, (0, blocks * block - span), value=-1)
        last = last.view(vis_pos.shape[0], blocks, block).amax(-1)
        seq = allowed.shape[-1]
        sorted_text = torch.where(torch.arange(txt_pos.shape[1], device=txt_pos.device)[None] <
                                  (~visual_mask.to(torch.bool)).sum(1, keepdim=True), txt_pos, seq)
        # text keys at or before each block's last query (a searchsorted, in ops ONNX has)
        before = (sorted_text[:, None, :] <= last[:, :, None]).sum(-1)
        text_keys = data_size(before.max(), txt_pos.shape[1])
    lead = behind * block
    trail = ahead * block + blocks * block - span
    return BlockPlan(block, blocks, lead, trail, (behind + 1 + ahead) * block, text_keys)


def text_prefix(vis_pos: torch.Tensor, vis_valid: torch.Tensor, seq: int) -> int:
    """P: rows [0, P) are text in every sample (the earliest first visual row; S without any)."""
    if vis_pos.shape[1] == 0:
        return seq
    first = torch.where(vis_valid[:, 0], vis_pos[:, 0], torch.full_like(vis_pos[:, 0], seq)).min()
    return data_size(first, seq)


def text_query_pairs(txt_pos: torch.Tensor, txt_valid: torch.Tensor, seq: int) -> torch.Tensor:
    """(query, key) pairs of the text queries, counted as the family's SDPA is counted: a real row
    at position i sees i + 1 keys; a padded entry (a sample with fewer text rows) runs against all S."""
    return torch.where(txt_valid, txt_pos + 1, torch.full_like(txt_pos, seq)).sum()


class HollowPlan(NamedTuple):
    """Where hollow attention's queries and keys sit. It is the same for every layer of a forward
    that reads the same mask with the same window, so the graph computes it once (a `hollow_plan`
    node, as `visual_layout` is) and each layer's `hollow_attention` reads it: the layers keep their
    gathers and SDPAs, not the index arithmetic (profiled on a SmolVLM-sized decoder at 2 threads,
    rebuilding it per layer was a third of a hollow layer's time). Rows are indices into the
    flattened [B * S] rows."""

    txt_pos: torch.Tensor  # [B, T] every sample's text rows (what the FLOPs count reads)
    txt_valid: torch.Tensor
    prefix: int  # rows [0, P) run as one causal SDPA over their own keys (0: they take the text SDPA)
    text_rows: torch.Tensor | None  # [B * Nt] the other text queries (None: none)
    text_allowed: torch.Tensor | None  # [B, 1, Nt, S] the keys they see (padded entries: every key)
    blocks: BlockPlan | None  # None: no visual row
    small: bool  # small blocks: _block_attention (text keys scored once); else an SDPA per block
    query_rows: torch.Tensor | None  # [B * nb * c] the blocks' query rows, padded
    key_pos: torch.Tensor | None  # [B, nb, T' + width] each block's keys, as positions (the key bias' index)
    key_rows: torch.Tensor | None  # [B * nb * (T' + width)] the same keys as rows (SDPA blocks)
    text_key_rows: torch.Tensor | None  # [B * T'] the text keys (small blocks)
    local_rows: torch.Tensor | None  # [B * nb * width] each block's local visual keys (small blocks)
    allowed: torch.Tensor | None  # [B, nb, c, T' + width] the keys each block query sees (padded rows: all)
    source: torch.Tensor  # [B * S] each output row's row in cat(prefix rows, text rows, block rows)
    # `allowed` as the additive mask SDPA turns a bool mask into (0 / -inf, in the scores' dtype), for
    # the eager SDPA blocks: made once per forward instead of inside every layer's SDPA call (measured
    # ~9% of a window-112 layer's block SDPA at SmolVLM geometry, 2 threads; the same numbers, bit for bit)
    block_scores: torch.Tensor | None = None
    text_scores: torch.Tensor | None = None  # text_allowed, additive in the same way (its SDPA: 12% less)


class _RowSource:
    """The output's source index, from the pieces of rows in the order hollow_attention concatenates
    them: one gather of whole rows at the end instead of a write of each piece into an output copy
    (which cost onnxruntime a ScatterND pass over the whole output per piece)."""

    def __init__(self, batch: int, seq: int, device: torch.device):
        self.seq, self.rows = seq, 0
        # every position is written by one piece (text or visual); 0 keeps an index in range regardless
        self.source = torch.zeros(batch * seq, dtype=torch.int64, device=device)

    def add(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """The next piece's rows [B * N], in the order of positions [B, N], belong there (where valid)."""
        targets = flat_positions(positions, self.seq)
        if valid is None:
            index = torch.arange(targets.shape[0], device=targets.device)
        else:
            index = valid.reshape(-1).nonzero().reshape(-1)
            targets = select_rows(targets, index)
        self.source.index_copy_(0, targets, index + self.rows)
        self.rows = self.rows + positions.numel()


def hollow_plan(attn_mask: torch.Tensor, visual_mask: torch.Tensor, vis_pos: torch.Tensor, vis_valid: torch.Tensor,
                txt_pos: torch.Tensor, txt_valid: torch.Tensor, window: int, mask_is_causal: bool = False,
                looks_ahead: bool | None = None, score_dtype: torch.dtype | None = None) -> HollowPlan:
    """The HollowPlan of a forward: attn_mask [B or 1, 1, S, S], visual_mask [B, S] and the layout rows.

    mask_is_causal (checked once per forward by the graph): the mask is exactly causal, so its
    entries are computed from positions instead of gathered from the S x S tensor, and the text
    rows every sample starts with run as one causal SDPA over their own keys.
    score_dtype (the queries' dtype, set by the pass): the masks of the eager SDPA blocks and text
    queries are also made additive in it, once here (HollowPlan.block_scores, text_scores).
    """
    batch, seq = visual_mask.shape
    device = visual_mask.device
    allowed = _allowed(attn_mask).expand(batch, 1, seq, seq)

    def family_mask(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return cols <= rows[..., None] if mask_is_causal else _mask_at(allowed, rows, cols)

    source = _RowSource(batch, seq, device)
    # Text queries: unchanged, every key the mask allows. With an exactly causal mask the leading
    # text rows [0, P) see only keys before P: one causal SDPA over those (no S-wide scores for them).
    # (Not under torch.compile: an SDPA over a data-sized prefix that may be empty guards on its size;
    # there the text rows all take the next SDPA, a few rows against all S keys.)
    prefix, query_pos, query_valid = 0, txt_pos, txt_valid
    if mask_is_causal and txt_pos.shape[1] and not torch.compiler.is_compiling():
        prefix = _size_min(text_prefix(vis_pos, vis_valid, seq), txt_pos.shape[1])
        if prefix:
            source.add(torch.arange(prefix, device=device).expand(batch, prefix))
            query_pos, query_valid = txt_pos[:, prefix:], txt_valid[:, prefix:]
    text_rows = text_allowed = None
    if _nonzero(query_pos.shape[1]):
        rows = family_mask(query_pos, torch.arange(seq, device=device).expand(batch, query_pos.shape[1], seq))
        text_allowed = (rows | ~query_valid[:, :, None])[:, None]  # padded rows: any finite result, discarded
        text_rows = flat_positions(query_pos, seq)
        source.add(query_pos, query_valid)
    text_scores = None if text_allowed is None else _additive(text_allowed, score_dtype)

    blk = plan_blocks(allowed, visual_mask, vis_pos, txt_pos, window, mask_is_causal, looks_ahead)
    if blk is None:
        return HollowPlan(txt_pos, txt_valid, prefix, text_rows, text_allowed, None, False,
                          None, None, None, None, None, None, source.source, text_scores=text_scores)
    block, blocks = blk.block, blk.blocks
    pos = torch.nn.functional.pad(vis_pos, (blk.lead, blk.trail))
    valid = torch.nn.functional.pad(vis_valid, (blk.lead, blk.trail))
    starts = torch.arange(blocks, device=device) * block
    local = starts[:, None] + torch.arange(blk.width, device=device)[None, :]  # [nb, width]
    text_keys = txt_pos[:, None, :blk.text_keys].expand(-1, blocks, -1)
    key_pos = torch.cat([text_keys, pos[:, local]], dim=2)  # [B, nb, T' + width]
    key_valid = torch.cat([txt_valid[:, None, :blk.text_keys].expand(-1, blocks, -1), valid[:, local]], dim=2)
    key_visual = torch.zeros_like(key_valid)
    key_visual[:, :, blk.text_keys:] = True

    block_pos = pos[:, blk.lead:blk.lead + blocks * block].reshape(batch, blocks, block)
    block_valid = valid[:, blk.lead:blk.lead + blocks * block].reshape(batch, blocks, block)
    family = family_mask(block_pos.reshape(batch, -1),
                         key_pos[:, :, None, :].expand(-1, -1, block, -1).reshape(batch, blocks * block, -1))
    family = family.view(batch, blocks, block, -1)
    near = (block_pos[..., None] - key_pos[:, :, None, :]).abs() < window
    mask = family & key_valid[:, :, None, :] & (~key_visual[:, :, None, :] | near)
    mask = mask | ~block_valid[..., None]  # padded query rows: any finite result, discarded
    source.add(block_pos.reshape(batch, -1), block_valid.reshape(batch, -1))
    small = (window + 1) // 2 <= SMALL_BLOCK
    block_scores = None if small else _additive(mask, score_dtype)  # small blocks mask their own scores
    return HollowPlan(
        txt_pos, txt_valid, prefix, text_rows, text_allowed, blk, small,
        query_rows=flat_positions(block_pos.reshape(batch, -1), seq),
        key_pos=key_pos,
        key_rows=None if small else flat_positions(key_pos.reshape(batch, -1), seq),
        text_key_rows=flat_positions(txt_pos[:, :blk.text_keys], seq) if small else None,
        local_rows=flat_positions(pos[:, local].reshape(batch, -1), seq) if small else None,
        allowed=mask,
        source=source.source,
        block_scores=block_scores,
        text_scores=text_scores,
    )


def _additive(allowed: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A bool SDPA mask as the additive one SDPA itself would make of it (0 / -inf in `dtype`), for eager
    torch; None where no dtype is known and in traced graphs, whose SDPA lowerings keep the bool mask
    they were measured with."""
    if dtype is None or not dtype.is_floating_point or torch.compiler.is_compiling():
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _hollow_flops(q, k, v, plan, scale=None, enable_gqa=False, key_bias=None, stack_heads=False):
    """Text queries at the pairs they see (as the unreduced SDPA is counted), each visual block
    against its text candidates and its local run (padded rows included: they are computed)."""
    batch, heads, seq, head_dim = q.shape
    per_pair = heads * (head_dim + v.shape[-1])
    text = float(text_query_pairs(plan.txt_pos, plan.txt_valid, seq)) * per_pair
    blk = plan.blocks
    visual = 0 if blk is None else batch * blk.blocks * blk.block * (blk.text_keys + blk.width) * per_pair
    return float(visual), float(text)


def _reads_scores(scores: torch.Tensor | None, key_bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Does an SDPA take the plan's additive mask as it is (made, no key bias to add, the queries' dtype)?"""
    return scores is not None and key_bias is None and scores.dtype == dtype


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> rows [B * N, H, d] (a view where x is the transposed view SDPA returns)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _biased(allowed_keys: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as SDPA takes it; with a key bias (broadcast to the mask), additive."""
    if bias is None:
        return allowed_keys
    bias = bias.to(dtype)
    return torch.where(allowed_keys, bias, torch.full_like(bias, torch.finfo(dtype).min))


@counted(_hollow_flops)
def hollow_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HollowPlan,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_bias: torch.Tensor | None = None,
    stack_heads: bool = False,
) -> torch.Tensor:
    """SDPA with the hollow pattern of `plan` (hollow_plan). q [B, H, S, d]; k, v [B, H_kv, S, d].

    key_bias [B, S] (token pruning's proportional attention, passes/key_bias.py): added to every
    score of its key, for the text and the window keys a query keeps, as a full layer adds it.
    stack_heads (the ONNX lowering sets it): the visual blocks' SDPA stacks the query heads of each
    key head as rows (GQA without repeating keys) instead of enable_gqa, which torch.onnx lowers
    to an Expand of the blocks' keys and values to every query head and a transpose of the copy;
    the text queries' SDPA is causal_attention.sdpa_decomposed (no NaN guard over its scores).
    """
    batch, heads, seq, _ = q.shape
    sdpa = dict(scale=scale, enable_gqa=enable_gqa)
    pieces = []
    # the text and the block queries are gathered from one source (none for a prefix alone)
    q_rows = _row_source(q) if plan.text_rows is not None or plan.blocks is not None else None
    if plan.prefix:
        lead = plan.prefix
        causal = None
        if key_bias is not None:  # the same causal rows, the bias on their keys
            pos = torch.arange(lead, device=q.device)
            causal = _biased((pos[None, :] <= pos[:, None])[None, None], key_bias[:, None, None, :lead], q.dtype)
        pieces.append(_as_rows(F.scaled_dot_product_attention(
            q[:, :, :lead], k[:, :, :lead], v[:, :, :lead], attn_mask=causal, is_causal=causal is None, **sdpa)))
    if plan.text_rows is not None:
        text_bias = None if key_bias is None else key_bias[:, None, None, :]
        # the lowering's form (stack_heads) decomposes this SDPA without torch.onnx's NaN guard
        attend = sdpa_decomposed if stack_heads else F.scaled_dot_product_attention
        text_mask = plan.text_scores if _reads_scores(plan.text_scores, key_bias, q.dtype) else \
            _biased(plan.text_allowed, text_bias, q.dtype)
        pieces.append(_as_rows(attend(_gather(q_rows, plan.text_rows, batch), k, v, attn_mask=text_mask, **sdpa)))
    if plan.blocks is not None:
        if not enable_gqa and k.shape[1] != heads:
            raise ValueError(f"{heads} query heads over {k.shape[1]} key heads need enable_gqa=True")
        pieces.append(_visual_blocks(q_rows, heads, k, v, plan, scale, enable_gqa, key_bias, stack_heads))
    out = select_rows(torch.cat(pieces), plan.source)
    return out.view(batch, seq, *out.shape[1:]).transpose(1, 2)  # a transposed view: what the graph reshapes next


def _visual_blocks(q_rows: torch.Tensor, heads: int, k: torch.Tensor, v: torch.Tensor, plan: HollowPlan,
                   scale: float | None, enable_gqa: bool, key_bias: torch.Tensor | None, stack_heads: bool
                   ) -> torch.Tensor:
    """The visual queries' output rows [B * nb * c, H, d], block by block; q_rows: _row_source(q)."""
    batch = k.shape[0]
    blk, kv_heads = plan.blocks, k.shape[1]
    blocks, block = blk.blocks, blk.block
    # the key bias at each block's keys [B, nb, T' + width] (text keys and the window's visual keys)
    key_bias_at = None if key_bias is None else \
        key_bias.gather(1, plan.key_pos.reshape(batch, -1)).view(plan.key_pos.shape)
    q_blocks = _gather(q_rows, plan.query_rows, batch)  # [B, H, nb * c, d]
    if plan.small:
        # Small blocks: the text keys are scored once for all visual queries (measured ~35% faster
        # than the flash kernel at w=8; slower from w=15 up, where the kernel's blocks pay off).
        k_rows, v_rows = _row_source(k), _row_source(v)
        text_k, text_v = (_gather(x, plan.text_key_rows, batch) for x in (k_rows, v_rows))  # [B, H_kv, T', d]
        local_k, local_v = (_gather(x, plan.local_rows, batch).view(batch, kv_heads, blocks, blk.width, -1)
                            for x in (k_rows, v_rows))
        return _block_attention(q_blocks, text_k, text_v, local_k, local_v, plan.allowed, scale, key_bias_at)
    k_rows, v_rows = _row_source(k), _row_source(v)
    n_keys = plan.key_pos.shape[-1]
    k_blk = _gather(k_rows, plan.key_rows, batch).view(batch, kv_heads, blocks, n_keys, -1).transpose(1, 2)
    v_blk = _gather(v_rows, plan.key_rows, batch).view(batch, kv_heads, blocks, n_keys, -1).transpose(1, 2)
    q_blk = q_blocks.view(batch, heads, blocks, block, -1).transpose(1, 2)
    if _reads_scores(plan.block_scores, key_bias_at, q_rows.dtype):
        mask = plan.block_scores
    else:
        mask = _biased(plan.allowed, None if key_bias_at is None else key_bias_at[:, :, None, :], q_rows.dtype)
    if (stack_heads or torch.compiler.is_compiling()) and kv_heads != heads:
        # query head h reads key head h // G: the G heads of a key head as G * block rows
        group = heads // kv_heads
        out = F.scaled_dot_product_attention(
            q_blk.reshape(batch * blocks, kv_heads, group * block, -1),
            k_blk.reshape(batch * blocks, kv_heads, n_keys, -1),
            v_blk.reshape(batch * blocks, kv_heads, n_keys, -1),
            attn_mask=mask.reshape(batch * blocks, 1, 1, block, n_keys).expand(-1, -1, group, -1, -1)
            .reshape(batch * blocks, 1, group * block, n_keys),
            scale=scale,
        )
    else:
        out = F.scaled_dot_product_attention(
            q_blk.reshape(batch * blocks, heads, block, -1),
            k_blk.reshape(batch * blocks, kv_heads, n_keys, -1),
            v_blk.reshape(batch * blocks, kv_heads, n_keys, -1),
            attn_mask=mask.reshape(batch * blocks, 1, block, n_keys),
            scale=scale, enable_gqa=enable_gqa,
        )
    # [B * nb, H, c, d] (stacked: [B * nb, H_kv, G * c, d], the same memory) -> rows in (b, block, row) order
    return out.reshape(batch * blocks, heads, block, -1).transpose(1, 2).reshape(-1, heads, out.shape[-1])


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, d] as [H, B * S, d]: a view for one sample (as rotary and the projections leave
    keys and values), one copy for more."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])


def _gather_head_major(x: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """x [H, B * S, d] (_head_major) at rows index [B * N] -> [B, H, N, d], each head's rows contiguous:
    the small-block matmuls then read their keys as they are, and SDPA its blocks. Gathered as whole
    rows ([B * N, H, d], from a contiguous copy of x) the small-block matmuls copied the local keys and
    values again: 1.7 ms against 0.11 for the keys of a window-8 layer; a window-112 layer's hollow
    attention took 10.0-10.3 ms with whole-row gathers, 8.0-8.2 ms per head (SmolVLM geometry, 2 threads)."""
    out = x.index_select(1, index)
    return out.view(x.shape[0], batch, -1, x.shape[2]).transpose(0, 1)


def _block_attention(q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, local_k: torch.Tensor,
                     local_v: torch.Tensor, allowed: torch.Tensor, scale: float | None,
                     key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of small query blocks over shared text keys and their block's local keys.

    q [B, H, nb * c, d] (gathered per head, or a transposed view of rows); text_k/v [B, H_kv, T', d];
    local_k/v [B, H_kv, nb, w, d]; allowed [B, nb, c, T' + w] -> output rows [B * nb * c, H, d].
    One softmax over both key sets (exactly SDPA over the concatenated keys); key_bias [B, nb, T' + w]
    is added to each block's scores at its keys. The query heads of a key head are stacked into the
    rows of one matmul (GQA without repeating keys), rows of a block in (query row, head) order, which
    is the order the query rows hold them in: one copy in, one out. The text scores are one matmul for
    all blocks instead of one gather of the text keys per block.
    """
    batch, heads, rows, dim = q.shape
    kv_heads, blocks = local_k.shape[1], local_k.shape[2]
    group, block, n_text = heads // kv_heads, allowed.shape[2], text_k.shape[2]
    # [B, H_kv, nb, c * G, d]: block b's rows are (query row, head of the group)
    # (the first reshape is a view of q gathered either way, per head or as whole rows; the last one copies)
    by_block = q.reshape(batch, kv_heads, group, blocks, block, dim).permute(0, 1, 3, 4, 2, 5) \
        .reshape(batch, kv_heads, blocks, block * group, dim)
    text_scores = torch.matmul(by_block.view(batch, kv_heads, rows * group, dim), text_k.transpose(-1, -2))
    local_scores = torch.matmul(by_block, local_k.transpose(-1, -2))  # [B, H_kv, nb, c * G, w]
    scores = torch.cat([text_scores.view(batch, kv_heads, blocks, block * group, n_text), local_scores], dim=-1)
    # the softmax in float32 (as the fused SDPA kernels accumulate it), back in the values' dtype
    scores = (scores.float() * (dim ** -0.5 if scale is None else scale)).view(batch, kv_heads, blocks, block, group, -1)
    if key_bias is not None:  # [B, nb, keys] onto [B, H_kv, nb, c, G, keys]
        scores = scores + key_bias.float()[:, None, :, None, None, :]
    probs = scores.masked_fill(~allowed[:, None, :, :, None, :], float("-inf")).softmax(dim=-1).to(text_v.dtype)
    probs = probs.view(batch, kv_heads, blocks, block * group, -1)
    text_out = torch.matmul(probs[..., :n_text].reshape(batch, kv_heads, rows * group, n_text), text_v)
    out = text_out.view(batch, kv_heads, blocks, block * group, dim) + torch.matmul(probs[..., n_text:], local_v)
    # -> rows (sample, block, query row) x heads (key head, head of the group)
    return out.view(batch, kv_heads, blocks, block, group, dim).permute(0, 2, 3, 1, 4, 5) \
        .reshape(-1, heads, dim).to(q.dtype)


def _masked_flops(q, k, v, attn_mask, visual_mask, window, scale=None, enable_gqa=False, key_bias=None):
    # The fallback computes every (query, key) score: count it as full causal attention.
    batch, heads, seq, head_dim = q.shape
    pairs = torch.arange(1, seq + 1, device=q.device).expand(batch, seq)
    vis = visual_mask.to(torch.bool)
    per_pair = heads * (head_dim + v.shape[-1])
    return float((pairs * vis).sum()) * per_pair, float((pairs * ~vis).sum()) * per_pair


@counted(_masked_flops)
def hollow_attention_masked(q, k, v, attn_mask, visual_mask, window: int, scale=None, enable_gqa=False, key_bias=None):
    """The fallback: full SDPA over a mask with the hollow pattern cut out. Correct, saves nothing."""
    seq = q.shape[2]
    vis = visual_mask.to(torch.bool)
    pos = torch.arange(seq, device=q.device)
    far = (pos[:, None] - pos[None, :]).abs() >= window
    cut = vis[:, None, :, None] & vis[:, None, None, :] & far
    allowed = _allowed(attn_mask) & ~cut
    if key_bias is not None:
        bias = key_bias[:, None, None, :].to(q.dtype)
        allowed = torch.where(allowed, bias, torch.full_like(bias, torch.finfo(q.dtype).min))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)
