"""Budget planner: which decoder layers get reductions.

With no reduction pass in this build the planner only decides whether the config can be met
without one (budget 1.0, or reductions whose settings change no number); anything else is a
clear error rather than a silently unreduced model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import UNBOUNDED_WINDOW, RedLensConfig
from ..errors import ConfigError, ReductionUnavailableError


@dataclass(frozen=True)
class ReductionPlan:
    layers: tuple[int, ...]  # layers the reduction passes rewrite
    reductions_change_numbers: bool  # False when every reduction is set to its identity value


def _requested_layers(config: RedLensConfig, num_layers: int) -> tuple[int, ...]:
    if config.layers == "all":
        return tuple(range(num_layers))
    if config.layers == "auto":
        return () if config.flops_budget >= 1.0 else tuple(range(num_layers))
    out_of_range = [i for i in config.layers if i >= num_layers]
    if out_of_range:
        raise ConfigError(
            f"layers={config.layers}: indices {out_of_range} are out of range; the decoder has {num_layers} "
            f"layers (valid: 0..{num_layers - 1})"
        )
    return tuple(sorted(config.layers))


def plan_reductions(config: RedLensConfig, num_layers: int) -> ReductionPlan:
    if config.prune is not None:
        raise ReductionUnavailableError(
            f"prune={config.prune!r}: the token pruning node is not part of this build; use prune=None"
        )
    layers = _requested_layers(config, num_layers)
    changes = config.ffn_keep < 1.0 or config.hollow_window < UNBOUNDED_WINDOW
    if layers and changes:
        raise ReductionUnavailableError(
            f"this config reduces layers {list(layers)} (flops_budget={config.flops_budget}, "
            f"ffn_keep={config.ffn_keep}, hollow_window={config.hollow_window}), but the dynamic-FFN and "
            "hollow-attention passes are not part of this build; use RedLensConfig.identity() or flops_budget=1.0"
        )
    return ReductionPlan(layers=layers, reductions_change_numbers=bool(layers) and changes)
