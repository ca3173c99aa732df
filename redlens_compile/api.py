"""Public entry points: optimize(model, example_inputs, config) and audit(model, example_inputs).

optimize: capture (and check the graph against eager) -> count FLOPs -> rank layers on the
calibration inputs -> plan to the budget -> run the passes -> count again -> report.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .analysis.budget import (ReductionPlan, drop_unpaying, needs_ranking, paying_costs, plan_fixed, plan_to_budget,
                              settings_ladder, validate_layers)
from .analysis.flops import count_graph_flops, merge_flops
from .analysis.ranking import SENSITIVITY_METRICS, LayerRanking, activation_scores, sensitivity_scores
from .artifact.layered_decode import unserved_reason
from .artifact.optimized_model import OptimizedModel
from .capture.decoder_inputs import DecoderInputs, capture_decoder_inputs, image_token_mask
from .capture.families import adapter_for
from .capture.pipeline import CapturedDecoder, capture, capture_split, check_capture
from .config import RedLensConfig
from .errors import ConfigError, ReductionUnavailableError
from .passes.infra import run_passes
from .passes.last_query_attention import LastQueryAttentionPass
from .passes.pipeline import apply_plan, build_passes
from .passes.token_pruning import AFTER_LAYER, TokenPruning, visual_grid
from .analysis.codebook_file import Codebook
from .report.audit_report import AuditReport
from .report.build import build_report

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

__all__ = ["audit", "capture", "check_inputs", "optimize"]


def _noop_progress(_: str) -> None:
    pass


def _rank(captured: CapturedDecoder, model: nn.Module, calibration: list[DecoderInputs], config: RedLensConfig,
          layers: list[int], reference, key_bias: bool, engine=None, example_inputs=None) -> LayerRanking:
    if config.ranking in SENSITIVITY_METRICS and engine is not None:
        from .analysis.ray_engine import sensitivity_scores_ray

        ladder, base = settings_ladder(config)
        levels = [ladder[base]] + ([ladder[-1]] if len(ladder) > base + 1 else [])
        scores = sensitivity_scores_ray(engine, model, example_inputs, reference, calibration, layers, levels,
                                        config.probe_tokens, key_bias, config.ranking)
        return LayerRanking(config.ranking, scores[0], scores[1] if len(scores) > 1 else None)
    if config.ranking in SENSITIVITY_METRICS:
        def at(settings):
            def reduce_one(layer: int):
                plan = ReductionPlan(settings={layer: settings})
                return apply_plan(captured.graph_module, plan, config.probe_tokens, copy=True,
                                  key_bias=key_bias).graph_module
            return sensitivity_scores(reference, calibration, layers, reduce_one, config.ranking)

        ladder, base = settings_ladder(config)
        floor = at(ladder[-1]) if len(ladder) > base + 1 else None
        return LayerRanking(config.ranking, at(ladder[base]), floor)
    decoder_layers = list(captured.adapter.language_model(model).layers)
    return LayerRanking(config.ranking, activation_scores(captured.decoder, decoder_layers, calibration, config.ranking))


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
    adapter = adapter_for(model)
    model.eval()
    pruning = check_inputs(model, example_inputs, config)

    progress("running the original model on the example")
    with torch.no_grad():
        reference = model(**example_inputs)
    progress("capturing the decoder graph (torch.export)")
    captured = capture(model, example_inputs)
    check_capture(captured, reference.logits)
    progress("counting FLOPs before the rewrite (fvcore)")
    before = count_graph_flops(captured.graph_module, captured.example)
    if pruning is not None and pruning.after_layer is not None:
        return _optimize_split(model, captured, example_inputs, before, config, pruning, type(reference), progress)
    # The graph runs on the pruned sequence: plan, rank and count the reductions on it.
    pruned = pruning(captured.example) if pruning is not None else None
    example = pruned.inputs if pruned is not None else captured.example
    scoring = float(pruning.scoring_flops(captured.example)) if pruning is not None else 0.0
    key_bias = pruning is not None and pruning.key_bias
    # The unreduced graph the reductions are measured against (with the key-bias input when pruning sets one).
    reference_graph = captured.graph_module if not key_bias else apply_plan(
        captured.graph_module, ReductionPlan(settings={}), config.probe_tokens, copy=True, key_bias=True).graph_module
    unreduced = count_graph_flops(reference_graph, example) if pruned is not None else before

    not_reduced: dict[int, str] = {}  # layer -> why a pass could not rewrite it, from the trials

    def plan_costs(plan: ReductionPlan) -> dict[int, float]:
        trial = apply_plan(captured.graph_module, plan, config.probe_tokens, copy=True, key_bias=key_bias)
        not_reduced.update(trial.skipped)
        counted = count_graph_flops(trial.graph_module, example)
        return {i: counted.layer_total(i) for i in before.layers}

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
                              not_reduced=not_reduced)
    else:
        plan = plan_fixed(config, adapter.num_layers(model))
    # Reductions that save no FLOPs on this example (or that a pass cannot apply) are taken off.
    plan, unpaid = drop_unpaying(plan, plan_costs, layers_unreduced, not_reduced)

    progress("running passes")
    # Reduced work runs in thinner GEMMs than the original's: lower them (identity stays the family's ops).
    reduces = bool(plan.settings) or pruned is not None
    result = apply_plan(captured.graph_module, plan, config.probe_tokens, key_bias=key_bias, thin_linear=reduces)
    progress("counting FLOPs after the rewrite")
    after = count_graph_flops(result.graph_module, example)
    notes = _probe_note(config, example, plan) + unpaid
    notes += [f"layer {i}: hollow attention used the masked fallback ({why}); it saves no work there"
              for i, why in sorted(result.fallback.items())]
    notes += [f"layer {i}: not reduced: {why}" for i, why in sorted(result.skipped.items())]
    hollow = [i for i, s in sorted(plan.settings.items()) if s.hollow]
    if key_bias and hollow:
        notes.append(f"layers {hollow}: hollow attention reads the family's mask without the proportional-attention "
                     "key bias of token pruning")
    if isinstance(config.layers, dict):
        notes.append(f"per-layer settings given by the config (a saved plan): layers {sorted(plan.settings)} applied "
                     "with no ranking and no planning")
    elif config.layers != "auto" and plan.settings and config.flops_budget < 1.0:
        notes.append(f"layers={config.layers!r} given explicitly: flops_budget={config.flops_budget} was not applied")
    pruning_summary = None
    if pruned is not None:
        pruning_summary = dict(pruning.describe(), scoring_flops=scoring,
                               visual_before=pruned.visual_before.tolist(), visual_after=pruned.visual_after.tolist(),
                               seq_len_before=captured.example.seq_len, seq_len_after=example.seq_len,
                               kept_rows=example.attention_mask.sum(dim=1).tolist())
    report = build_report(model, captured, example_inputs, before, after, config, plan, result.records, ranking, notes,
                          pruning=pruning_summary)
    if config.layers != "auto" and report.flops_ratio > config.flops_budget:
        logger.warning("decoder FLOPs ratio %.3f is above flops_budget %.3f: layers were given explicitly",
                       report.flops_ratio, config.flops_budget)
    opt = OptimizedModel(model, adapter, result.graph_module, report, config, output_cls=type(reference),
                         pruning=pruning)
    opt.example_inputs = example_inputs  # what export_onnx traces by default
    opt.rebuild = dict(plan=plan, key_bias=key_bias, thin_linear=reduces)  # export_onnx in another dtype reapplies it
    return opt


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


def _optimize_split(model: nn.Module, captured: CapturedDecoder, example_inputs: Mapping[str, Any], before,
                    config: RedLensConfig, pruning: TokenPruning, output_cls: type, progress: Progress) -> OptimizedModel:
    """Pruning after layer K (fastv, vtw): the decoder as two graphs with the pruning stage between them."""
    layer = pruning.layer
    progress(f"capturing the decoder as two graphs, cut after layer {layer}")
    head, tail = capture_split(captured, model, layer)
    cleanup = build_passes(ReductionPlan(settings={}), config.probe_tokens, thin_linear=True)
    head_passes = cleanup[:1] + ([LastQueryAttentionPass(layer)] if pruning.method == "fastv" else []) + cleanup[1:]
    head, head_records = run_passes(head, head_passes)
    tail, tail_records = run_passes(tail, cleanup)
    opt = OptimizedModel(model, captured.adapter, head, None, config, output_cls, pruning=pruning, tail_graph_module=tail)
    opt.example_inputs = example_inputs

    progress("counting FLOPs after the rewrite")
    example = captured.example
    with torch.no_grad():
        prefill = opt.run_decoder(example)
    after = merge_flops(count_graph_flops(head, example), count_graph_flops(tail, prefill.ran_on))
    layers_before = sum(before.layer_total(i) for i in before.layers)
    ratio = sum(after.layer_total(i) for i in after.layers) / layers_before
    if config.flops_budget < 1.0 and ratio > config.flops_budget:
        raise ReductionUnavailableError(
            f"prune={pruning.method!r} after layer {layer} brings the decoder FLOPs ratio to {ratio:.4f}, above "
            f"flops_budget={config.flops_budget}; combining pruning inside the decoder with the per-layer reductions "
            f"is not part of this build: raise flops_budget to >= {ratio:.3f}, prune earlier or keep fewer tokens"
        )
    visual_before = example.visual_mask.sum(dim=1)
    summary = dict(pruning.describe(), scoring_flops=0.0, visual_before=visual_before.tolist(),
                   visual_after=prefill.ran_on.visual_mask.sum(dim=1).tolist(), seq_len_before=example.seq_len,
                   seq_len_after=prefill.ran_on.seq_len, kept_rows=prefill.ran_on.attention_mask.sum(dim=1).tolist())
    notes = [f"layers 0..{layer} run on every row; layers {layer + 1}.. and their KV cache on the kept rows; "
             "decode steps run layer by layer with a mask per layer"]
    opt.report = build_report(model, captured, example_inputs, before, after, config, ReductionPlan(settings={}),
                              head_records + tail_records, None, notes, pruning=summary)
    return opt


def _refuse_layered_decode(model: nn.Module, adapter, what: str, instead: str) -> None:
    """Decode steps the project runs layer by layer (artifact/layered_decode.py) serve full-attention
    and sliding-window layers (each takes its own cache's rows); other decoders are refused."""
    why = unserved_reason(model, adapter)
    if why is not None:
        raise ReductionUnavailableError(f"{what}: the decode steps it needs run layer by layer with one mask per layer, "
                                        f"and {why}; {instead}")


def build_pruning(config: RedLensConfig, model: nn.Module, adapter) -> TokenPruning | None:
    """The token pruning stage the config asks for, checked against the model before any work."""
    if config.prune is None:
        return None
    num_layers = adapter.num_layers(model)
    if config.prune in AFTER_LAYER:
        if config.prune_layer >= num_layers - 1:
            where = "beyond the last decoder layer" if config.prune_layer >= num_layers else "the last decoder layer"
            raise ConfigError(f"prune_layer={config.prune_layer} is {where}: the decoder has {num_layers} layers and "
                              f"{config.prune!r} prunes after layer K for the layers after it (valid: 0..{num_layers - 2})")
        _refuse_layered_decode(model, adapter, f"prune={config.prune!r} (pruning inside the decoder)",
                               "use prune='codebook' or 'random' (before the first layer)")
        return TokenPruning(config.prune, config.prune_keep, layer=config.prune_layer)
    if config.prune_proportional:
        _refuse_layered_decode(model, adapter, "prune_proportional=True (a key bias in every layer)",
                               "set prune_proportional=False (presets: the '-plain' ones)")
    if config.prune == "random":
        return TokenPruning("random", config.prune_keep, seed=config.prune_seed, proportional=config.prune_proportional)
    if config.prune in ("downsample", "diverse"):
        grid = visual_grid(model.config) if config.prune == "downsample" else None
        return TokenPruning(config.prune, config.prune_keep, proportional=config.prune_proportional, grid=grid)
    codebook = Codebook.load(config.codebook)
    text_config = adapter.language_model(model).config
    codebook.check_compatible(model.config.model_type, text_config.hidden_size, path=f"codebook {config.codebook}")
    return TokenPruning.from_codebook(codebook, config.prune_keep, proportional=config.prune_proportional)


def audit(model: nn.Module, example_inputs: Mapping[str, Any]) -> AuditReport:
    """FLOPs audit of the unmodified model on `example_inputs`."""
    check_inputs(model, example_inputs)
    captured = capture(model, example_inputs)
    flops = count_graph_flops(captured.graph_module, captured.example)
    return build_report(model, captured, example_inputs, flops, flops)
