"""Budget planner: which decoder layers get reductions, and how hard.

`flops_budget` bounds the decoder layers' prefill FLOPs after/before (lm_head, vision tower
and projector are reported apart). With `layers="auto"` the planner reduces layers in order of
least estimated damage per FLOP saved (`plan_to_budget`): least critical layers first, and it
tightens them (ffn_keep and window times TIGHTEN_FACTOR, down to the floors below) before it
touches a layer the ranking found critical. When every layer at the floors cannot meet the
budget it raises BudgetUnreachableError naming the lowest ratio.

Per-layer costs come from fvcore counts of real rewritten graphs (`LayerCosts`), so the ratio
the planner predicts is the ratio the audit reports.

With `plan_keep` the pruning keep is one more axis (`plan_keep_and_layers`): each candidate keep
is scored once (the divergence of the pruned model's next token from the original's, as a
layer's score), the layers are planned on that keep's costs, and the combination of least total
estimated damage under the budget wins.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..config import PLAN_KEEPS, UNBOUNDED_WINDOW, RedLensConfig
from ..errors import BudgetUnreachableError, ConfigError
from ..ops.token_pruning import pool_factor

logger = logging.getLogger(__name__)

FFN_KEEP_FLOOR = 0.0625
WINDOW_FLOOR = 8
TIGHTEN_FACTOR = 0.75


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
    # the same steps as data, so the report can group them per layer:
    # {"action": reduce|tighten|relax, "layer", "to": settings dict or None (unreduced), "ratio"}
    moves: list[dict] = field(default_factory=list)
    predicted_damage: float = 0.0  # the layers' estimated damage (the planner's sum of scores)
    # plan_keep: the keep chosen, and each candidate's outcome (keep, damage, ratio, total or unreachable)
    prune_keep: float | None = None
    keep_candidates: list[dict] | None = None

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
            "moves": self.moves,
            "predicted_ratio": self.predicted_ratio,
            **({"prune_keep": self.prune_keep, "keep_candidates": self.keep_candidates,
                "predicted_damage": self.predicted_damage} if self.prune_keep is not None else {}),
        }


# settings -> FLOPs of each decoder layer when that layer is reduced with them
LayerCosts = Callable[[LayerSettings], Mapping[int, float]]


# a plan -> FLOPs of each decoder layer under it (a count of the rewritten graph on the example)
PlanCosts = Callable[[ReductionPlan], Mapping[int, float]]


def without_hollow(settings: LayerSettings) -> LayerSettings:
    return LayerSettings(ffn_keep=settings.ffn_keep, window=UNBOUNDED_WINDOW)


def paying_costs(costs: LayerCosts, unreduced: Mapping[int, float]) -> LayerCosts:
    """`costs` where a setting's hollow window counts only in the layers where it saves FLOPs.

    Hollow attention's blocks cost more than the layer's causal attention when the visual span is
    short against the window (a block computes its whole square); there `drop_unpaying` takes the
    window off, so the planner prices the layer without it.
    """
    memo: dict[LayerSettings, Mapping[int, float]] = {}

    def cached(settings: LayerSettings) -> Mapping[int, float]:
        if not settings.changes_numbers:
            return unreduced
        if settings not in memo:
            memo[settings] = costs(settings)
        return memo[settings]

    def cost(settings: LayerSettings) -> Mapping[int, float]:
        with_window = cached(settings)
        if not settings.hollow:
            return with_window
        plain = cached(without_hollow(settings))
        return {i: min(c, plain[i]) for i, c in with_window.items()}

    return cost


def drop_unpaying(plan: ReductionPlan, costs: PlanCosts, unreduced: Mapping[int, float],
                  reasons: Mapping[int, str] | None = None) -> tuple[ReductionPlan, list[str]]:
    """The plan without the reductions that save no FLOPs in their layer, and a note for each.

    A hollow window is taken off where the layer costs at least as much with it as without; a
    dynamic FFN where the layer without the window costs at least its unreduced count (the pass
    could not rewrite its FFN: `reasons` says why, or its probes cost what the slices save). A
    layer left with no reduction leaves the plan and keeps the family's exact ops, so a config
    never costs more than the original or changes the numbers for no saved work.
    """
    if not plan.settings:
        return plan, []
    reasons = {} if reasons is None else reasons  # filled by `costs` (the same mapping): read it after
    plain = {i: without_hollow(s) for i, s in plan.settings.items()}
    with_window = costs(plan)
    hollow = any(s.hollow for s in plan.settings.values())
    without = costs(ReductionPlan(settings={i: s for i, s in plain.items() if s.changes_numbers})) if hollow \
        else with_window
    settings, notes, dropped = {}, [], []
    for i, s in sorted(plan.settings.items()):
        keep, window = s.ffn_keep, s.window
        if s.hollow and with_window[i] >= without[i]:
            window = UNBOUNDED_WINDOW
            notes.append(f"layer {i}: hollow attention (window {s.window}) not applied: on the example the layer costs "
                         f"{with_window[i]:.6g} FLOPs with it against {without[i]:.6g} without (blocks of the window "
                         "cost more than the causal attention over a visual span this short)")
        if s.reduces_ffn and without[i] >= unreduced[i]:
            keep = 1.0
            why = reasons.get(i, "").removeprefix(f"layer {i}: ") or \
                f"its probes and slices cost {without[i]:.6g} FLOPs against {unreduced[i]:.6g}"
            notes.append(f"layer {i}: dynamic FFN (ffn_keep {s.ffn_keep}) not applied: {why}")
        if (keep, window) != (s.ffn_keep, s.window):
            dropped.append(i)
        kept = LayerSettings(ffn_keep=keep, window=window)
        if kept.changes_numbers:
            settings[i] = kept
    if not dropped:
        return plan, []
    # one step and one move per layer changed, so the report groups them with the planner's own
    steps = [*plan.steps, *(f"take off layer {i} the reductions that save no FLOPs: "
                             f"{settings[i].to_dict() if i in settings else 'unreduced'}" for i in dropped)]
    moves = [*plan.moves, *({"action": "take off", "layer": i, "to": settings[i].to_dict() if i in settings else None,
                             "ratio": plan.predicted_ratio} for i in dropped)]
    return dataclasses.replace(plan, settings=settings, steps=steps, moves=moves), notes


def validate_layers(config: RedLensConfig, num_layers: int) -> None:
    if isinstance(config.layers, (list, dict)):
        out_of_range = [i for i in config.layers if i >= num_layers]
        if out_of_range:
            given = list(config.layers) if isinstance(config.layers, dict) else config.layers
            raise ConfigError(
                f"layers={given}: indices {out_of_range} are out of range; the decoder has {num_layers} "
                f"layers (valid: 0..{num_layers - 1})"
            )


def base_settings(config: RedLensConfig) -> LayerSettings:
    return LayerSettings(ffn_keep=float(config.ffn_keep), window=int(config.hollow_window))


def needs_ranking(config: RedLensConfig) -> bool:
    return config.layers == "auto" and config.flops_budget < 1.0 and base_settings(config).changes_numbers


def layer_settings(value: Mapping) -> LayerSettings:
    """One layer of an explicit plan ({"ffn_keep", "hollow_window"}, window None: off) as LayerSettings."""
    window = value["hollow_window"]
    return LayerSettings(ffn_keep=float(value["ffn_keep"]), window=UNBOUNDED_WINDOW if window is None else int(window))


def plan_fixed(config: RedLensConfig, num_layers: int) -> ReductionPlan:
    """`layers` given ("all", indices, or per-layer settings): those layers, no ranking, no budget search.

    Per-layer settings (a saved plan) are applied as they are; layers whose settings change no
    number are left out, as the planner leaves them out.
    """
    validate_layers(config, num_layers)
    if isinstance(config.layers, dict):
        settings = {i: layer_settings(v) for i, v in config.layers.items()}
        settings = {i: s for i, s in settings.items() if s.changes_numbers}
        return ReductionPlan(settings=settings, order=sorted(settings),
                             steps=[f"per-layer settings given by the config: layers {sorted(settings)}"])
    settings = base_settings(config)
    if not settings.changes_numbers or config.layers == "auto":
        return ReductionPlan(settings={})
    layers = range(num_layers) if config.layers == "all" else config.layers
    return ReductionPlan(settings={i: settings for i in layers}, order=sorted(layers),
                         steps=[f"layers given by the config: {sorted(layers)}"])


LOOSER_RUNGS = 3


def settings_ladder(config: RedLensConfig) -> tuple[list[LayerSettings], int]:
    """Rungs from loose to tight, and the index of the config's own settings among them.

    Below the config's settings: LOOSER_RUNGS steps towards no reduction (ffn_keep towards 1,
    the window up to twice as wide), so a critical layer can be reduced a little instead of not
    at all;
    above them: each step tighter down to the floors.
    """
    base = base_settings(config)
    looser = []
    for i in range(LOOSER_RUNGS, 0, -1):
        share = i / (LOOSER_RUNGS + 1)
        keep = base.ffn_keep + (1.0 - base.ffn_keep) * share if base.reduces_ffn else base.ffn_keep
        window = min(UNBOUNDED_WINDOW, round(base.window * (1 + share))) if base.hollow else base.window
        looser.append(LayerSettings(ffn_keep=keep, window=window))
    rungs = looser + [base]
    while (tighter := rungs[-1].tightened()) != rungs[-1]:
        rungs.append(tighter)
    return rungs, len(looser)


AxisScores = Mapping[str, tuple[Mapping[int, float], Mapping[int, float] | None]]


def axis_ladders(config: RedLensConfig) -> dict[str, tuple[list[LayerSettings], int]]:
    """The ladder of each axis the planner moves, by name, with the config's own rung's index.

    plan_axes="together": one axis "both", settings_ladder itself. "separate": "ffn" (the ladder's
    ffn_keep values, no hollow window) and "hollow" (its window values, the full FFN); an axis the
    config leaves off (ffn_keep 1, or an unbounded window) has no rungs and is not listed.
    """
    ladder, base_index = settings_ladder(config)
    if config.plan_axes == "together":
        return {"both": (ladder, base_index)}
    base = base_settings(config)
    projections = {"ffn": lambda s: LayerSettings(ffn_keep=s.ffn_keep, window=UNBOUNDED_WINDOW),
                   "hollow": lambda s: LayerSettings(ffn_keep=1.0, window=s.window)}
    ladders = {}
    for axis, project in projections.items():
        if not project(base).changes_numbers:
            continue
        rungs: list[LayerSettings] = []
        for rung in map(project, ladder):  # the other axis keeps tightening: its rungs repeat this one's floor
            if not rungs or rungs[-1] != rung:
                rungs.append(rung)
        ladders[axis] = (rungs, rungs.index(project(base)))
    return ladders


def combine_axes(settings: Mapping[str, LayerSettings | None]) -> LayerSettings:
    """One layer's settings from each axis's rung (None: that axis unreduced)."""
    keep, window = 1.0, UNBOUNDED_WINDOW
    for axis, s in settings.items():
        if s is None:
            continue
        if axis in ("both", "ffn"):
            keep = s.ffn_keep
        if axis in ("both", "hollow"):
            window = s.window
    return LayerSettings(ffn_keep=keep, window=window)


def plan_to_budget(
    config: RedLensConfig,
    before: Mapping[int, float],
    scores: Mapping[int, float],
    costs: LayerCosts,
    floor_scores: Mapping[int, float] | None = None,
    reference_total: float | None = None,
    extra: float = 0.0,
    not_reduced: Mapping[int, str] | None = None,
    axis_scores: AxisScores | None = None,
) -> ReductionPlan:
    """Reductions in order of least damage per FLOP saved, until the decoder FLOPs ratio <= flops_budget.

    Each layer climbs a ladder (settings_ladder): unreduced, looser settings, the config's
    settings, then one step tighter at a time down to the floors. A move is one layer one rung
    up; the planner takes the move with the smallest estimated damage per FLOP it saves, then
    gives back rungs that the last move made unnecessary. Damage: the layer's ranking score at
    the config's settings, linear in the rung from 0 (unreduced) up to it, and from it up to the
    score at the floors where that was measured (sensitivity metrics; otherwise growing at the
    same rate). Least critical layers therefore go first, a layer whose visual rows barely
    matter is tightened to the floors before a critical one is touched, and a critical layer
    that must be reduced is reduced as little as the budget allows.

    With plan_axes="separate" every layer has one ladder per reduction (axis_ladders): a move is
    one layer one rung up on one axis, a layer's damage is the sum of its axes' damages (each
    from that axis's own scores in `axis_scores`, {axis: (scores at its base, at its floor)};
    missing: `scores`/`floor_scores`), and its cost the sum of each axis's saving (the FFN and
    the attention are separate ops), counted as "every layer at that axis's rung".

    `before` holds each layer's unreduced cost on the sequence the graph runs on (after token
    pruning, when the config prunes); `reference_total` is the unpruned decoder's cost the
    budget is a fraction of (default: the sum of `before`), and `extra` work added outside the
    layers (the pruning scores) counts against the budget too. `not_reduced` (layer -> why), what
    the passes could not rewrite in the trials (filled while `costs` runs), is named in the error.
    """
    budget = config.flops_budget
    total = sum(before.values()) if reference_total is None else reference_total
    ladders = axis_ladders(config)
    separate = config.plan_axes == "separate"
    level_costs: dict[tuple[str, int], Mapping[int, float]] = {}

    def cost(axis: str, layer: int, level: int) -> float:
        if level == 0:
            return before[layer]
        if (axis, level) not in level_costs:
            level_costs[axis, level] = costs(ladders[axis][0][level - 1])
        return level_costs[axis, level][layer]

    def layer_cost(layer: int) -> float:
        # each axis's saving adds up (written so one axis gives its own count exactly)
        return sum(cost(a, layer, level[a, layer]) for a in ladders) - (len(ladders) - 1) * before[layer]

    def ratio_now() -> float:
        return (sum(layer_cost(i) for i in before) + extra) / total

    def axis_score(axis: str) -> tuple[Mapping[int, float], Mapping[int, float] | None]:
        return axis_scores[axis] if axis_scores and axis in axis_scores else (scores, floor_scores)

    def damage(axis: str, layer: int, lv: int) -> float:
        rungs = len(ladders[axis][0])
        base_level = ladders[axis][1] + 1
        base_scores, floors = axis_score(axis)
        base = max(0.0, base_scores[layer])
        if lv <= base_level or floors is None:
            return base * lv / base_level
        floor = max(base, floors[layer])
        return base + (floor - base) * (lv - base_level) / (rungs - base_level)

    def settings_of(layer: int) -> LayerSettings:
        return combine_axes({a: ladders[a][0][level[a, layer] - 1] if level[a, layer] else None for a in ladders})

    def describe(axis: str, layer: int, verb: str) -> tuple[str, dict]:
        to = settings_of(layer).to_dict() if any(level[a, layer] for a in ladders) else None
        text = f"{verb} layer {layer}{f' {axis}' if separate else ''} to {to if to is not None else 'unreduced'}"
        move = {"action": verb, "layer": layer, **({"axis": axis} if separate else {}), "to": to}
        return text, move

    order = sorted(before, key=lambda i: (scores[i], i))
    units = [(a, i) for i in order for a in ladders]  # layer-major: ties go to the least critical layer
    level = {u: 0 for u in units}
    ratio = ratio_now()
    steps: list[str] = []
    moves: list[dict] = []

    def next_saving(axis: str, layer: int) -> int | None:
        """The nearest tighter rung that costs fewer FLOPs (a loose rung can cost more than none)."""
        now = cost(axis, layer, level[axis, layer])
        for nxt in range(level[axis, layer] + 1, len(ladders[axis][0]) + 1):
            if cost(axis, layer, nxt) < now:
                return nxt
        return None

    while ratio > budget:
        best, best_key = None, None
        for rank, (axis, layer) in enumerate(units):
            nxt = next_saving(axis, layer)
            if nxt is None:
                continue
            saved = cost(axis, layer, level[axis, layer]) - cost(axis, layer, nxt)
            key = ((damage(axis, layer, nxt) - damage(axis, layer, level[axis, layer])) / saved, rank)
            if best_key is None or key < best_key:
                best, best_key = (axis, layer, nxt), key
        if best is None:
            break  # every layer at the floors
        axis, layer, nxt = best
        verb = "reduce" if not any(level[a, layer] for a in ladders) else "tighten"
        level[axis, layer] = nxt
        ratio = ratio_now()
        text, move = describe(axis, layer, verb)
        steps.append(f"{text}: ratio {ratio:.4f}")
        moves.append({**move, "ratio": ratio})
    # The last move may overshoot (a whole layer added at once): give back the rungs that
    # cost most damage per FLOP while the budget still holds.
    while ratio <= budget:
        best, best_key = None, None
        for rank, (axis, layer) in enumerate(units):
            if level[axis, layer] == 0:
                continue
            back = level[axis, layer] - 1
            if back and cost(axis, layer, back) >= before[layer]:
                back = 0  # a rung that costs more than no reduction is never worth stepping back to
            added = cost(axis, layer, back) - cost(axis, layer, level[axis, layer])
            if added <= 0 or ratio + added / total > budget:
                continue
            key = (-(damage(axis, layer, level[axis, layer]) - damage(axis, layer, back)) / added, -rank)
            if best_key is None or key < best_key:
                best, best_key = (axis, layer, back), key
        if best is None or best_key[0] >= 0:
            break
        axis, layer, back = best
        level[axis, layer] = back
        ratio = ratio_now()
        text, move = describe(axis, layer, "relax")
        steps.append(f"{text}: ratio {ratio:.4f}")
        moves.append({**move, "ratio": ratio})
    if ratio > budget:
        floor = combine_axes({a: ladder[-1] for a, (ladder, _) in ladders.items()}).to_dict()
        base = base_settings(config)
        by_reason: dict[str, list[int]] = {}
        for layer, why in sorted((not_reduced or {}).items()):
            by_reason.setdefault(why.removeprefix(f"layer {layer}: "), []).append(layer)
        cause = "".join(f" The passes cannot reduce layers {layers}: {why}." for why, layers in by_reason.items())
        enable = "" if base.reduces_ffn and base.hollow else \
            "enable both reductions (ffn_keep < 1 and a finite hollow_window), "
        error = BudgetUnreachableError(
            f"flops_budget={budget} cannot be met: with every decoder layer reduced down to the floors "
            f"(ffn_keep {floor['ffn_keep']}, window {floor['window']}) the lowest reachable decoder FLOPs ratio is "
            f"{ratio:.4f}.{cause} Raise flops_budget to at least {math.ceil(ratio * 1000) / 1000}, {enable}"
            "or prune visual tokens (prune=...)."
        )
        error.lowest_ratio = ratio  # what plan_keep_and_layers compares across keeps
        raise error
    reduced = [i for i in order if any(level[a, i] for a in ladders)]
    plan = ReductionPlan(settings={i: settings_of(i) for i in sorted(reduced, key=list(before).index)}, order=order,
                         steps=steps, predicted_ratio=ratio, moves=moves,
                         predicted_damage=sum(damage(a, i, lv) for (a, i), lv in level.items() if lv))
    logger.info("plan: layers %s, predicted ratio %.4f", list(plan.layers), ratio)
    return plan


def keep_candidates(config: RedLensConfig) -> list[float]:
    """The keeps `plan_keep` chooses among, largest first: PLAN_KEEPS up to prune_keep (downsample:
    the first keep of each pool side, since the side alone sets what it keeps)."""
    keeps = [k for k in PLAN_KEEPS if k <= config.prune_keep + 1e-12]
    if config.prune == "downsample":
        keeps = [k for k in keeps if k <= 0.3]
        keeps = [k for n, k in enumerate(keeps) if pool_factor(k) not in {pool_factor(j) for j in keeps[:n]}]
    return keeps


@dataclass
class KeepTrial:
    """One candidate keep as the joint planner sees it: what pruning alone costs and damages."""

    keep: float
    damage: float  # divergence of the pruned (unreduced) model's next token from the original's, calibration mean
    before: Mapping[int, float]  # each layer's unreduced cost on this keep's pruned sequence
    costs: LayerCosts | None  # settings -> each layer's cost on it; None: no per-layer reduction to plan
    extra: float = 0.0  # the pruning stage's scoring FLOPs at this keep
    not_reduced: dict[int, str] | None = None


def plan_keep_and_layers(
    config: RedLensConfig,
    trials: list[KeepTrial],
    scores: Mapping[int, float] | None,
    floor_scores: Mapping[int, float] | None,
    reference_total: float,
    axis_scores: AxisScores | None = None,
) -> ReductionPlan:
    """The keep and the per-layer settings of least total estimated damage with ratio <= flops_budget.

    Per candidate keep: pruning alone costs sum(before) + extra of `reference_total`; where that
    is above the budget the layers are planned on that keep's costs (plan_to_budget, the same
    damage-per-FLOP rule; `scores` in the same divergence as the keeps' damage). A candidate's
    total damage is its keep's damage plus the layers' estimated damage; the least total wins
    (ties: the larger keep). No candidate under the budget: BudgetUnreachableError naming the
    lowest ratio any candidate reaches. Candidates are tried in order of their own damage, and
    one whose damage alone reaches the best total so far is skipped ("skipped" in its outcome).
    """
    budget = config.flops_budget
    outcomes: dict[float, dict] = {}
    plans: dict[float, ReductionPlan] = {}
    lowest = math.inf
    best: dict | None = None
    # Least pruning damage first: a keep whose damage alone is above the best total so far cannot
    # win (a layer adds damage >= 0), so its layers are never planned (nor their costs counted).
    for trial in sorted(trials, key=lambda t: (t.damage, -t.keep)):
        alone = (sum(trial.before.values()) + trial.extra) / reference_total
        outcome = outcomes[trial.keep] = {"keep": trial.keep, "damage": trial.damage, "pruning_ratio": alone}
        if best is not None and trial.damage >= best["total_damage"]:
            outcome["skipped"] = True
            continue
        if alone <= budget or trial.costs is None or scores is None:
            plan = ReductionPlan(settings={}, predicted_ratio=alone)
            reached = alone <= budget
            lowest = min(lowest, alone)
        else:
            try:
                plan = plan_to_budget(config, trial.before, scores, trial.costs, floor_scores,
                                      reference_total=reference_total, extra=trial.extra,
                                      not_reduced=trial.not_reduced, axis_scores=axis_scores)
                reached = True
            except BudgetUnreachableError as error:
                lowest = min(lowest, getattr(error, "lowest_ratio", alone))
                reached = False
        if not reached:
            outcome["unreachable"] = True
            continue
        plans[trial.keep] = plan
        outcome.update(layers=list(plan.layers), layer_damage=plan.predicted_damage, ratio=plan.predicted_ratio,
                       total_damage=trial.damage + plan.predicted_damage)
        if best is None or (outcome["total_damage"], -trial.keep) < (best["total_damage"], -best["keep"]):
            best = outcome
    outcomes = [outcomes[t.keep] for t in trials]
    if best is None:
        raise BudgetUnreachableError(
            f"flops_budget={budget} cannot be met with plan_keep: at every candidate keep "
            f"{[t.keep for t in trials]} with every decoder layer down to the floors the lowest decoder FLOPs "
            f"ratio is {lowest:.4f}. Raise flops_budget to at least {math.ceil(lowest * 1000) / 1000}, or set "
            "plan_keep=False and a prune_keep below the candidates."
        )
    chosen = best
    plan = plans[chosen["keep"]]

    def line(o: dict) -> str:
        head = f"keep {o['keep']}: pruning alone ratio {o['pruning_ratio']:.4f}, damage {o['damage']:.4g}"
        if o.get("unreachable"):
            return head + "; unreachable with every layer at the floors"
        if o.get("skipped"):
            return head + ": not planned (its damage alone reaches the best total)"
        return (head + f"; layers {o['layers']} (estimated damage {o['layer_damage']:.4g}) to ratio {o['ratio']:.4f}: "
                f"total damage {o['total_damage']:.4g}")

    steps = [line(o) for o in outcomes]
    steps.append(f"chosen keep {chosen['keep']}: least total estimated damage {chosen['total_damage']:.4g} "
                 f"at ratio {chosen['ratio']:.4f}")
    move = {"action": "prune", "keep": chosen["keep"], "ratio": chosen["pruning_ratio"],
            "damage": chosen["damage"]}
    logger.info("plan_keep: keep %s, layers %s, predicted ratio %.4f", chosen["keep"], list(plan.layers),
                plan.predicted_ratio)
    return dataclasses.replace(plan, steps=steps + plan.steps, moves=[move, *plan.moves],
                               prune_keep=chosen["keep"], keep_candidates=outcomes)
