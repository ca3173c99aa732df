"""Row selection for token pruning: score the visual rows, keep the best R per sample, gather.

Kept rows keep their order; text rows always stay. Samples whose kept sequence is shorter than
the longest are left-padded (attention mask 0), so the last position of every row is still its
last real token (what generate reads) and original position ids travel with their rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rows import _padded_positions, counted, data_size, fraction_of, gather_padded


@dataclass
class KeptRows:
    """index [B, S']: the original position of each kept row (0 where `valid` is False, a pad)."""

    index: torch.Tensor
    valid: torch.Tensor


def visual_counts(visual_mask: torch.Tensor) -> torch.Tensor:
    return visual_mask.sum(dim=1)


def keep_counts(counts: torch.Tensor, keep: int | float) -> torch.Tensor:
    """[B] visual rows each sample keeps of its `counts` [B]: an int keep, at most the count; a fraction
    of the count, rounded half to even (as ONNX's Round), at least 1 where the sample has any."""
    if isinstance(keep, int):
        return torch.clamp(counts, max=keep)
    kept = fraction_of(counts, keep, "round").to(counts.dtype)  # integer arithmetic: no float64
    return torch.where(counts > 0, kept.clamp(min=1), counts)


def redundancy_scores(embeds: torch.Tensor, prototypes: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """[B, S]: each visual row's highest cosine similarity to any prototype (higher = more redundant);
    0 on the other rows, which are not scored."""
    positions, valid, _ = _padded_positions(visual_mask)
    rows = F.normalize(gather_padded(embeds.float(), positions), dim=-1)
    protos = F.normalize(prototypes.to(device=embeds.device, dtype=torch.float32), dim=-1)
    best = torch.where(valid, (rows @ protos.T).amax(dim=-1), torch.zeros(positions.shape, device=embeds.device))
    return torch.zeros(visual_mask.shape, device=embeds.device).scatter_add(1, positions, best)


def redundancy_flops(rows: int, prototypes: int, dim: int) -> int:
    """Multiply-adds of the cosine scores of the visual rows (padded to the batch's longest)."""
    return rows * prototypes * dim


def random_scores(visual_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, S] uniform scores from a generator seeded per call: the same input keeps the same rows."""
    # drawn on the host (the same numbers on every device), then moved beside the mask
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(visual_mask.shape, generator=generator, device="cpu").to(visual_mask.device)


def select_rows(visual_mask: torch.Tensor, keep_score: torch.Tensor, counts: torch.Tensor) -> KeptRows:
    """Keep every non-visual row and, per sample b, the counts[b] visual rows of highest keep_score.

    Ties go to the earlier position, so the selection is deterministic. Written for the whole
    batch in ops ONNX has (comparisons, sums, TopK over unique keys; no stable sort, no boolean
    indexing), so the eager stage and the exported prune graph are one code.
    """
    batch, seq = visual_mask.shape
    score = keep_score.float()
    position = torch.arange(seq, device=visual_mask.device)
    # ahead[b, i, j]: visual row j goes before row i (a higher score, or the same score earlier)
    higher = score[:, None, :] > score[:, :, None]
    tied_earlier = (score[:, None, :] == score[:, :, None]) & (position[None, :] < position[:, None])[None]
    rank = ((higher | tied_earlier) & visual_mask[:, None, :]).sum(dim=-1)
    kept = ~visual_mask | (rank < counts[:, None])
    width = data_size(kept.sum(dim=1).max(), seq, low=1)
    # kept rows get keys above every dropped row's, all distinct: the top `width` keys, reversed, are
    # each sample's kept rows in order, after (to the left of) the dropped rows that pad it
    key = torch.where(kept, position + seq, position - seq).expand(batch, seq)
    ordered = key.topk(width, dim=1).values.flip(1)
    valid = ordered >= seq
    return KeptRows(index=torch.where(valid, ordered - seq, torch.zeros_like(ordered)), valid=valid)


def gather_seq(tensor: torch.Tensor, kept: KeptRows, seq_dim: int, fill: int | float = 0) -> torch.Tensor:
    """`tensor` with its sequence axis `seq_dim` (batch axis just before it) cut to the kept rows."""
    index = kept.index
    valid = kept.valid
    lead = seq_dim - 1  # axes before batch (M-RoPE's 3 rows)
    shape = [1] * lead + list(index.shape) + [1] * (tensor.dim() - seq_dim - 1)
    index = index.reshape(shape).expand(*tensor.shape[:lead], *index.shape, *tensor.shape[seq_dim + 1:])
    out = torch.gather(tensor, seq_dim, index)
    valid = valid.reshape(shape)
    if out.dtype == torch.bool:  # onnxruntime has no Where over bool values
        return out & valid if not fill else out | ~valid
    return torch.where(valid, out, torch.full_like(out, fill))


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
    Whole-batch ops ONNX has, as select_rows.
    """
    index, valid = kept.index, kept.valid
    # original rows that were kept (pads point at row 0 with valid False and add nothing)
    hits = torch.zeros(visual_mask.shape, dtype=torch.long, device=index.device).scatter_add(1, index, valid.long())
    kept_visual = visual_mask & (hits > 0)
    dropped_pos, dropped_valid, _ = _padded_positions(visual_mask & ~kept_visual)
    owner_pos, owner_valid, _ = _padded_positions(kept_visual)
    rows = F.normalize(embeds.float(), dim=-1)
    similarity = gather_padded(rows, dropped_pos) @ gather_padded(rows, owner_pos).transpose(1, 2)
    similarity = similarity.masked_fill(~owner_valid[:, None, :], float("-inf"))
    owner = torch.gather(owner_pos, 1, similarity.argmax(dim=-1))  # the first of equal maxima, as ONNX's ArgMax
    counts = kept_visual.float().scatter_add(1, owner, dropped_valid.float())  # [B, S]: m at each kept visual row
    slots = valid & torch.gather(kept_visual, 1, index)
    bias = torch.where(slots, torch.gather(counts, 1, index).clamp(min=1).log(),
                       torch.zeros(index.shape, device=index.device))
    return bias.to(embeds.dtype)  # SDPA wants the query's dtype


def proportional_flops(rows: int, kept: int, dim: int) -> int:
    """Multiply-adds of assigning each dropped row to its most similar kept visual row."""
    return rows * kept * dim


def key_biased_mask(attn_mask: torch.Tensor, key_bias: torch.Tensor, blocked: float | None = float("-inf")
                    ) -> torch.Tensor:
    """An additive SDPA mask: the family's mask (bool: True = attend, or additive float) plus a
    per-key bias [B, S] on every query's scores. `blocked` None: the lowest finite value of the
    bias's own dtype (float32's would be -inf in float16)."""
    bias = key_bias[:, None, None, :]
    if attn_mask.dtype == torch.bool:
        fill = torch.finfo(bias.dtype).min if blocked is None else blocked
        return torch.where(attn_mask, bias, torch.full_like(bias, fill))
    return attn_mask + bias.to(attn_mask.dtype)
