"""The budget planner on synthetic layer costs: least damage per FLOP first, never above the budget."""

import pytest

import redlens_compile as rc
from redlens_compile.analysis.budget import FFN_KEEP_FLOOR, WINDOW_FLOOR, plan_to_budget, settings_ladder


def synthetic_costs(settings):
    # A layer costs 100 unreduced; reduced, 30 fixed (projections) + 70 x ffn_keep.
    return {i: 30 + 70 * settings.ffn_keep for i in range(4)}


BEFORE = {i: 100.0 for i in range(4)}
SCORES = {0: 1e-2, 1: 1e-4, 2: 1e-4, 3: 0.0}  # layer 0 critical, layer 3 free
FLOORS = {0: 5e-1, 1: 1e-2, 2: 1e-2, 3: 0.0}


def test_ladder_runs_from_loose_to_the_floors():
    ladder, base = settings_ladder(rc.RedLensConfig(ffn_keep=0.5, hollow_window=64))
    assert ladder[base].ffn_keep == 0.5 and ladder[base].window == 64
    keeps = [s.ffn_keep for s in ladder]
    assert keeps == sorted(keeps, reverse=True) and keeps[0] < 1.0
    assert ladder[-1].ffn_keep == FFN_KEEP_FLOOR and ladder[-1].window == WINDOW_FLOOR
    # A reduction that is off stays off on every rung.
    ladder, _ = settings_ladder(rc.RedLensConfig(ffn_keep=1.0, hollow_window=64))
    assert all(s.ffn_keep == 1.0 for s in ladder)


@pytest.mark.parametrize("budget", [0.9, 0.75, 0.6, 0.5])
def test_plan_meets_the_budget_and_spares_the_critical_layer(budget):
    plan = plan_to_budget(rc.RedLensConfig(flops_budget=budget), BEFORE, SCORES, synthetic_costs, FLOORS)
    ratio = sum(synthetic_costs(plan.settings[i])[i] if i in plan.settings else 100.0 for i in range(4)) / 400
    assert ratio <= budget and plan.predicted_ratio == pytest.approx(ratio)
    assert ratio > budget - 0.05  # not far below: rungs given back while the budget held
    keep = {i: plan.settings[i].ffn_keep if i in plan.settings else 1.0 for i in range(4)}
    assert keep[3] == min(keep.values())  # the free layer is reduced most (first)
    assert keep[0] == max(keep.values())  # the critical layer least
    if budget <= 0.6:
        assert keep[3] == FFN_KEEP_FLOOR
    assert plan.order == [3, 1, 2, 0] and plan.steps


def test_unreachable_budget_names_the_floor_ratio():
    with pytest.raises(rc.BudgetUnreachableError, match=r"lowest reachable decoder FLOPs ratio is 0\.3438"):
        plan_to_budget(rc.RedLensConfig(flops_budget=0.3), BEFORE, SCORES, synthetic_costs, FLOORS)


def test_per_layer_settings_become_the_plan_as_given_without_ranking():
    from redlens_compile.analysis.budget import needs_ranking, plan_fixed
    from redlens_compile.config import UNBOUNDED_WINDOW

    cfg = rc.RedLensConfig(flops_budget=0.5, layers={0: {"ffn_keep": 0.21, "hollow_window": 27},
                                                     2: {"ffn_keep": 0.0625, "hollow_window": None},
                                                     3: {"ffn_keep": 1.0, "hollow_window": None}})
    assert not needs_ranking(cfg)
    plan = plan_fixed(cfg, num_layers=4)
    # layer 3 changes no number: left out, as the planner leaves such layers out
    assert {i: (s.ffn_keep, s.window) for i, s in plan.settings.items()} == {0: (0.21, 27), 2: (0.0625, UNBOUNDED_WINDOW)}
    assert plan.to_dict()["settings"] == {"0": {"ffn_keep": 0.21, "window": 27}, "2": {"ffn_keep": 0.0625, "window": None}}
    assert plan_fixed(rc.RedLensConfig(layers={}), num_layers=4).settings == {}
    with pytest.raises(rc.ConfigError, match=r"indices \[4\] are out of range; the decoder has 4 layers"):
        plan_fixed(rc.RedLensConfig(layers={4: {"ffn_keep": 0.5}}), num_layers=4)
