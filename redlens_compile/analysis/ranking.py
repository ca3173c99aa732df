"""Layer ranking: how much each decoder layer tolerates reduction, on calibration inputs.

Metrics (lower score = less critical = reduced first):
- "jsd" (default) / "kl": sensitivity. Reduce that layer alone (a trial graph), run the
  calibration inputs, and measure the divergence of the next-token distribution (last
  position of each row) from the unreduced graph's.
- "activation": mean |update| the layer adds to the visual rows (its output minus its input).
- "variance": variance of the layer's output over the visual rows.
- "gradient": first-order estimate of removing the layer's visual update,
  mean |d log p(top token) / d h * update| over visual rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..capture.decoder_inputs import DecoderInputs
from .divergence import js_divergence, kl_divergence, log_probs

logger = logging.getLogger(__name__)

SENSITIVITY_METRICS = ("jsd", "kl")


@dataclass
class LayerRanking:
    metric: str
    scores: dict[int, float]  # at the config's settings
    floor_scores: dict[int, float] | None = None  # at the planner's floors (sensitivity metrics)
    # plan_axes="separate": each reduction scored alone, {axis: (scores at its base, at its floor or None)};
    # `scores` then holds the sum of the axes' base scores (the order)
    axes: dict[str, tuple[dict[int, float], dict[int, float] | None]] | None = None

    @property
    def order(self) -> list[int]:
        """Least critical first (ties broken by layer index)."""
        return sorted(self.scores, key=lambda i: (self.scores[i], i))

    def to_dict(self) -> dict:
        out = {"metric": self.metric, "scores": {str(i): s for i, s in sorted(self.scores.items())},
               "order": self.order}
        if self.floor_scores is not None:
            out["floor_scores"] = {str(i): s for i, s in sorted(self.floor_scores.items())}
        if self.axes is not None:
            out["axes"] = {axis: {"scores": {str(i): s for i, s in sorted(base.items())},
                                  **({"floor_scores": {str(i): s for i, s in sorted(floor.items())}} if floor else {})}
                           for axis, (base, floor) in self.axes.items()}
        return out


def next_token_log_probs(graph_module: fx.GraphModule, inputs: DecoderInputs) -> torch.Tensor:
    with torch.no_grad():
        logits = graph_module(*inputs.as_args())[0]
    # float64 on the host: small ([B, V]), exact enough for tiny divergences, and some accelerators lack it
    return log_probs(logits[:, -1, :].detach().cpu().to(torch.float64))


def divergence(ref: torch.Tensor, other: torch.Tensor, metric: str) -> float:
    """Mean over rows of JSD or KL(ref || other), from log-probabilities (analysis/divergence.py)."""
    rows = kl_divergence(ref, other) if metric == "kl" else js_divergence(ref, other)
    return float(rows.mean())


def trial_divergences(trial: fx.GraphModule, reference: Sequence[torch.Tensor], calibration: Sequence[DecoderInputs],
                      metric: str, on_input: Callable[[], None] | None = None) -> list[float]:
    """Per calibration input, the divergence of `trial`'s next-token distribution from the reference's."""
    out = []
    for ref, inputs in zip(reference, calibration):
        out.append(divergence(ref, next_token_log_probs(trial, inputs), metric))
        if on_input is not None:
            on_input()
    return out


def mean_score(divergences: Sequence[float]) -> float:
    """A layer's score: summed in calibration order, so every engine adds the same numbers the same way."""
    total = 0.0
    for value in divergences:
        total += value
    return total / len(divergences)


def sensitivity_scores(
    graph_module: fx.GraphModule,
    calibration: Sequence[DecoderInputs],
    layers: Sequence[int],
    reduce_one: Callable[[int], fx.GraphModule],
    metric: str,
) -> dict[int, float]:
    """Divergence of the next-token distribution when only `layer` is reduced, per layer."""
    reference = [next_token_log_probs(graph_module, x) for x in calibration]
    scores = {}
    with tqdm(total=len(layers) * len(calibration), desc=f"ranking layers ({metric})", leave=False,
              disable=None) as bar:
        for layer in layers:
            scores[layer] = mean_score(trial_divergences(reduce_one(layer), reference, calibration, metric,
                                                         lambda: bar.update(1)))
    return scores


def _visual_rows(t: torch.Tensor, inputs: DecoderInputs) -> torch.Tensor:
    return t[inputs.visual_mask.to(torch.bool)]


def activation_scores(
    decoder: nn.Module, decoder_layers: Sequence[nn.Module], calibration: Sequence[DecoderInputs], metric: str
) -> dict[int, float]:
    """activation / variance / gradient scores from forward hooks on the eager decoder layers."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def record(_m: nn.Module, args: tuple, kwargs: dict, out) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = out[0] if isinstance(out, tuple) else out
            seen[index] = (hidden_in, hidden_out)
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(decoder_layers)]
    scores = {i: 0.0 for i in range(len(decoder_layers))}
    try:
        for inputs in tqdm(calibration, desc=f"ranking layers ({metric})", leave=False, disable=None):
            seen.clear()
            with torch.set_grad_enabled(metric == "gradient"):
                logits = decoder(*inputs.as_args())[0]
                if metric == "gradient":
                    log_probs = torch.log_softmax(logits[:, -1, :], dim=-1)
                    objective = log_probs.max(dim=-1).values.sum()
                    outs = [seen[i][1] for i in range(len(decoder_layers))]
                    grads = torch.autograd.grad(objective, outs, allow_unused=True)
            for i in range(len(decoder_layers)):
                h_in, h_out = (t.detach() for t in seen[i])
                update = _visual_rows(h_out - h_in, inputs)
                if metric == "activation":
                    value = update.abs().mean()
                elif metric == "variance":
                    value = _visual_rows(h_out, inputs).var()
                else:
                    grad = grads[i]
                    value = (_visual_rows(grad, inputs) * update).abs().mean() if grad is not None else update.sum() * 0
                scores[i] += float(value) / len(calibration)
    finally:
        for handle in handles:
            handle.remove()
    return scores
