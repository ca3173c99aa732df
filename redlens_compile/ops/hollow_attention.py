"""Runtime op of hollow attention (inserted by passes/hollow_attention.py).

Text queries attend as before: every key the family's mask allows. A visual query at position
i attends to the non-visual keys the mask allows and to the visual keys j with |i - j| < w
that the mask allows (for causal families: i - w < j <= i). Computed blockwise: each sample's
visual rows are cut into blocks of c = min(w, longest visual span) rows; a block's queries
see the sample's text keys, the previous block and their own block (and the next block when
the family lets image tokens look ahead), with the exact mask inside. Work per visual query:
T + 2c keys instead of S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rows import counted


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A bool view of an SDPA mask: True where a key may be attended (bool or additive float)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _gather_heads(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, d] at positions [B, N] -> [B, H, N, d]."""
    index = positions[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return x.gather(2, index)


def _mask_at(allowed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """allowed [B, 1, S, S] at query positions rows [B, R] x key positions cols [B, R, C] -> [B, R, C]."""
    batch = torch.arange(allowed.shape[0], device=allowed.device)[:, None, None]
    return allowed[:, 0][batch, rows[:, :, None], cols]


def _looks_ahead(allowed: torch.Tensor, visual_mask: torch.Tensor) -> bool:
    """Does the family let an image token see the next image token (bidirectional image attention)?"""
    nxt = visual_mask[:, :-1] & visual_mask[:, 1:]
    diag = torch.diagonal(allowed[:, 0], offset=1, dim1=1, dim2=2)
    return bool((diag & nxt).any())


def _hollow_flops(q, k, v, attn_mask, visual_mask, vis_pos, vis_valid, txt_pos, txt_valid, window, scale=None,
                  enable_gqa=False):
    """Visible (query, key) pairs, as the audit counts full attention (causal, padding ignored)."""
    batch, heads, seq, head_dim = q.shape
    per_pair = heads * (head_dim + v.shape[-1])
    vis = visual_mask.to(torch.bool)
    pos = torch.arange(seq, device=vis.device)
    text_before = torch.cumsum((~vis).to(torch.int64), dim=1)  # non-visual keys j <= i
    vis_before = torch.cumsum(vis.to(torch.int64), dim=1)
    shifted = torch.nn.functional.pad(vis_before, (window, 0))[:, :seq]  # visual keys j <= i - w
    visual_keys = text_before + vis_before - shifted
    text_keys = (pos + 1).expand_as(vis)
    return (float((visual_keys * vis).sum()) * per_pair, float((text_keys * ~vis).sum()) * per_pair)


@counted(_hollow_flops)
def hollow_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor,
    visual_mask: torch.Tensor,
    vis_pos: torch.Tensor,
    vis_valid: torch.Tensor,
    txt_pos: torch.Tensor,
    txt_valid: torch.Tensor,
    window: int,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA with the hollow pattern. q [B, H, S, d]; k, v [B, H_kv, S, d]; attn_mask [B or 1, 1, S, S]."""
    batch, heads, seq, _ = q.shape
    allowed = _allowed(attn_mask).expand(batch, 1, seq, seq)
    out = q.new_zeros(batch, heads, seq, v.shape[-1])
    sdpa = dict(scale=scale, enable_gqa=enable_gqa)

    # Text queries: unchanged, every key the mask allows.
    if txt_pos.shape[1]:
        rows = _mask_at(allowed, txt_pos, torch.arange(seq, device=q.device).expand(batch, txt_pos.shape[1], seq))
        rows = rows | ~txt_valid[:, :, None]  # padded rows: any finite result, discarded below
        text_out = F.scaled_dot_product_attention(_gather_heads(q, txt_pos), k, v, attn_mask=rows[:, None], **sdpa)
        out[txt_valid.nonzero(as_tuple=True)[0], :, txt_pos[txt_valid]] = text_out.transpose(1, 2)[txt_valid]

    span = vis_pos.shape[1]
    if span == 0:
        return out
    block = min(window, span)
    blocks = -(-span // block)
    ahead = _looks_ahead(allowed, visual_mask.to(torch.bool))
    # Visual positions padded to whole blocks, with one empty block in front (and behind when
    # looking ahead) so that every block has neighbours to gather.
    lead, trail = block, (block if ahead else 0) + blocks * block - span
    pos = torch.nn.functional.pad(vis_pos, (lead, trail))
    valid = torch.nn.functional.pad(vis_valid, (lead, trail))
    width = (3 if ahead else 2) * block
    starts = torch.arange(blocks, device=q.device) * block
    local = starts[:, None] + torch.arange(width, device=q.device)[None, :]  # [nb, width]
    key_pos = torch.cat([txt_pos[:, None, :].expand(-1, blocks, -1), pos[:, local]], dim=2)  # [B, nb, T + width]
    key_valid = torch.cat([txt_valid[:, None, :].expand(-1, blocks, -1), valid[:, local]], dim=2)
    key_visual = torch.zeros_like(key_valid)
    key_visual[:, :, txt_pos.shape[1]:] = True

    query_pos = pos[:, lead:lead + blocks * block].reshape(batch, blocks, block)
    query_valid = valid[:, lead:lead + blocks * block].reshape(batch, blocks, block)
    family = _mask_at(allowed, query_pos.reshape(batch, -1),
                      key_pos[:, :, None, :].expand(-1, -1, block, -1).reshape(batch, blocks * block, -1))
    family = family.view(batch, blocks, block, -1)
    near = (query_pos[..., None] - key_pos[:, :, None, :]).abs() < window
    mask = family & key_valid[:, :, None, :] & (~key_visual[:, :, None, :] | near)
    mask = mask | ~query_valid[..., None]

    n_keys = key_pos.shape[-1]
    flat_keys = key_pos.reshape(batch, -1)
    k_blk = _gather_heads(k, flat_keys).view(batch, k.shape[1], blocks, n_keys, -1).transpose(1, 2)
    v_blk = _gather_heads(v, flat_keys).view(batch, v.shape[1], blocks, n_keys, -1).transpose(1, 2)
    q_blk = _gather_heads(q, query_pos.reshape(batch, -1)).view(batch, heads, blocks, block, -1).transpose(1, 2)
    vis_out = F.scaled_dot_product_attention(
        q_blk.reshape(batch * blocks, heads, block, -1),
        k_blk.reshape(batch * blocks, k.shape[1], n_keys, -1),
        v_blk.reshape(batch * blocks, v.shape[1], n_keys, -1),
        attn_mask=mask.reshape(batch * blocks, 1, block, n_keys),
        **sdpa,
    )
    vis_out = vis_out.view(batch, blocks, heads, block, -1).transpose(1, 2).reshape(batch, heads, blocks * block, -1)
    vis_out = vis_out[:, :, :span]
    out[vis_valid.nonzero(as_tuple=True)[0], :, vis_pos[vis_valid]] = vis_out.transpose(1, 2)[vis_valid]
    return out


def _masked_flops(q, k, v, attn_mask, visual_mask, window, scale=None, enable_gqa=False):
    # The fallback computes every (query, key) score: count it as full causal attention.
    batch, heads, seq, head_dim = q.shape
    pairs = torch.arange(1, seq + 1, device=q.device).expand(batch, seq)
    vis = visual_mask.to(torch.bool)
    per_pair = heads * (head_dim + v.shape[-1])
    return float((pairs * vis).sum()) * per_pair, float((pairs * ~vis).sum()) * per_pair


@counted(_masked_flops)
def hollow_attention_masked(q, k, v, attn_mask, visual_mask, window: int, scale=None, enable_gqa=False):
    """The fallback: full SDPA over a mask with the hollow pattern cut out. Correct, saves nothing."""
    seq = q.shape[2]
    vis = visual_mask.to(torch.bool)
    pos = torch.arange(seq, device=q.device)
    far = (pos[:, None] - pos[None, :]).abs() >= window
    cut = vis[:, None, :, None] & vis[:, None, None, :] & far
    allowed = _allowed(attn_mask) & ~cut
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)
