"""KL and Jensen-Shannon divergences of next-token distributions, from logits or log-probabilities.

One implementation for the layer ranking (analysis/ranking.py: the full vocabulary, float64 log
probabilities) and the codebook (analysis/codebook.py: the reference's top-k tokens). Everything
runs on log-probabilities (log_softmax, logaddexp for the mixture), in float32 at the least: no
probability is clamped or taken the log of, so a token of tiny probability adds its exact share.
"""

from __future__ import annotations

import math

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last axis, in float32 at the least (float64 stays float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def kl_divergence(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[...] KL(ref || other) per row, from log-probabilities over the last axis."""
    return (ref.exp() * (ref - other)).sum(-1)


def js_divergence(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[...] Jensen-Shannon divergence per row (natural log, in [0, log 2]), from log-probabilities;
    rounding below 0 is clamped to 0."""
    mix = torch.logaddexp(ref, other) - math.log(2.0)
    jsd = 0.5 * (ref.exp() * (ref - mix)).sum(-1) + 0.5 * (other.exp() * (other - mix)).sum(-1)
    return jsd.clamp_min(0)
