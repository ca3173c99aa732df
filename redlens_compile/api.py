"""Public entry points: optimize(model, example_inputs, config), audit(model, example_inputs),
load(directory, model) and at_dtype (re-optimizing in another dtype).

optimize: capture (and check the graph against eager; pruning after layer K: as two graphs) ->
count FLOPs -> rank layers on the calibration inputs -> plan to the budget -> compile (the
passes, passes/compile.py) -> count again -> report; one path for every pruning placement.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .analysis.budget import (LayerSettings, ReductionPlan, axis_ladders, drop_unpaying, needs_ranking, paying_costs,
                              plan_fixed, plan_to_budget, validate_layers)
from .analysis.flops import count_graph_flops, merge_flops
from .analysis.ranking import SENSITIVITY_METRICS, LayerRanking, activation_scores, sensitivity_scores
from .artifact.optimized_model import OptimizedModel
from .capture.decoder_inputs import DecoderInputs, capture_decoder_inputs, image_token_mask
from .capture.families import adapter_for
from .capture.pipeline import CapturedDecoder, capture, capture_split, check_capture
from .config import RedLensConfig
from .errors import BudgetUnreachableError, ConfigError, ReductionUnavailableError
from .passes.compile import compile_decoder
from .passes.pipeline import apply_plan
from .runtime.token_pruning import TokenPruning, build_pruning
from .report.audit_report import AuditReport
from .report.build import build_report

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

__all__ = ["at_dtype", "audit", "build_pruning", "capture", "check_inputs", "load", "optimize"]


def _noop_progress(_: str) -> None:
    pass


def _rank(captured: CapturedDecoder, model: nn.Module, calibration: list[DecoderInputs], config: RedLensConfig,
          layers: list[int], reference, key_bias: bool, engine=None, example_inputs=None) -> LayerRanking:
    if config.ranking not in SENSITIVITY_METRICS:
        decoder_layers = list(captured.adapter.language_model(model).layers)
        return LayerRanking(config.ranking,
                            activation_scores(captured.decoder, decoder_layers, calibration, config.ranking))
    # each axis at its base rung and at its floor (together: one axis, both reductions at once)
    levels: list[tuple[str, LayerSettings]] = []
    for axis, (ladder, base) in axis_ladders(config).items():
        levels += [(axis, ladder[base])] + ([(axis, ladder[-1])] if len(ladder) > base + 1 else [])
    if engine is not None:
        from .analysis.ray_engine import sensitivity_scores_ray

        found = sensitivity_scores_ray(engine, model, example_inputs, reference, calibration, layers,
                                       [s for _, s in levels], config.probe_tokens, key_bias, config.ranking,
                                       functools.partial(apply_plan, probe_rule=config.probe_rule))
    else:
        def at(settings):
            def reduce_one(layer: int):
                plan = ReductionPlan(settings={layer: settings})
                return apply_plan(captured.graph_module, plan, config.probe_tokens, copy=True,
                                  key_bias=key_bias, probe_rule=config.probe_rule).graph_module
            return sensitivity_scores(reference, calibration, layers, reduce_one, config.ranking)

        found = [at(s) for _, s in levels]
    axes: dict[str, list[dict[int, float]]] = {}
    for (axis, _), scores in zip(levels, found):
        axes.setdefault(axis, []).append(scores)
    if config.plan_axes == "together":
        (base, *floor), = axes.values()
        return LayerRanking(config.ranking, base, floor[0] if floor else None)
    pairs = {axis: (got[0], got[1] if len(got) > 1 else None) for axis, got in axes.items()}
    total = {i: sum(base[i] for base, _ in pairs.values()) for i in layers}
    return LayerRanking(config.ranking, total, None, axes=pairs)


def _probe_note(config: RedLensConfig, example: DecoderInputs, plan: ReductionPlan) -> list[str]:
    if not isinstance(config.probe_tokens, int) or not any(s.reduces_ffn for s in plan.settings.values()):
        return []
    fewest = int(example.visual_mask.sum(dim=1).min())
    if config.probe_tokens <= fewest:
        return []
    return [f"probe_tokens={config.probe_tokens} exceeds the {fewest} visual tokens of an example row: "
            "the probe is clamped to every visual row of that sample"]


def optimize(
    model: nn.Module,
    example_inputs: Mapping[str, Any],
    config: RedLensConfig | None = None,
    calibration: list[Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
    engine: Any = "local",
) -> OptimizedModel:
    """Capture `model`'s decoder, rewrite it per `config` and return the optimized model.

    engine: where the layer ranking's trials run: "local", "ray" (a local Ray) or a
    analysis.ray_engine.RayEngine (a cluster by address); the scores are the same."""
    progress = progress or _noop_progress
    config = RedLensConfig() if config is None else config
    if not isinstance(config, RedLensConfig):
        raise ConfigError(f"config must be a RedLensConfig, got {type(config).__name__}")
    from .analysis.ray_engine import resolve_engine

    ray_engine = resolve_engine(engine)  # a missing extra fails before any work
    model.eval()
    pruning = check_inputs(model, example_inputs, config)

    progress("running the original model on the example")
    with torch.no_grad():
        reference = model(**example_inputs)
    progress("capturing the decoder graph (torch.export)")
    captured = capture(model, example_inputs)
    check_capture(captured, reference.logits)
    split = None
    if pruning is not None and pruning.after_layer is not None:
        progress(f"capturing the decoder as two graphs, cut after layer {pruning.layer}")
        split = capture_split(captured, model, pruning.layer)
    progress("counting FLOPs before the rewrite (fvcore)")
    before = count_graph_flops(captured.graph_module, captured.example)
    plan, ranking, notes = _rank_and_plan(model, captured, before, config, pruning, split, calibration, ray_engine,
                                          example_inputs, progress)
    if plan.prune_keep is not None:  # plan_keep: the stage at the keep the planner chose
        pruning = dataclasses.replace(pruning, keep=plan.prune_keep)

    progress("running passes")
    compiled = compile_decoder(captured, plan, config.probe_tokens, pruning, split, probe_rule=config.probe_rule)
    opt = OptimizedModel(model, captured.adapter, compiled, None, config, output_cls=type(reference),
                         example_inputs=example_inputs, rebuild=at_dtype)
    progress("counting FLOPs after the rewrite")
    after, pruning_summary = _count_compiled(opt, captured)
    if plan.prune_keep is not None:
        pruning_summary["keep_planned"] = True  # the report and the CLI say the keep is the planner's
    opt.report = build_report(model, captured, example_inputs, before, after, config, plan, compiled.records, ranking,
                              notes + compiled.notes + _config_notes(config, plan, pruning, split),
                              pruning=pruning_summary)
    ratio = opt.report.flops_ratio
    if split is not None and config.flops_budget < 1.0 and ratio > config.flops_budget:
        raise ReductionUnavailableError(
            f"prune={pruning.method!r} after layer {pruning.layer} brings the decoder FLOPs ratio to {ratio:.4f}, above "
            f"flops_budget={config.flops_budget}; combining pruning inside the decoder with the per-layer reductions "
            f"is not part of this build: raise flops_budget to >= {ratio:.3f}, prune earlier or keep fewer tokens"
        )
    if config.plan_keep and ratio > config.flops_budget:  # the planner's promise, checked on the compiled graph
        raise BudgetUnreachableError(
            f"plan_keep chose prune_keep={plan.prune_keep} for a predicted decoder FLOPs ratio of "
            f"{plan.predicted_ratio:.4f}, but the compiled decoder counts {ratio:.4f}, above flops_budget="
            f"{config.flops_budget}: lower flops_budget a little or give prune_keep with plan_keep=False")
    if split is None and config.layers != "auto" and ratio > config.flops_budget:
        logger.warning("decoder FLOPs ratio %.3f is above flops_budget %.3f: layers were given explicitly",
                       ratio, config.flops_budget)
    return opt


def _reference_graph(captured: CapturedDecoder, config: RedLensConfig, key_bias: bool):
    """The unreduced graph the reductions are measured against (with the key-bias input when pruning sets one)."""
    if not key_bias:
        return captured.graph_module
    return apply_plan(captured.graph_module, ReductionPlan(settings={}), config.probe_tokens, copy=True,
                      key_bias=True).graph_module


def _plan_costs(captured: CapturedDecoder, config: RedLensConfig, key_bias: bool, example: DecoderInputs,
                layers, not_reduced: dict[int, str]) -> Callable[[ReductionPlan], dict[int, float]]:
    """plan -> each layer's FLOPs with it applied, on `example`; what a pass could not rewrite goes
    into not_reduced (layer -> why)."""
    def plan_costs(plan: ReductionPlan) -> dict[int, float]:
        trial = apply_plan(captured.graph_module, plan, config.probe_tokens, copy=True, key_bias=key_bias,
                           probe_rule=config.probe_rule)
        not_reduced.update(trial.skipped)
        counted = count_graph_flops(trial.graph_module, example)
        return {i: counted.layer_total(i) for i in layers}
    return plan_costs


def _rank_and_plan(model: nn.Module, captured: CapturedDecoder, before, config: RedLensConfig,
                   pruning: TokenPruning | None, split, calibration, ray_engine, example_inputs,
                   progress: Progress) -> tuple[ReductionPlan, LayerRanking | None, list[str]]:
    """rank -> plan: the per-layer settings to compile, the ranking, and the planner's notes.

    Pruning after layer K (split) combines with no per-layer reduction (check_inputs refuses
    fixed layers): its plan is empty. Otherwise the graph runs on the pruned sequence: the
    reductions are ranked, planned and counted on it."""
    if split is not None:
        return ReductionPlan(settings={}), None, []
    if config.plan_keep:
        return _plan_keep(model, captured, before, config, pruning, calibration, ray_engine, example_inputs, progress)
    adapter = captured.adapter
    pruned = pruning(captured.example) if pruning is not None else None
    example = pruned.inputs if pruned is not None else captured.example
    scoring = float(pruning.scoring_flops(captured.example)) if pruning is not None else 0.0
    key_bias = pruning is not None and pruning.key_bias
    reference_graph = _reference_graph(captured, config, key_bias)
    unreduced = count_graph_flops(reference_graph, example) if pruned is not None else before
    not_reduced: dict[int, str] = {}  # layer -> why a pass could not rewrite it, from the trials
    plan_costs = _plan_costs(captured, config, key_bias, example, before.layers, not_reduced)

    layers_unreduced = {i: unreduced.layer_total(i) for i in before.layers}
    ranking = None
    if needs_ranking(config):
        progress("ranking layers on the calibration inputs")
        calib = [capture_decoder_inputs(model, adapter, x) for x in calibration] if calibration else [captured.example]
        if pruning is not None:
            calib = [pruning(x).inputs for x in calib]
        ranking = _rank(captured, model, calib, config, sorted(before.layers), reference_graph, key_bias,
                        ray_engine, example_inputs)

        def layer_costs(settings):
            return plan_costs(ReductionPlan(settings={i: settings for i in before.layers}))

        reference_total = sum(before.layer_total(i) for i in before.layers)
        plan = plan_to_budget(config, layers_unreduced, ranking.scores, paying_costs(layer_costs, layers_unreduced),
                              ranking.floor_scores, reference_total=reference_total, extra=scoring,
                              not_reduced=not_reduced, axis_scores=ranking.axes)
    else:
        plan = plan_fixed(config, adapter.num_layers(model))
    # Reductions that save no FLOPs on this example (or that a pass cannot apply) are taken off.
    plan, unpaid = drop_unpaying(plan, plan_costs, layers_unreduced, not_reduced)
    return plan, ranking, _probe_note(config, example, plan) + unpaid


def _plan_keep(model: nn.Module, captured: CapturedDecoder, before, config: RedLensConfig, pruning: TokenPruning,
               calibration, ray_engine, example_inputs,
               progress: Progress) -> tuple[ReductionPlan, LayerRanking | None, list[str]]:
    """plan_keep: each candidate keep scored once (pruning alone against the original, on the
    calibration inputs), the layers ranked once (on the largest keep's pruned inputs) and planned
    on each keep's own costs; analysis/budget.py plan_keep_and_layers picks the combination."""
    from .analysis.budget import KeepTrial, keep_candidates, plan_keep_and_layers
    from .analysis.ranking import divergence, mean_score, next_token_log_probs

    adapter, key_bias = captured.adapter, pruning.key_bias
    calib = [capture_decoder_inputs(model, adapter, x) for x in calibration] if calibration else [captured.example]
    original = [next_token_log_probs(captured.graph_module, x) for x in calib]
    reference_graph = _reference_graph(captured, config, key_bias)
    layers = sorted(before.layers)
    ranking, trials, plan_costs_of = None, [], {}
    for keep in keep_candidates(config):
        stage = dataclasses.replace(pruning, keep=keep)
        progress(f"scoring prune_keep={keep} on the calibration inputs")
        pruned_calib = [stage(x).inputs for x in calib]
        damage = mean_score([divergence(ref, next_token_log_probs(reference_graph, x), config.ranking)
                             for ref, x in zip(original, pruned_calib)])
        example = stage(captured.example).inputs
        not_reduced: dict[int, str] = {}
        plan_costs = _plan_costs(captured, config, key_bias, example, layers, not_reduced)
        unreduced = count_graph_flops(reference_graph, example)
        layers_unreduced = {i: unreduced.layer_total(i) for i in layers}
        costs = None
        if needs_ranking(config):
            if ranking is None:
                progress("ranking layers on the calibration inputs")
                ranking = _rank(captured, model, pruned_calib, config, layers, reference_graph, key_bias, ray_engine,
                                example_inputs)
            costs = paying_costs(lambda s, pc=plan_costs: pc(ReductionPlan(settings={i: s for i in layers})),
                                 layers_unreduced)
        plan_costs_of[keep] = (plan_costs, example)
        trials.append(KeepTrial(keep, damage, layers_unreduced, costs, float(stage.scoring_flops(captured.example)),
                                not_reduced))
    plan = plan_keep_and_layers(config, trials, ranking.scores if ranking else None,
                                ranking.floor_scores if ranking else None,
                                reference_total=sum(before.layer_total(i) for i in layers),
                                axis_scores=ranking.axes if ranking else None)
    chosen = next(t for t in trials if t.keep == plan.prune_keep)
    plan_costs, example = plan_costs_of[chosen.keep]
    plan, unpaid = drop_unpaying(plan, plan_costs, chosen.before, chosen.not_reduced)
    return plan, ranking, _probe_note(config, example, plan) + unpaid


def _count_compiled(opt: OptimizedModel, captured: CapturedDecoder) -> tuple[Any, dict | None]:
    """The compiled graphs' FLOPs on the inputs each runs on (the pruned sequence where pruning), and
    the pruning summary of the report."""
    compiled, example = opt.compiled, captured.example
    pruning = compiled.pruning
    if compiled.tail_graph_module is not None:
        with torch.no_grad():
            prefill = opt.run_decoder(example)
        after = merge_flops(count_graph_flops(compiled.graph_module, example),
                            count_graph_flops(compiled.tail_graph_module, prefill.ran_on))
        ran_on, scoring = prefill.ran_on, 0.0
        visual_before, visual_after = example.visual_mask.sum(dim=1), ran_on.visual_mask.sum(dim=1)
    elif pruning is not None:
        pruned = pruning(example)
        ran_on, scoring = pruned.inputs, float(pruning.scoring_flops(example))
        after = count_graph_flops(compiled.graph_module, ran_on)
        visual_before, visual_after = pruned.visual_before, pruned.visual_after
    else:
        return count_graph_flops(compiled.graph_module, example), None
    summary = dict(pruning.describe(), scoring_flops=scoring, visual_before=visual_before.tolist(),
                   visual_after=visual_after.tolist(), seq_len_before=example.seq_len, seq_len_after=ran_on.seq_len,
                   kept_rows=ran_on.attention_mask.sum(dim=1).tolist())
    return after, summary


def _config_notes(config: RedLensConfig, plan: ReductionPlan, pruning: TokenPruning | None, split) -> list[str]:
    """What the report says about the config's choices (hollow layers without the key bias, explicit layers)."""
    if split is not None:
        return []
    notes = []
    if isinstance(config.layers, dict):
        notes.append(f"per-layer settings given by the config (a saved plan): layers {sorted(plan.settings)} applied "
                     "with no ranking and no planning")
    elif config.layers != "auto" and plan.settings and config.flops_budget < 1.0:
        notes.append(f"layers={config.layers!r} given explicitly: flops_budget={config.flops_budget} was not applied")
    return notes


def at_dtype(opt: OptimizedModel, dtype: torch.dtype, example_inputs: Mapping[str, Any] | None = None) -> OptimizedModel:
    """`opt` rebuilt on a copy of its model in `dtype`: the decoder captured again (a graph traced in
    one dtype keeps that dtype's casts) and the same plan compiled, with no ranking (what
    OptimizedModel.export_onnx(dtype=...) calls through `opt.rebuild`)."""
    import copy

    from .exporters.onnx import cast_inputs

    example_inputs = example_inputs if example_inputs is not None else opt.example_inputs
    model = copy.deepcopy(opt.model).to(dtype)
    captured = capture(model, cast_inputs(example_inputs, dtype))
    compiled = opt.compiled
    split = capture_split(captured, model, compiled.split_layer) if compiled.split_layer is not None else None
    again = compile_decoder(captured, compiled.plan, compiled.probe_tokens, compiled.pruning, split,
                            probe_rule=compiled.probe_rule)
    return OptimizedModel(model, opt.adapter, again, opt.report, opt.config, output_cls=opt.output_cls,
                          example_inputs=opt.example_inputs, rebuild=at_dtype)


def load(directory, model: nn.Module, example_inputs: Mapping[str, Any] | None = None,
         progress: Progress | None = None, check_versions: bool = True) -> OptimizedModel:
    """The OptimizedModel saved in `directory` (save_pretrained), rebuilt on `model`: the folder and the
    model's fingerprint checked first (artifact/saved.py), then optimize with the saved plan as an
    explicit config (no ranking, no planning). Also OptimizedModel.from_pretrained and rc.load.

    `example_inputs`: what the decoder is captured and checked on; default the example saved in
    the folder (the one optimize was given), so no user data is needed."""
    from .artifact.saved import check_saved, mark_loaded

    saved, example = check_saved(directory, model, example_inputs, check_versions)
    return mark_loaded(optimize(model, example, config=saved.config, progress=progress), saved)


def check_inputs(model: nn.Module, example_inputs: Mapping[str, Any], config: RedLensConfig | None = None):
    """What optimize (config given) or audit (None) refuses before any work; returns the pruning stage.

    Reads only the model's config and classes, never its weights: the CLI runs it on a model
    built on the meta device before the weights load."""
    adapter = adapter_for(model)
    # Bad input before any planning: no image tokens is an error whatever the config.
    visual_mask = image_token_mask(model, adapter, example_inputs)
    if config is None:
        return None
    validate_layers(config, adapter.num_layers(model))
    pruning = build_pruning(config, model, adapter)
    if pruning is not None:
        pruning.keep_counts(visual_mask)  # prune_keep above the example's visual count: an error now
        if pruning.after_layer is not None and plan_fixed(config, adapter.num_layers(model)).settings:
            raise ReductionUnavailableError(
                f"prune={config.prune!r} with layers={config.layers!r}: pruning inside the decoder combined with the "
                "per-layer reductions is not part of this build; use layers='auto' (pruning alone when it meets "
                "flops_budget) or prune='codebook'/'random' (before the first layer), which combine"
            )
    return pruning


def audit(model: nn.Module, example_inputs: Mapping[str, Any]) -> AuditReport:
    """FLOPs audit of the unmodified model on `example_inputs`."""
    check_inputs(model, example_inputs)
    captured = capture(model, example_inputs)
    flops = count_graph_flops(captured.graph_module, captured.example)
    return build_report(model, captured, example_inputs, flops, flops)
