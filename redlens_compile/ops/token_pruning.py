"""Row selection for token pruning: score the visual rows, keep the best R per sample, gather.

Kept rows keep their order; real text rows always stay, the batch's pad rows go. Samples whose
kept sequence is shorter than the longest are left-padded (attention mask 0), whatever the
input's padding side, so the last position of every row is its last real token (what generate
reads) and original position ids travel with their rows. The selection is linear in S (the
proportional assignment is a dropped x kept similarity, counted as matrix work).
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


def _normalized(rows: torch.Tensor) -> torch.Tensor:
    """F.normalize(rows.float(), dim=-1) (within float rounding), in place on `rows`, a gathered copy:
    no normalized copy beside it. The norm is the square root of a sum of squares (a passing
    temporary of the squares), which exports as Mul, ReduceSum, Sqrt: onnxruntime's ReduceL2 over
    the last axis ran a 768 x 1536 norm 10x slower than the same rows' matmul (prune.onnx's
    profile, benchmarks/results/onnx_profile.json)."""
    rows = rows.float()
    norm = (rows * rows).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return rows.div_(norm)


def redundancy_scores(embeds: torch.Tensor, prototypes: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """[B, S]: each visual row's highest cosine similarity to any prototype (higher = more redundant);
    0 on the other rows, which are not scored."""
    positions, valid, _ = _padded_positions(visual_mask)
    rows = _normalized(gather_padded(embeds, positions))
    protos = F.normalize(prototypes.to(device=embeds.device, dtype=torch.float32), dim=-1)
    best = torch.where(valid, (rows @ protos.T).amax(dim=-1), torch.zeros(positions.shape, device=embeds.device))
    return torch.zeros(visual_mask.shape, device=embeds.device).scatter_add(1, positions, best)


def redundancy_flops(rows: int, prototypes: int, dim: int) -> int:
    """Multiply-adds of the cosine scores of the visual rows (padded to the batch's longest)."""
    return rows * prototypes * dim


# Random scores: an integer hash (products of values below 2^31 stay inside int64; no float64, no
# generator, the same numbers on every device) of the seed, the sample's own content and the
# visual row's rank within the sample: a function of the sample alone, whatever its batch-mates,
# its padding or its offset in the batch.
_PRIME = 2_147_483_647  # 2^31 - 1
_SCORE_BITS = 24  # scores exact in float32
_HASHED_FEATURES = 64


def _mix(x: torch.Tensor, salt: int) -> torch.Tensor:
    """int64 values in [0, _PRIME) -> [0, _PRIME): rounds of multiply-add mod the prime and shift-xor."""
    for multiplier in (48271 + salt % 1000, 69621, 16807):
        x = (x * multiplier + salt + 12345) % _PRIME
        x = x ^ (x >> 13)
    return x


def sample_keys(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, visual_mask: torch.Tensor,
                seed: int) -> torch.Tensor:
    """[B] int64: a hash of each sample's real text rows (their first 64 features rounded to bf16, so one model in
    fp32 or bf16 draws alike), their order among themselves, and its visual count; pads and the
    sample's place in the batch do not enter."""
    text = attention_mask.bool() & ~visual_mask
    # the first features of a row tell token embeddings apart; all of them would cost 8 bytes per value
    features = inputs_embeds.detach()[..., :_HASHED_FEATURES]
    bits = features.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    dims = torch.arange(bits.shape[-1], device=bits.device)
    row = (bits * _mix(dims + 1, 7)).sum(-1) % _PRIME  # [B, S]: < 64 * 2^47, no overflow
    rank = text.long().cumsum(1)  # 1-based rank of each real text row within its sample
    rows = torch.where(text, _mix((row + rank) % _PRIME, 11), torch.zeros_like(row))
    count = visual_mask.sum(1).to(torch.int64)
    return _mix((rows.sum(1) % _PRIME + count * 7919 + seed % _PRIME) % _PRIME, seed % 997)


def random_scores(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, visual_mask: torch.Tensor,
                  seed: int) -> torch.Tensor:
    """[B, S] uniform scores in [0, 1) on the visual rows (0 elsewhere), seeded per sample: score of a
    visual row = hash(seed, the sample's key, its rank among the sample's visual rows). The same
    sample keeps the same rows alone, in any batch and on either padding side."""
    key = sample_keys(inputs_embeds, attention_mask, visual_mask, seed)
    rank = visual_mask.long().cumsum(1)
    draw = _mix((key[:, None] + rank * 104729) % _PRIME, 13) % (1 << _SCORE_BITS)
    scores = draw.to(torch.float32) / float(1 << _SCORE_BITS)
    return torch.where(visual_mask, scores, torch.zeros_like(scores))


def select_rows(visual_mask: torch.Tensor, keep_score: torch.Tensor, counts: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> KeptRows:
    """Keep the real text rows and, per sample b, the counts[b] visual rows of highest keep_score;
    the batch's pad rows (attention_mask 0) are dropped, so the result is as wide as the batch's
    longest kept sample.

    Ties go to the earlier position, so the selection is deterministic. Memory linear in S: the
    counts[b]-th best score t_b (TopK values, which ties cannot change) splits the visual rows
    into kept (> t_b), dropped (< t_b) and the rows equal to t_b, of which the earliest fill the
    rest of the count (a cumulative sum). Written for the whole batch in ops ONNX has
    (comparisons, sums, TopK; no stable sort, no boolean indexing), so the eager stage and the
    exported prune graph are one code.
    """
    batch, seq = visual_mask.shape
    visual = visual_mask.bool()
    real = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
    score = keep_score.float()
    lowest = torch.full_like(score, float("-inf"))
    masked = torch.where(visual, score, lowest)
    depth = data_size(counts.max().clamp(min=1), max(seq, 1), low=1)
    best = masked.topk(depth, dim=1).values  # [B, depth], descending
    threshold = best.gather(1, (counts - 1).clamp(min=0)[:, None].to(torch.int64))  # [B, 1]
    above = visual & (score > threshold)
    tied = visual & (score == threshold)
    need = counts[:, None] - above.sum(dim=1, keepdim=True)
    tied_kept = tied & (tied.long().cumsum(dim=1) <= need)
    kept = real & (~visual | above | tied_kept)
    width = data_size(kept.sum(dim=1).max().clamp(min=1), max(seq, 1), low=1)
    # kept rows get keys above every dropped row's, all distinct: the top `width` keys, reversed, are
    # each sample's kept rows in order, after (to the left of) the dropped rows that pad it
    position = torch.arange(seq, device=visual_mask.device)
    key = torch.where(kept, position + seq, position - seq)
    ordered = key.topk(width, dim=1).values.flip(1)
    valid = ordered >= seq
    return KeptRows(index=torch.where(valid, ordered - seq, torch.zeros_like(ordered)), valid=valid)


def left_aligned(attention_mask: torch.Tensor) -> KeptRows:
    """Every real row of each sample, in order, pads moved to the left (a right-padded batch read
    as a left-padded one: each sample's last row is its last real token)."""
    seq = attention_mask.shape[1]
    position = torch.arange(seq, device=attention_mask.device)
    key = torch.where(attention_mask.bool(), position + seq, position - seq)
    ordered = key.sort(dim=1).values
    valid = ordered >= seq
    return KeptRows(index=torch.where(valid, ordered - seq, ordered + seq), valid=valid)


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
    return out.masked_fill_(~valid, fill)  # in the gathered copy: no second tensor of its size


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
    # normalized after the gathers (row by row, the same values): no normalized copy of every row
    dropped = _normalized(gather_padded(embeds, dropped_pos))
    similarity = dropped @ _normalized(gather_padded(embeds, owner_pos)).transpose(1, 2)
    similarity.masked_fill_(~owner_valid[:, None, :], float("-inf"))
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


# Downsampling baseline: average-pool each image's token grid by `pool` x `pool` (partial pools at
# the right and bottom edges average the tokens they hold). The pooled token takes the place, the
# mask and the position ids of its pool's first (top-left) token, as the other methods keep their
# rows' original positions.

def pool_factor(keep: float) -> int:
    """The pool side whose pooled grid keeps about `keep` of the tokens: 0.25 -> 2, 0.111 or 0.125 -> 3."""
    return max(1, round(keep ** -0.5))


def pooled_count(grid: tuple[int, int], pool: int) -> int:
    rows, cols = grid
    return -(-rows // pool) * -(-cols // pool)


def _grid_coordinates(visual_mask: torch.Tensor, grid: tuple[int, int]):
    """(rank, row, col) of every visual row [B, S] within its image's grid (images are consecutive
    runs of rows*cols visual rows, in order); 0 on the other rows."""
    rows, cols = grid
    rank = (visual_mask.long().cumsum(1) - 1).clamp(min=0)
    within = rank % (rows * cols)
    return rank, within // cols, within % cols


def pool_anchors(visual_mask: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """[B, S] bool: the visual rows that are the first (top-left) token of their pool."""
    _, row, col = _grid_coordinates(visual_mask, grid)
    return visual_mask.bool() & (row % pool == 0) & (col % pool == 0)


def average_pooled(embeds: torch.Tensor, visual_mask: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """`embeds` with each pool's first row replaced by the mean of the pool's rows (summed in row-major
    order within the pool, in float32); the other rows unchanged (the selection drops them)."""
    rows, cols = grid
    visual = visual_mask.bool()
    rank, row, col = _grid_coordinates(visual, grid)
    anchor = visual & (row % pool == 0) & (col % pool == 0)
    vis_pos, _, counts = _padded_positions(visual)
    total = torch.zeros(embeds.shape, dtype=torch.float32, device=embeds.device)
    members = torch.zeros(visual.shape, dtype=torch.float32, device=embeds.device)
    for dr in range(pool):
        for dc in range(pool):
            member = rank + dr * cols + dc
            inside = anchor & (row + dr < rows) & (col + dc < cols) & (member < counts[:, None])
            position = vis_pos.gather(1, torch.where(inside, member, torch.zeros_like(member)).clamp(
                max=vis_pos.shape[1] - 1))
            value = gather_padded(embeds, position).float()
            total = total + torch.where(inside[..., None], value, torch.zeros_like(value))
            members = members + inside.float()
    mean = (total / members.clamp(min=1)[..., None]).to(embeds.dtype)
    return torch.where(anchor[..., None], mean, embeds)


def pool_flops(visual_rows: int, dim: int) -> int:
    """Additions of the average pooling: every visual row added once into its pool."""
    return visual_rows * dim


# Diversity baseline (DivPrune, arXiv 2503.02175): per sample, greedy max-min selection over the
# visual rows of the projector output with cosine distance 1 - cos. The first pick is the row whose
# nearest other row is farthest (DivPrune: the second smallest distance in its column, the smallest
# being its own); each next pick is the row farthest from the rows picked so far (the largest of
# the minimum distances), ties to the earlier row. The loop is a torch while_loop (an ONNX Loop),
# as long as the batch's largest keep count, so one exported graph serves every count.

def diverse_picks(embeds: torch.Tensor, visual_mask: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, S] float: 1 on the counts[b] visual rows sample b's greedy max-min selection picks, else 0."""
    from torch._higher_order_ops.while_loop import while_loop

    visual = visual_mask.bool()
    vis_pos, vis_valid, _ = _padded_positions(visual)
    rows = _normalized(gather_padded(embeds, vis_pos))
    distance = 1.0 - rows @ rows.transpose(1, 2)  # [B, V, V]
    inf = distance.new_full((distance.shape[0], 1, distance.shape[2]), float("inf"))
    # a row that is not real is never a neighbour (+inf) and never picked (-inf)
    distance = torch.where(vis_valid[:, :, None] & vis_valid[:, None, :], distance, inf)
    padded = torch.cat([distance, inf], dim=1)  # a second candidate neighbour for a sample of one row
    nearest_other = padded.topk(2, dim=1, largest=False).values[:, 1, :]  # [B, V]
    lowest = torch.full_like(nearest_other, float("-inf"))
    columns = torch.arange(distance.shape[2], device=embeds.device)[None, :].expand_as(nearest_other)
    first = torch.where(vis_valid, nearest_other, lowest).argmax(dim=1)
    picked = (columns == first[:, None]) & (counts[:, None] > 0)

    def distances_from(pick: torch.Tensor) -> torch.Tensor:  # [B]: row `pick` of each sample's distances
        # the index is shaped after a tensor, not after sizes: the loop body takes no symbolic ints
        return distance.gather(1, (torch.zeros_like(columns) + pick[:, None])[:, None, :]).squeeze(1)

    nearest = distances_from(first)

    def cond(step, nearest, picked):
        return step < counts.max()

    def body(step, nearest, picked):
        score = torch.where(picked | ~vis_valid, lowest, nearest)
        pick = score.argmax(dim=1)
        active = step < counts
        row = distances_from(pick)
        return (step + 1, torch.where(active[:, None], torch.minimum(nearest, row), nearest),
                picked | ((columns == pick[:, None]) & active[:, None]))

    step = torch.ones((), dtype=torch.int64, device=embeds.device)
    _, _, picked = while_loop(cond, body, (step, nearest, picked))
    scores = torch.where(picked, torch.ones_like(nearest), torch.zeros_like(nearest))
    return torch.zeros(visual.shape, device=embeds.device).scatter_add(
        1, vis_pos, torch.where(vis_valid, scores, torch.zeros_like(scores)))


def diverse_flops(batch: int, rows: int, dim: int) -> int:
    """Multiply-adds of the cosine distances between every two visual rows of a sample (padded)."""
    return batch * rows * rows * dim
