"""Budget planner: which decoder layers get reductions, and how hard.

`flops_budget` bounds the decoder layers' prefill FLOPs after/before (lm_head, vision tower
and projector are reported apart). With `layers="auto"` the planner adds reductions at the
config's settings to layers from least to most critical (the ranking) until the budget is
met. When every layer is reduced and it is not, it tightens the least critical layers one
step at a time (ffn_keep and window times TIGHTEN_FACTOR, down to the floors below); when
even that cannot meet the budget it raises BudgetUnreachableError naming the lowest ratio.

Per-layer costs come from fvcore counts of real rewritten graphs (`LayerCosts`), so the ratio
the planner predicts is the ratio the audit reports.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..config import UNBOUNDED_WINDOW, RedLensConfig
from ..errors import BudgetUnreachableError, ConfigError

logger = logging.getLogger(__name__)

FFN_KEEP_FLOOR = 0.0625
WINDOW_FLOOR = 8
TIGHTEN_FACTOR = 0.85


@dataclass(frozen=True)
class LayerSettings:
    """The reductions of one layer: FFN channels kept for visual rows, and the hollow window."""

    ffn_keep: float
    window: int

    @property
    def reduces_ffn(self) -> bool:
        return self.ffn_keep < 1.0

    @property
    def hollow(self) -> bool:
        return self.window < UNBOUNDED_WINDOW

    @property
    def changes_numbers(self) -> bool:
        return self.reduces_ffn or self.hollow

    def tightened(self) -> "LayerSettings":
        """One step tighter, never below the floors; a reduction that is off stays off."""
        keep = self.ffn_keep if not self.reduces_ffn else max(FFN_KEEP_FLOOR, self.ffn_keep * TIGHTEN_FACTOR)
        window = self.window if not self.hollow else max(WINDOW_FLOOR, int(self.window * TIGHTEN_FACTOR))
        return LayerSettings(ffn_keep=keep, window=window)

    def to_dict(self) -> dict:
        return {"ffn_keep": self.ffn_keep, "window": self.window if self.hollow else None}


@dataclass
class ReductionPlan:
    settings: dict[int, LayerSettings]  # reduced layers only
    order: list[int] = field(default_factory=list)  # least critical first (auto) or as given
    steps: list[str] = field(default_factory=list)  # what the planner did, for the report
    predicted_ratio: float | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.settings))

    @property
    def reductions_change_numbers(self) -> bool:
        return any(s.changes_numbers for s in self.settings.values())

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "settings": {str(i): s.to_dict() for i, s in sorted(self.settings.items())},
            "order": self.order,
            "steps": self.steps,
            "predicted_ratio": self.predicted_ratio,
        }


# settings -> FLOPs of each decoder layer when that layer is reduced with them
LayerCosts = Callable[[LayerSettings], Mapping[int, float]]


def validate_layers(config: RedLensConfig, num_layers: int) -> None:
    if isinstance(config.layers, list):
        out_of_range = [i for i in config.layers if i >= num_layers]
        if out_of_range:
            raise ConfigError(
                f"layers={config.layers}: indices {out_of_range} are out of range; the decoder has {num_layers} "
                f"layers (valid: 0..{num_layers - 1})"
            )


def base_settings(config: RedLensConfig) -> LayerSettings:
    return LayerSettings(ffn_keep=float(config.ffn_keep), window=int(config.hollow_window))


def needs_ranking(config: RedLensConfig) -> bool:
    return config.layers == "auto" and config.flops_budget < 1.0 and base_settings(config).changes_numbers


def plan_fixed(config: RedLensConfig, num_layers: int) -> ReductionPlan:
    """`layers` given ("all" or indices): those layers at the config's settings, no budget search."""
    validate_layers(config, num_layers)
    settings = base_settings(config)
    if not settings.changes_numbers or config.layers == "auto":
        return ReductionPlan(settings={})
    layers = range(num_layers) if config.layers == "all" else config.layers
    return ReductionPlan(settings={i: settings for i in layers}, order=sorted(layers),
                         steps=[f"layers given by the config: {sorted(layers)}"])


def plan_to_budget(
    config: RedLensConfig, before: Mapping[int, float], order: Sequence[int], costs: LayerCosts
) -> ReductionPlan:
    """Least critical layers first until the decoder layers' FLOPs ratio <= flops_budget."""
    budget = config.flops_budget
    total = sum(before.values())
    levels: list[LayerSettings] = [base_settings(config)]
    level_costs: list[Mapping[int, float]] = [costs(levels[0])]
    chosen: dict[int, int] = {}  # layer -> level index

    def ratio() -> float:
        return sum(level_costs[chosen[i]][i] if i in chosen else before[i] for i in before) / total

    steps = []
    for layer in order:
        if ratio() <= budget:
            break
        chosen[layer] = 0
        steps.append(f"reduce layer {layer} at {levels[0].to_dict()}: ratio {ratio():.4f}")
    for layer in order:
        while ratio() > budget:
            level = chosen[layer]
            if level + 1 == len(levels):
                tighter = levels[-1].tightened()
                if tighter == levels[-1]:
                    break  # at the floors
                levels.append(tighter)
                level_costs.append(costs(tighter))
            chosen[layer] = level + 1
            steps.append(f"tighten layer {layer} to {levels[level + 1].to_dict()}: ratio {ratio():.4f}")
        if ratio() <= budget:
            break
    reached = ratio()
    if reached > budget:
        floor = levels[-1].to_dict()
        raise BudgetUnreachableError(
            f"flops_budget={budget} cannot be met: with every decoder layer reduced down to the floors "
            f"(ffn_keep {floor['ffn_keep']}, window {floor['window']}) the lowest reachable decoder FLOPs ratio is "
            f"{reached:.4f}. Raise flops_budget to at least {math.ceil(reached * 1000) / 1000}, enable both "
            "reductions (ffn_keep < 1 and a finite hollow_window), or prune visual tokens (prune=...)."
        )
    plan = ReductionPlan(settings={i: levels[lv] for i, lv in chosen.items()}, order=list(order), steps=steps,
                         predicted_ratio=reached)
    logger.info("plan: layers %s, predicted ratio %.4f", list(plan.layers), reached)
    return plan
