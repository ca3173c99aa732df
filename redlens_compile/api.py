"""Public entry points: optimize(model, example_inputs, config) and audit(model, example_inputs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn

from .analysis.budget import ReductionPlan, plan_reductions
from .analysis.flops import GROUPS, GraphFlops, count_eager_decoder_flops, count_graph_flops, count_vision_flops
from .artifact.optimized_model import OptimizedModel
from .capture.annotate import annotate_graph
from .capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from .capture.decoder_module import DecoderWithHead
from .capture.export import export_decoder
from .capture.families import FamilyAdapter, adapter_for
from .config import RedLensConfig
from .errors import CaptureError, ConfigError
from .passes.dead_code import DeadCodeEliminationPass
from .passes.infra import PassRecord, RedLensPass, run_passes
from .passes.strip_asserts import StripAssertsPass
from .report.audit_report import AuditReport

logger = logging.getLogger(__name__)

# Max abs logit difference between the captured graph and the eager model on the example.
CAPTURE_TOLERANCE = 1e-4

Progress = Callable[[str], None]


@dataclass
class CapturedDecoder:
    adapter: FamilyAdapter
    decoder: DecoderWithHead
    example: DecoderInputs
    graph_module: fx.GraphModule


def _noop_progress(_: str) -> None:
    pass


def capture(model: nn.Module, example_inputs: Mapping[str, Any]) -> CapturedDecoder:
    """Split `model`, export its decoder with dynamic batch/sequence and annotate the graph."""
    adapter = adapter_for(model)
    model.eval()
    example = capture_decoder_inputs(model, adapter, example_inputs)
    decoder = DecoderWithHead(adapter.language_model(model), adapter.lm_head(model)).eval()
    text_config = adapter.language_model(model).config
    max_len = int(getattr(text_config, "max_position_embeddings", 4096) or 4096)
    program = export_decoder(decoder, example, max_seq_len=max_len)
    graph_module = program.module()
    annotate_graph(graph_module)
    return CapturedDecoder(adapter, decoder, example, graph_module)


def build_passes(config: RedLensConfig, plan: ReductionPlan) -> list[RedLensPass]:
    """The pass pipeline for a plan; reduction passes slot in between the two cleanups."""
    return [StripAssertsPass(), DeadCodeEliminationPass()]


def _model_summary(model: nn.Module, adapter: FamilyAdapter) -> dict[str, Any]:
    text = adapter.language_model(model).config
    return {
        "class": type(model).__name__,
        "family": adapter.name,
        "num_layers": adapter.num_layers(model),
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "vocab_size": text.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _inputs_summary(example: DecoderInputs) -> dict[str, Any]:
    visual = int(example.visual_mask.sum())
    total = example.batch_size * example.seq_len
    return {"batch": example.batch_size, "seq_len": example.seq_len, "visual_tokens": visual, "text_tokens": total - visual}


def _empty_groups() -> dict[str, dict[str, float]]:
    return {g: {"visual": 0.0, "text": 0.0} for g in GROUPS}


def build_report(
    model: nn.Module,
    captured: CapturedDecoder,
    example_inputs: Mapping[str, Any],
    before: GraphFlops,
    after: GraphFlops,
    config: RedLensConfig | None,
    plan: ReductionPlan | None,
    records: list[PassRecord],
) -> AuditReport:
    num_layers = captured.adapter.num_layers(model)
    layers = [
        {
            "layer": i,
            "before": before.layers.get(i, _empty_groups()),
            "after": after.layers.get(i, _empty_groups()),
            "reduced": bool(plan and plan.reductions_change_numbers and i in plan.layers),
        }
        for i in range(num_layers)
    ]
    vision = count_vision_flops(model, captured.adapter, example_inputs)
    eager_total = count_eager_decoder_flops(captured.decoder, captured.example)
    notes = []
    if abs(eager_total - before.total) > 1e-6 * max(1.0, eager_total):
        notes.append(f"graph count {before.total:.6g} differs from fvcore on the eager decoder {eager_total:.6g}")
    return AuditReport(
        model=_model_summary(model, captured.adapter),
        inputs=_inputs_summary(captured.example),
        layers=layers,
        components={
            "vision_tower": vision.vision_tower,
            "projector": vision.projector,
            "vision_note": vision.note,
            "lm_head_before": before.lm_head,
            "lm_head_after": after.lm_head,
            "other_before": before.other,
            "other_after": after.other,
        },
        totals={
            "decoder_prefill_before": before.total,
            "decoder_prefill_after": after.total,
            "decoder_prefill_ratio": after.total / before.total if before.total else 1.0,
            "eager_fvcore_decoder": eager_total,
            "decoder_visual_before": sum(before.layer_total(i, "visual") for i in before.layers),
            "decoder_text_before": sum(before.layer_total(i, "text") for i in before.layers),
        },
        config=config.to_dict() if config is not None else None,
        passes=[r.to_dict() for r in records],
        chosen_layers=list(plan.layers) if plan and plan.reductions_change_numbers else [],
        notes=notes,
    )


def _check_capture(graph_module: fx.GraphModule, example: DecoderInputs, reference_logits: torch.Tensor) -> None:
    """Never a silent wrong answer: the captured graph must reproduce the eager logits."""
    with torch.no_grad():
        logits = graph_module(*example.as_args())[0]
    diff = (logits - reference_logits).abs().max().item()
    if not diff <= CAPTURE_TOLERANCE:
        raise CaptureError(
            f"the captured decoder graph differs from the eager model on the example (max abs logit diff "
            f"{diff:.3g} > {CAPTURE_TOLERANCE}); please report this model and transformers version"
        )


def optimize(
    model: nn.Module,
    example_inputs: Mapping[str, Any],
    config: RedLensConfig | None = None,
    calibration: list[Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
) -> OptimizedModel:
    """Capture `model`'s decoder, rewrite it per `config` and return the optimized model."""
    progress = progress or _noop_progress
    config = RedLensConfig() if config is None else config
    if not isinstance(config, RedLensConfig):
        raise ConfigError(f"config must be a RedLensConfig, got {type(config).__name__}")
    adapter = adapter_for(model)
    plan = plan_reductions(config, adapter.num_layers(model))

    progress("running the original model on the example")
    model.eval()
    with torch.no_grad():
        reference = model(**example_inputs)
    progress("capturing the decoder graph (torch.export)")
    captured = capture(model, example_inputs)
    progress("counting FLOPs before the rewrite (fvcore)")
    before = count_graph_flops(captured.graph_module, captured.example)
    progress("running passes")
    graph_module, records = run_passes(captured.graph_module, build_passes(config, plan))
    if not plan.reductions_change_numbers:
        _check_capture(graph_module, captured.example, reference.logits)
    progress("counting FLOPs after the rewrite")
    after = count_graph_flops(graph_module, captured.example)
    report = build_report(model, captured, example_inputs, before, after, config, plan, records)
    return OptimizedModel(model, adapter, graph_module, report, config, output_cls=type(reference))


def audit(model: nn.Module, example_inputs: Mapping[str, Any]) -> AuditReport:
    """FLOPs audit of the unmodified model on `example_inputs`."""
    captured = capture(model, example_inputs)
    flops = count_graph_flops(captured.graph_module, captured.example)
    return build_report(model, captured, example_inputs, flops, flops, None, None, [])
