"""Runtime ops of the probe-activated dynamic FFN (inserted by passes/dynamic_ffn.py).

Per sample: M probe rows, evenly spaced over the sample's visual rows, run the full FFN up to
its down projection; each channel's score is the mean |activation| over the probes; the top
K channels are kept, and that sample's visual rows run through weights sliced to those K
channels (gate, up and down alike), as one batched matmul per weight.
"""

from __future__ import annotations

import torch

from .rows import counted, gather_padded


def probe_rows(visual_rows: torch.Tensor, vis_count: torch.Tensor, probes: int | float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe rows of each sample at a fixed stride -> ([B, M, D], valid [B, M]).

    `probes` is a count M or a fraction of each sample's visual rows. A sample with fewer
    visual rows than M uses each of its rows once (M is clamped to the visual count).
    """
    count = vis_count.to(torch.float64)
    wanted = torch.ceil(probes * count) if isinstance(probes, float) else torch.full_like(count, probes)
    per_sample = torch.clamp(torch.minimum(wanted, count), min=1).to(torch.int64)
    m = max(1, int(per_sample.max()))
    j = torch.arange(m, device=visual_rows.device)[None, :]
    index = (j * vis_count[:, None]) // per_sample[:, None]
    valid = (j < per_sample[:, None]) & (vis_count[:, None] > 0)
    index = torch.where(valid, index, torch.zeros_like(index))
    return gather_padded(visual_rows, index), valid


def top_channels(probe_activation: torch.Tensor, probe_valid: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [B, K] of the K channels with the largest mean |activation| over valid probes."""
    weights = probe_valid.to(probe_activation.dtype)[..., None]
    scores = (probe_activation.abs() * weights).sum(dim=1)
    channels = torch.topk(scores, keep, dim=-1, sorted=False).indices
    # Ascending order walks the weight rows in memory order when they are gathered.
    return torch.sort(channels, dim=-1).values


def slice_out_features(weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """An up-side weight [F, D] kept at channels [B, K], as the right operand of x @ w: [B, D, K].

    A bias [F] gives [B, K]. The rows are gathered (contiguous reads); the transpose is a view.
    """
    kept = weight[channels]
    return kept if weight.dim() == 1 else kept.transpose(1, 2)


def slice_in_features(weight: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """A down weight [D, F] kept at channels [B, K], as the right operand of h @ w: [B, K, D]."""
    return weight.t()[channels]


def _batched_matmul_flops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    # Every row of every sample, padded rows included: that is what the matmul computes.
    return float(x.shape[0] * x.shape[1] * weight.shape[1] * weight.shape[2]), 0.0


@counted(_batched_matmul_flops)
def batched_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N, D_in] @ a per-sample weight [B, D_in, D_out] (+ bias [B, D_out] or [D_out])."""
    out = torch.matmul(x, weight)
    if bias is None:
        return out
    return out + (bias[:, None, :] if bias.dim() == 2 else bias)


__all__ = ["batched_matmul", "gather_padded", "probe_rows", "slice_in_features", "slice_out_features", "top_channels"]
