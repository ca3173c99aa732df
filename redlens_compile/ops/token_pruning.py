"""Row selection for token pruning: score the visual rows, keep the best R per sample, gather.

Kept rows keep their order; text rows always stay. Samples whose kept sequence is shorter than
the longest are left-padded (attention mask 0), so the last position of every row is still its
last real token (what generate reads) and original position ids travel with their rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rows import counted


@dataclass
class KeptRows:
    """index [B, S']: the original position of each kept row (0 where `valid` is False, a pad)."""

    index: torch.Tensor
    valid: torch.Tensor


def visual_counts(visual_mask: torch.Tensor) -> torch.Tensor:
    return visual_mask.sum(dim=1)


def redundancy_scores(embeds: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """[B, S]: each row's highest cosine similarity to any prototype (higher = more redundant)."""
    rows = F.normalize(embeds.float(), dim=-1)
    protos = F.normalize(prototypes.to(device=embeds.device, dtype=torch.float32), dim=-1)
    return (rows @ protos.T).amax(dim=-1)


def redundancy_flops(visual_tokens: int, prototypes: int, dim: int) -> int:
    """Multiply-adds of the cosine scores of the visual rows against the codebook."""
    return visual_tokens * prototypes * dim


def random_scores(visual_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, S] uniform scores from a generator seeded per call: the same input keeps the same rows."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(visual_mask.shape, generator=generator).to(visual_mask.device)


def select_rows(visual_mask: torch.Tensor, keep_score: torch.Tensor, counts: torch.Tensor) -> KeptRows:
    """Keep every non-visual row and, per sample b, the counts[b] visual rows of highest keep_score.

    Ties go to the earlier position (a stable sort), so the selection is deterministic.
    """
    batch, seq = visual_mask.shape
    rows: list[torch.Tensor] = []
    for b in range(batch):
        visual = visual_mask[b].nonzero().flatten()
        order = torch.sort(keep_score[b, visual], descending=True, stable=True).indices
        kept_visual = visual[order[: int(counts[b])]]
        kept = (~visual_mask[b]).clone()
        kept[kept_visual] = True
        rows.append(kept.nonzero().flatten())
    width = max(r.numel() for r in rows)
    index = torch.zeros(batch, width, dtype=torch.long, device=visual_mask.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=visual_mask.device)
    for b, r in enumerate(rows):
        index[b, width - r.numel():] = r  # left-padded
        valid[b, width - r.numel():] = True
    return KeptRows(index=index, valid=valid)


def gather_seq(tensor: torch.Tensor, kept: KeptRows, seq_dim: int, fill: int | float = 0) -> torch.Tensor:
    """`tensor` with its sequence axis `seq_dim` (batch axis just before it) cut to the kept rows."""
    index = kept.index
    valid = kept.valid
    lead = seq_dim - 1  # axes before batch (M-RoPE's 3 rows)
    shape = [1] * lead + list(index.shape) + [1] * (tensor.dim() - seq_dim - 1)
    index = index.reshape(shape).expand(*tensor.shape[:lead], *index.shape, *tensor.shape[seq_dim + 1:])
    out = torch.gather(tensor, seq_dim, index)
    return torch.where(valid.reshape(shape), out, torch.full_like(out, fill))


def _last_query_flops(query, key, attn_mask=None, scale=None, enable_gqa=False):
    """Q.K^T of one query per head: batch * heads * keys * head_dim (the visual/text split: all text)."""
    batch, heads, _, head_dim = query.shape
    return 0.0, float(batch * heads * key.shape[-2] * head_dim)


@counted(_last_query_flops)
def last_query_attention(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """[B, S]: the attention of each sample's last query over the keys, averaged over heads.

    FastV's signal, computed from the layer's own SDPA inputs (no eager attention maps): the
    softmax of the last row of Q.K^T, masked as the layer masks it.
    """
    q = query[:, :, -1:, :].float()
    k = key.float()
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).squeeze(-2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        last = attn_mask[..., -1, :]
        if last.dtype == torch.bool:
            scores = scores.masked_fill(~last, float("-inf"))
        else:
            scores = scores + last.float()
    return scores.softmax(dim=-1).mean(dim=1)



def proportional_key_bias(embeds: torch.Tensor, visual_mask: torch.Tensor, kept: KeptRows) -> torch.Tensor:
    """[B, S'] log(m) for each kept visual row standing for m visual rows; 0 for every other row.

    Each dropped visual row is assigned to the kept visual row of the same sample most similar to it
    (cosine, in the embedding space the rows were selected in). Added to every attention score of
    the key, the bias gives a kept row the softmax mass of its m rows (proportional attention, as
    token merging does): what attends to "the image" still sees how much of it each kind fills.
    """
    batch, width = kept.index.shape
    bias = torch.zeros(batch, width, dtype=embeds.dtype, device=embeds.device)  # SDPA wants the query's dtype
    for b in range(batch):
        rows = kept.index[b]
        kept_visual = kept.valid[b] & visual_mask[b, rows]
        if not bool(kept_visual.any()):
            continue
        is_kept = torch.zeros_like(visual_mask[b])
        is_kept[rows[kept.valid[b]]] = True
        dropped = (visual_mask[b] & ~is_kept).nonzero().flatten()
        slots = kept_visual.nonzero().flatten()
        counts = torch.ones(slots.numel(), dtype=torch.float32, device=embeds.device)
        if dropped.numel():
            owners = F.normalize(embeds[b, dropped].float(), dim=-1) @ F.normalize(embeds[b, rows[slots]].float(), dim=-1).T
            counts.index_add_(0, owners.argmax(dim=-1), torch.ones(dropped.numel(), device=embeds.device))
        bias[b, slots] = counts.log().to(bias.dtype)
    return bias


def proportional_flops(dropped: int, kept: int, dim: int) -> int:
    """Multiply-adds of assigning each dropped row to its most similar kept row."""
    return dropped * kept * dim


def key_biased_mask(attn_mask: torch.Tensor, key_bias: torch.Tensor, blocked: float = float("-inf")) -> torch.Tensor:
    """An additive SDPA mask: the family's mask (bool: True = attend, or additive float) plus a
    per-key bias [B, S] on every query's scores."""
    bias = key_bias[:, None, None, :]
    if attn_mask.dtype == torch.bool:
        return torch.where(attn_mask, bias, torch.full_like(bias, blocked))
    return attn_mask + bias.to(attn_mask.dtype)
