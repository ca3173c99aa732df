"""plan_axes="separate": the dynamic FFN and hollow attention as two axes of the planner's ladder."""

import pytest
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.analysis.budget import (FFN_KEEP_FLOOR, WINDOW_FLOOR, LayerSettings, axis_ladders,
                                             plan_to_budget, settings_ladder)
from redlens_compile.config import UNBOUNDED_WINDOW

BEFORE = {i: 100.0 for i in range(4)}


def additive_costs(settings):
    # A layer costs 100 unreduced: attention 40 (hollow: 10 + 30 x window / 128), FFN 60 (x ffn_keep).
    attention = 10 + 30 * min(1.0, settings.window / 128) if settings.hollow else 40.0
    ffn = 60 * settings.ffn_keep if settings.reduces_ffn else 60.0
    return {i: attention + ffn for i in range(4)}


# FFN damage small everywhere; a hollow window hurts layers 0-2 and not layer 3.
AXES = {"ffn": ({i: 1e-3 for i in range(4)}, {i: 2e-3 for i in range(4)}),
        "hollow": ({0: 0.5, 1: 0.5, 2: 0.5, 3: 0.0}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0})}
TOTAL = {i: AXES["ffn"][0][i] + AXES["hollow"][0][i] for i in range(4)}


def test_axis_ladders_project_the_joint_ladder():
    config = rc.RedLensConfig(plan_axes="separate")
    joint, base = settings_ladder(config)
    ladders = axis_ladders(config)
    ffn, ffn_base = ladders["ffn"]
    hollow, hollow_base = ladders["hollow"]
    assert [s.ffn_keep for s in ffn] == [s.ffn_keep for s in joint]  # the FFN reaches its floor last here
    assert all(s.window == UNBOUNDED_WINDOW for s in ffn) and all(s.ffn_keep == 1.0 for s in hollow)
    assert [s.window for s in hollow] == sorted({s.window for s in joint}, reverse=True)
    assert ffn[ffn_base].ffn_keep == 0.5 and hollow[hollow_base].window == 64
    assert ffn[-1].ffn_keep == FFN_KEEP_FLOOR and hollow[-1].window == WINDOW_FLOOR
    # an axis the config leaves off has no rungs; "together" is the joint ladder
    assert list(axis_ladders(rc.RedLensConfig(plan_axes="separate", ffn_keep=1.0))) == ["hollow"]
    assert axis_ladders(rc.RedLensConfig()) == {"both": (joint, base)}
    with pytest.raises(rc.ConfigError, match="plan_axes='apart': must be one of together, separate"):
        rc.RedLensConfig(plan_axes="apart")


def test_separate_axes_take_ffn_floors_everywhere_and_hollow_only_where_it_is_free():
    # FFN floor on every layer: 4 x (40 + 3.75) = 175; layer 3's window 8 saves 40 - 11.875 = 28.125 more:
    # 146.875 / 400 = 0.3671875 exactly, the budget. Any other hollow rung costs far more damage per FLOP.
    budget = 146.875 / 400
    config = rc.RedLensConfig(flops_budget=budget, plan_axes="separate")
    plan = plan_to_budget(config, BEFORE, TOTAL, additive_costs, axis_scores=AXES)
    assert plan.settings == {0: LayerSettings(FFN_KEEP_FLOOR, UNBOUNDED_WINDOW),
                             1: LayerSettings(FFN_KEEP_FLOOR, UNBOUNDED_WINDOW),
                             2: LayerSettings(FFN_KEEP_FLOOR, UNBOUNDED_WINDOW),
                             3: LayerSettings(FFN_KEEP_FLOOR, WINDOW_FLOOR)}
    assert plan.predicted_ratio == budget
    # damage: each layer's FFN floor score, layer 3's window free
    assert plan.predicted_damage == pytest.approx(4 * 2e-3)
    assert {m["axis"] for m in plan.moves} == {"ffn", "hollow"}
    assert all(m["layer"] == 3 for m in plan.moves if m["axis"] == "hollow")
    assert any(" hollow to " in s for s in plan.steps) and any(" ffn to " in s for s in plan.steps)
    # the joint ladder cannot give layer 3 a window without giving the others one too at this budget
    joint = plan_to_budget(rc.RedLensConfig(flops_budget=budget), BEFORE, TOTAL, additive_costs,
                           {i: AXES["ffn"][1][i] + AXES["hollow"][1][i] for i in range(4)})
    assert any(s.hollow for i, s in joint.settings.items() if i != 3)
    # FFN alone cannot reach a budget below 0.4375: the same error as the joint planner's
    with pytest.raises(rc.BudgetUnreachableError, match=r"lowest reachable decoder FLOPs ratio is 0\.4375"):
        plan_to_budget(rc.RedLensConfig(flops_budget=0.4, hollow_window=UNBOUNDED_WINDOW, plan_axes="separate"),
                       BEFORE, TOTAL, additive_costs, axis_scores={"ffn": AXES["ffn"]})


def test_separate_axes_on_a_tiny_model_meet_the_budget_deterministically(family_models):
    model = family_models("llava")
    inputs = make_inputs("llava", model)
    config = rc.RedLensConfig(flops_budget=0.6, plan_axes="separate")
    first = rc.optimize(model, inputs, config=config).report
    second = rc.optimize(model, inputs, config=config).report
    assert first.flops_ratio <= 0.6
    assert first.plan == second.plan and first.flops_ratio == second.flops_ratio
    assert set(first.ranking["axes"]) == {"ffn", "hollow"}
    moved = [m for m in first.plan["moves"] if m["action"] != "take off"]
    assert moved and all(m["axis"] in ("ffn", "hollow") for m in moved)


def test_a_layers_saving_is_the_sum_of_its_two_axes_savings(captured_family):
    """The planner adds the axes' savings per layer: the FFN and the attention are separate ops."""
    from redlens_compile.analysis.budget import ReductionPlan
    from redlens_compile.analysis.flops import count_graph_flops
    from redlens_compile.passes import apply_plan

    _, _, captured = captured_family("llava")
    layers = range(len(captured.decoder.language_model.layers))

    def count(settings):
        plan = ReductionPlan({i: settings for i in layers}) if settings.changes_numbers else ReductionPlan({})
        counted = count_graph_flops(apply_plan(captured.graph_module, plan, 0.25, copy=True).graph_module,
                                    captured.example)
        return {i: counted.layer_total(i) for i in layers}

    unreduced = count(LayerSettings(1.0, UNBOUNDED_WINDOW))
    ffn, hollow, both = count(LayerSettings(0.25, UNBOUNDED_WINDOW)), count(LayerSettings(1.0, 4)), \
        count(LayerSettings(0.25, 4))
    for i in layers:
        assert ffn[i] < unreduced[i] and hollow[i] != unreduced[i]
        assert both[i] == pytest.approx(ffn[i] + hollow[i] - unreduced[i], rel=1e-12, abs=0)
