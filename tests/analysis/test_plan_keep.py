"""The joint planner (plan_keep): the pruning keep as one more axis of the ladder, on synthetic
scores and costs computed by hand, and on a tiny model whose audit must meet the budget."""

import pytest

import redlens_compile as rc
from redlens_compile.analysis.budget import KeepTrial, keep_candidates, plan_keep_and_layers

KEEPS = (0.5, 0.35, 0.25, 0.18, 0.125, 0.09)
UNPRUNED = 100.0  # each of 4 layers, before pruning: the budget is a fraction of 400
REFERENCE = 4 * UNPRUNED


def config(budget: float) -> rc.RedLensConfig:
    # The config's settings are the floors: the ladder ends there, so a layer's damage at its top rung is its score.
    return rc.RedLensConfig(flops_budget=budget, ffn_keep=0.0625, hollow_window=8, prune="random", prune_keep=0.5,
                            plan_keep=True)


def trial(keep: float, damage: float) -> KeepTrial:
    """A layer on the pruned sequence costs 100 x (0.2 + 0.8 keep) (text + kept visual rows); only the
    top rung saves FLOPs (0.1 of that), so each layer is either unreduced or fully reduced."""
    before = {i: UNPRUNED * (0.2 + 0.8 * keep) for i in range(4)}

    def costs(settings):
        return {i: c * 0.1 if settings.ffn_keep <= 0.0625 else c for i, c in before.items()}

    return KeepTrial(keep, damage, before, costs)


DAMAGE = {0.5: 0.001, 0.35: 0.003, 0.25: 0.006, 0.18: 0.02, 0.125: 0.03, 0.09: 0.05}


@pytest.mark.parametrize("scores, keep, layers, ratio, total, skipped", [
    # keep 0.5 (ratio 0.6) reduces layers 3 then 2 (54 each): 132/400 = 0.33, damage 0.001 + 0.002 + 0.001;
    # keep 0.35 needs the same two layers (0.264) for 0.006; the keeps from 0.25 on damage >= 0.004 alone
    ({0: 0.04, 1: 0.03, 2: 0.002, 3: 0.001}, 0.5, [2, 3], 0.33, 0.004, [0.25, 0.18, 0.125, 0.09]),
    # layer 2 dearer: 0.5 -> 0.001 + 0.011, 0.35 -> 0.003 + 0.011, 0.25 -> 0.006 + 0.001 (layer 3: 124/400 = 0.31)
    ({0: 0.04, 1: 0.03, 2: 0.01, 3: 0.001}, 0.25, [3], 0.31, 0.007, [0.18, 0.125, 0.09]),
    # every layer dear: 0.5 -> 2.001, 0.35 -> 2.003, 0.25 -> 1.006; pruning alone at 0.18 (137.6/400 = 0.344)
    # for 0.02 beats them
    ({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, 0.18, [], 0.344, 0.02, [0.125, 0.09]),
])
def test_the_keep_and_layers_of_least_total_damage_under_the_budget(scores, keep, layers, ratio, total, skipped):
    plan = plan_keep_and_layers(config(0.35), [trial(k, DAMAGE[k]) for k in KEEPS], scores, None, REFERENCE)
    assert plan.prune_keep == keep
    assert list(plan.layers) == layers
    assert plan.predicted_ratio == pytest.approx(ratio) and plan.predicted_ratio <= 0.35
    chosen = next(o for o in plan.keep_candidates if o["keep"] == keep)
    assert chosen["total_damage"] == pytest.approx(total)
    # every planned candidate's total is no smaller than the chosen one's; the skipped ones damage more alone
    assert min(o["total_damage"] for o in plan.keep_candidates if "total_damage" in o) == pytest.approx(total)
    assert [o["keep"] for o in plan.keep_candidates if o.get("skipped")] == skipped
    assert all(o["damage"] >= total for o in plan.keep_candidates if o.get("skipped"))
    assert [o["keep"] for o in plan.keep_candidates] == list(KEEPS)
    assert plan.moves[0] == {"action": "prune", "keep": keep, "ratio": pytest.approx(0.2 + 0.8 * keep),
                             "damage": DAMAGE[keep]}
    assert any(f"chosen keep {keep}" in step for step in plan.steps)
    d = plan.to_dict()
    assert d["prune_keep"] == keep and len(d["keep_candidates"]) == len(KEEPS)


def test_no_candidate_under_the_budget_raises_naming_the_lowest_ratio():
    # keep 0.09 with every layer reduced: 4 x 27.2 x 0.1 = 10.88 of 400 = 0.0272
    with pytest.raises(rc.BudgetUnreachableError, match=r"lowest decoder FLOPs ratio is 0\.0272\. Raise flops_budget "
                                                         r"to at least 0\.028"):
        plan_keep_and_layers(config(0.02), [trial(k, DAMAGE[k]) for k in KEEPS], {i: 0.01 for i in range(4)}, None,
                             REFERENCE)


def test_without_layer_reductions_the_keep_alone_must_meet_the_budget():
    plan = plan_keep_and_layers(config(0.35), [KeepTrial(k, DAMAGE[k], trial(k, 0).before, None) for k in KEEPS],
                                None, None, REFERENCE)
    assert plan.prune_keep == 0.18 and not plan.settings  # the largest keep whose pruning alone fits 0.35
    with pytest.raises(rc.BudgetUnreachableError, match=r"0\.2720"):
        plan_keep_and_layers(config(0.2), [KeepTrial(k, DAMAGE[k], trial(k, 0).before, None) for k in KEEPS],
                             None, None, REFERENCE)


def test_candidates_and_config_checks():
    assert keep_candidates(rc.RedLensConfig(flops_budget=0.2, prune="random", prune_keep=0.25, plan_keep=True)) == \
        [0.25, 0.18, 0.125, 0.09]
    # downsample: one keep per pool side (2x2, 3x3)
    assert keep_candidates(rc.RedLensConfig(flops_budget=0.2, prune="downsample", prune_keep=0.25, plan_keep=True,
                                            prune_proportional=False)) == [0.25, 0.125]
    for bad, match in [(dict(prune="fastv"), "before the first layer"), (dict(prune_keep=8), "a fraction >= 0.09"),
                       (dict(layers="all"), "layers='auto'"), (dict(flops_budget=1.0), "flops_budget < 1"),
                       (dict(ranking="activation"), "ranking='jsd'"), (dict(plan_keep=1), "true or false")]:
        with pytest.raises(rc.ConfigError, match=match):
            rc.RedLensConfig(**{**dict(flops_budget=0.2, prune="random", prune_keep=0.5, plan_keep=True), **bad})
    assert rc.RedLensConfig.preset("codebook-auto+budget-0.15").plan_keep


def test_optimize_chooses_a_keep_and_the_audit_meets_the_budget(family_models, tmp_path):
    from tiny_families import make_inputs

    from redlens_compile.artifact.saved import plan_config

    model = family_models("llava")
    example = make_inputs("llava", model)
    # the floors as the config's settings: a short ladder (4 rungs), so few trial graphs are counted
    opt = rc.optimize(model, example, config=rc.RedLensConfig(flops_budget=0.3, prune="random", prune_keep=0.35,
                                                              plan_keep=True, ffn_keep=0.0625, hollow_window=8))
    report = opt.report
    keep = report.plan["prune_keep"]
    assert keep in KEEPS and report.pruning["keep"] == keep and report.pruning["keep_planned"]
    assert report.flops_ratio <= 0.3
    assert report.plan["predicted_ratio"] == pytest.approx(report.flops_ratio, rel=1e-9)
    chosen = next(o for o in report.plan["keep_candidates"] if o["keep"] == keep)
    assert chosen["total_damage"] == min(o["total_damage"] for o in report.plan["keep_candidates"]
                                         if "total_damage" in o)
    assert [o["keep"] for o in report.plan["keep_candidates"]] == [0.35, 0.25, 0.18, 0.125, 0.09]
    # a keep's damage: the pruned model's next-token divergence from the original's, more pruned more damage here
    damages = [o["damage"] for o in report.plan["keep_candidates"]]
    assert all(d > 0 for d in damages)
    # the stage kept that share of each sample's visual rows
    assert opt.pruning.keep == keep and all(a < b for a, b in zip(report.pruning["visual_after"],
                                                                   report.pruning["visual_before"]))
    assert f"keep {keep} (chosen by the planner" in report.to_markdown()
    saved = plan_config(opt)  # what save_pretrained writes: the chosen keep, explicit
    assert saved.prune_keep == keep and not saved.plan_keep and isinstance(saved.layers, dict)
    opt.save_pretrained(tmp_path / "saved")
    loaded = rc.load(tmp_path / "saved", model)  # the saved plan, no planning: the same keep and FLOPs
    assert loaded.pruning.keep == keep and loaded.report.flops_ratio == pytest.approx(report.flops_ratio, rel=1e-12)
    # no per-layer reduction to plan: pruning alone at the smallest keep is the lowest ratio
    with pytest.raises(rc.BudgetUnreachableError, match="at every candidate keep"):
        rc.optimize(model, example, config=rc.RedLensConfig(flops_budget=0.01, prune="random", prune_keep=0.35,
                                                            plan_keep=True, ffn_keep=1.0, hollow_window=2**31 - 1))
