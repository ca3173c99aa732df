"""build_report(): the AuditReport of one optimization (or of the unmodified model)."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..analysis.budget import ReductionPlan
from ..analysis.flops import GROUPS, GraphFlops, count_eager_decoder_flops, count_vision_flops
from ..analysis.ranking import LayerRanking
from ..capture.decoder_inputs import DecoderInputs
from ..capture.families import FamilyAdapter
from ..capture.pipeline import CapturedDecoder
from ..config import RedLensConfig
from .audit_report import AuditReport


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


def decoder_layers_total(flops: GraphFlops, kind: str | None = None) -> float:
    """FLOPs of the decoder layers (what flops_budget bounds): lm_head and the rest apart."""
    return sum(flops.layer_total(i, kind) for i in flops.layers)


def build_report(
    model: nn.Module,
    captured: CapturedDecoder,
    example_inputs: Mapping[str, Any],
    before: GraphFlops,
    after: GraphFlops,
    config: RedLensConfig | None = None,
    plan: ReductionPlan | None = None,
    records: list | None = None,
    ranking: LayerRanking | None = None,
    notes: list[str] | None = None,
    pruning: dict[str, Any] | None = None,
) -> AuditReport:
    num_layers = captured.adapter.num_layers(model)
    settings = plan.settings if plan is not None else {}
    layers = [
        {
            "layer": i,
            "before": before.layers.get(i, _empty_groups()),
            "after": after.layers.get(i, _empty_groups()),
            "reduced": i in settings,
            "settings": settings[i].to_dict() if i in settings else None,
        }
        for i in range(num_layers)
    ]
    vision = count_vision_flops(model, captured.adapter, example_inputs)
    eager_total = count_eager_decoder_flops(captured.decoder, captured.example)
    notes = list(notes or [])
    if abs(eager_total - before.total) > 1e-6 * max(1.0, eager_total):
        notes.append(f"graph count {before.total:.6g} differs from fvcore on the eager decoder {eager_total:.6g}")
    # The pruning scores are prefill work the reduced decoder does in place of the dropped rows.
    scoring = float(pruning["scoring_flops"]) if pruning else 0.0
    layers_before, layers_after = decoder_layers_total(before), decoder_layers_total(after) + scoring
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
            "token_pruning_scoring": scoring,
        },
        totals={
            "decoder_prefill_before": layers_before,
            "decoder_prefill_after": layers_after,
            "decoder_prefill_ratio": layers_after / layers_before if layers_before else 1.0,
            "graph_total_before": before.total,
            "graph_total_after": after.total,
            "eager_fvcore_decoder": eager_total,
            "decoder_visual_before": decoder_layers_total(before, "visual"),
            "decoder_text_before": decoder_layers_total(before, "text"),
            "decoder_visual_after": decoder_layers_total(after, "visual"),
            "decoder_text_after": decoder_layers_total(after, "text"),
        },
        config=config.to_dict() if config is not None else None,
        passes=[r.to_dict() for r in (records or [])],
        ranking=ranking.to_dict() if ranking is not None else {},
        plan=plan.to_dict() if plan is not None else {},
        chosen_layers=list(plan.layers) if plan is not None else [],
        notes=notes,
        pruning=pruning,
    )
