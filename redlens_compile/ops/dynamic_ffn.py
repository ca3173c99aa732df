"""Runtime ops of the probe-activated dynamic FFN (inserted by passes/dynamic_ffn.py).

Per sample: M probe rows, chosen by a probe rule from the sample's own visual rows (PROBE_RULES),
run the full FFN up to its down projection; each channel's score is the mean |activation| over the probes; the top
K channels are kept, and that sample's visual rows run through weights sliced to those K
channels (gate, up and down alike), as one batched matmul per weight.
"""

from __future__ import annotations

import torch

from .rows import counted, data_size, fraction_of, gather_padded
from .thin_linear import row_padding, thin_linear

PROBE_RULES = tuple(f"{base}{route}" for route in ("", "+route") for base in ("stride", "norm", "outlier"))
DEFAULT_PROBE_RULE = "outlier+route"

# How the probe rows of a sample are chosen (RedLensConfig.probe_rule, one of PROBE_RULES):
# - "stride": evenly spaced over the sample's visual rows (the first rule; blind to content);
# - "norm": the rows of largest L2 norm;
# - "outlier": the rows farthest (L2) from the sample's mean visual row: a few object patches on a
#   uniform or textured background are exactly the rows unlike the rest.
# A "+route" suffix also gives the probe rows the full FFN's output (they ran the full width up to
# the down projection anyway): the rows the rule singled out are served exactly, not by the K
# channels the whole image shares.
SCORED_RULES = ("norm", "outlier")


def split_rule(rule: str) -> tuple[str, bool]:
    """'outlier+route' -> ('outlier', True)."""
    if rule not in PROBE_RULES:
        raise ValueError(f"probe rule {rule!r}: one of {', '.join(PROBE_RULES)}")
    base, _, route = rule.partition("+")
    return base, bool(route)


def _probe_count(visual_rows: torch.Tensor, vis_count: torch.Tensor, probes: int | float
                 ) -> tuple[int, torch.Tensor]:
    """(M, the padded probe count, and each sample's own count [B])."""
    count = vis_count.to(torch.int64)
    # integer arithmetic (exact, on any device: no float64)
    wanted = fraction_of(count, probes, "ceil") if isinstance(probes, float) else torch.full_like(count, probes)
    per_sample = torch.clamp(torch.minimum(wanted, count), min=1)
    return data_size(per_sample.max(), visual_rows.shape[1]), per_sample  # >= 1: per_sample is clamped to 1


def row_scores(visual_rows: torch.Tensor, vis_count: torch.Tensor, rule: str) -> torch.Tensor:
    """Each visual row's score under a scored rule [B, V], in float32; padded rows -inf."""
    x = visual_rows.float()
    real = torch.arange(x.shape[1], device=x.device)[None, :] < vis_count[:, None]
    if rule == "norm":
        score = (x * x).sum(-1)
    elif rule == "outlier":
        # the sum over rows as a [1, V] x [V, D] product per sample: onnxruntime's ReduceSum over a
        # middle axis took 4.5 ms of a 630 ms 2B-geometry prefill (1 thread), the MatMul a fraction
        mean = torch.matmul(real.to(x.dtype)[:, None, :], x)[:, 0] / vis_count.clamp(min=1)[:, None].to(x.dtype)
        centred = x - mean[:, None, :]
        score = (centred * centred).sum(-1)
    else:
        raise ValueError(f"probe rule {rule!r} has no row score; scored rules: {', '.join(SCORED_RULES)}")
    return torch.where(real, score, torch.full_like(score, float("-inf")))


def probe_index(visual_rows: torch.Tensor, vis_count: torch.Tensor, probes: int | float, rule: str = "stride"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of each sample's visual rows are its probes -> (index [B, M], valid [B, M]).

    `probes` is a count M or a fraction of each sample's visual rows. A sample with fewer
    visual rows than M uses each of its rows once (M is clamped to the visual count). Valid
    indices of a sample are distinct; each sample's probes depend on its own rows only.
    """
    base, _ = split_rule(rule)
    m, per_sample = _probe_count(visual_rows, vis_count, probes)
    j = torch.arange(m, device=visual_rows.device)[None, :]
    valid = (j < per_sample[:, None]) & (vis_count[:, None] > 0)
    if base == "stride":
        index = (j * vis_count[:, None]) // per_sample[:, None]
    else:
        # the M best-scored rows, best first: a sample's first per_sample entries are its probes
        index = torch.topk(row_scores(visual_rows, vis_count, base), m, dim=1, largest=True, sorted=True).indices
    return torch.where(valid, index, torch.zeros_like(index)), valid


def _probe_rows_flops(visual_rows, vis_count, probes, rule="stride"):
    # Scoring reads every padded row once (one multiply-add per element; the outlier rule's mean
    # is a second pass): the selection's cost, counted against the FFN it saves.
    base, _ = split_rule(rule)
    elements = visual_rows.shape[0] * visual_rows.shape[1] * visual_rows.shape[2]
    return float({"stride": 0, "norm": 1, "outlier": 2}[base] * elements), 0.0


@counted(_probe_rows_flops)
def probe_rows(visual_rows: torch.Tensor, vis_count: torch.Tensor, probes: int | float, rule: str = "stride"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probe rows of each sample under `rule` -> ([B, M, D], valid [B, M], index [B, M])."""
    index, valid = probe_index(visual_rows, vis_count, probes, rule)
    return gather_padded(visual_rows, index), valid, index


def stack_rows(text_rows: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Text rows [Nt, D] and probe rows [B, M, D] as one [Nt + B * M (+ pad), D] operand.

    Both run the FFN at full width up to its down projection, so one GEMM serves both (a
    bigger, more efficient one than two thin ones). Zero rows pad it to what the thin linears
    read without a copy of their own (thin_linear.row_padding; profiled at SmolVLM geometry, 2
    threads: the down projection's pad of its column-major input took 3.1 ms against 2.3 per call).
    """
    rows = [text_rows, probes.reshape(-1, probes.shape[-1])]
    pad = row_padding(text_rows.shape[0] + rows[1].shape[0], text_rows)
    if pad:
        rows.append(text_rows.new_zeros(pad, text_rows.shape[-1]))
    return torch.cat(rows)


def text_part(stacked: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
    return stacked[: text_rows.shape[0]]


def probe_part(stacked: torch.Tensor, text_rows: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    start = text_rows.shape[0]
    return stacked[start:start + probes.shape[0] * probes.shape[1]].view(*probes.shape[:2], stacked.shape[-1])


def _split_linear_flops(x, weight, bias, text_rows):
    per_row = weight.shape[0] * weight.shape[1]
    return float((x.shape[0] - text_rows.shape[0]) * per_row), float(text_rows.shape[0] * per_row)


@counted(_split_linear_flops)
def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, text_rows: torch.Tensor
                 ) -> torch.Tensor:
    """F.linear over stacked rows; the audit counts the first len(text_rows) rows as text, the rest (probes) as visual.

    A thin GEMM made by the reduction itself, so it takes the thin-linear orientation (ops/thin_linear.py).
    """
    return thin_linear(x, weight, bias)


def _top_channels_flops(probe_activation, probe_valid, keep):
    # the channel scores' sum over the probes: one multiply-add per activation
    return float(probe_activation.numel()), 0.0


@counted(_top_channels_flops)
def top_channels(probe_activation: torch.Tensor, probe_valid: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [B, K] of the K channels with the largest mean |activation| over valid probes."""
    # the sum over valid probes as a [1, M] x [M, F] product per sample (one op; a weighted
    # ReduceSum over the middle axis was two passes over the activations in onnxruntime's profile)
    weights = probe_valid.to(probe_activation.dtype)[:, None, :]
    scores = torch.matmul(weights, probe_activation.abs())[:, 0]
    channels = torch.topk(scores, keep, dim=-1, sorted=False).indices
    # Ascending order walks the weight rows in memory order when they are gathered.
    return torch.sort(channels, dim=-1).values


def slice_out_features(weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """An up-side weight [F, D] kept at channels [B, K], as the right operand of x @ w: [B, D, K].

    A bias [F] gives [B, K]. index_select gathers whole rows (several times faster than advanced
    indexing here); the transpose is a view, which the matmul reads as it is.
    """
    kept = weight.index_select(0, channels.reshape(-1)).view(*channels.shape, *weight.shape[1:])
    return kept if weight.dim() == 1 else kept.transpose(1, 2)


def fused_channels(channels: torch.Tensor, width: int, blocks: int) -> torch.Tensor:
    """Kept channels [B, K] of an F-wide FFN as rows of a fused weight of `blocks` F-wide blocks
    (gate and up in one [2F, D] weight): the same K channels in every block -> [B, blocks * K]."""
    return torch.cat([channels + b * width for b in range(blocks)], dim=-1)


def slice_in_features(weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """A down weight [D, F] kept at channels [B, K], as the right operand of h @ w: [B, K, D].

    Columns by a gather with the index expanded over D: index_select over dim 1 took 1.7-1.9x
    longer on CPU (0.33 against 0.18 ms at D 576, K 960; 6.1 against 3.6 ms at D 1536, K 4480)."""
    flat = channels.reshape(1, -1)
    kept = torch.gather(weight, 1, flat.expand(weight.shape[0], flat.shape[1]))  # [D, B * K]
    return kept.view(weight.shape[0], *channels.shape).permute(1, 2, 0)


def _batched_matmul_flops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    # Every row of every sample, padded rows included: that is what the matmul computes.
    return float(x.shape[0] * x.shape[1] * weight.shape[1] * weight.shape[2]), 0.0


@counted(_batched_matmul_flops)
def batched_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N, D_in] @ a per-sample weight [B, D_in, D_out] (+ bias [B, D_out] or [D_out])."""
    # bmm is one dispatched op where matmul's broadcasting takes six (expand, views, bmm)
    out = torch.bmm(x, weight) if x.dim() == 3 and weight.dim() == 3 else torch.matmul(x, weight)
    if bias is None:
        return out
    return out + (bias[:, None, :] if bias.dim() == 2 else bias)


__all__ = ["DEFAULT_PROBE_RULE", "PROBE_RULES", "batched_matmul", "fused_channels", "gather_padded", "probe_index", "probe_rows", "slice_in_features", "slice_out_features", "top_channels"]
