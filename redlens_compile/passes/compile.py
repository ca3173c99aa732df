"""The compile step, last of the passes stage: a plan's passes on the captured decoder, handed on
as one CompiledDecoder.

What the artifact (OptimizedModel) and the exporters need of the compiled decoder travels here as
fields, not as graph_module.meta keys: the graphs, the pruning stage between or before them, the
layers whose attention takes the pruning's key bias, the sequence range the graph serves, and
what the passes did and found. Every pass has run when it is returned (generate's last-position
prefill graph included): nothing downstream runs a pass but the exporter's ONNX lowering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..analysis.budget import ReductionPlan
from ..capture.pipeline import CapturedDecoder, SplitDecoder
from ..errors import ReductionUnavailableError
from ..runtime.token_pruning import TokenPruning
from .infra import PassRecord, run_passes
from .last_position_logits import LastPositionLogitsPass
from .pipeline import PipelineResult, apply_plan
from .selectors import clone_graph_module


@dataclass
class CompiledDecoder:
    """The rewritten decoder as the later stages take it."""

    graph_module: fx.GraphModule  # the prefill graph (layers 0..K when pruning after layer K)
    prefill_graph: fx.GraphModule  # generate's prefill: the last graph, logits for the last position only
    tail_graph_module: fx.GraphModule | None  # layers K+1.. and the lm_head (pruning after layer K), else None
    pruning: TokenPruning | None  # the runtime pruning stage before the graph or between the two
    key_bias_layers: tuple[int, ...]  # layers whose attention takes the pruning's key bias
    seq_range: tuple[int, int | None]  # (shortest, longest) sequence the prefill graph serves
    records: list[PassRecord]  # what each pass did (the audit report's passes)
    plan: ReductionPlan  # the plan compiled (re-applied to rebuild in another dtype)
    probe_tokens: int | float
    fallback: dict[int, str] = field(default_factory=dict)  # layer -> why hollow attention used the masked fallback
    skipped: dict[int, str] = field(default_factory=dict)  # layer -> why a pass could not reduce it
    notes: list[str] = field(default_factory=list)  # the report's notes on the compiled structure

    @property
    def split_layer(self) -> int | None:
        """K when the decoder runs as two graphs with the pruning stage after layer K."""
        return self.pruning.layer if self.tail_graph_module is not None else None

    @property
    def key_bias(self) -> bool:
        """The prefill graph takes a `key_bias` input (proportional attention after pruning)."""
        return self.pruning is not None and self.pruning.key_bias


def compile_decoder(captured: CapturedDecoder, plan: ReductionPlan, probe_tokens: int | float,
                    pruning: TokenPruning | None = None, split: SplitDecoder | None = None) -> CompiledDecoder:
    """Run `plan`'s passes on the captured decoder (or, pruning after layer K, the cleanups on the two
    graphs of `split`, the head returning layer K's last-query attention for fastv) and return
    the CompiledDecoder. The rewrite is in place: the captured graphs are consumed."""
    key_bias = pruning is not None and pruning.key_bias
    if split is None:
        # Reduced work runs in thinner GEMMs than the original's: lower them (identity stays the family's ops).
        reduces = bool(plan.settings) or pruning is not None
        result = apply_plan(captured.graph_module, plan, probe_tokens, key_bias=key_bias, thin_linear=reduces)
        graph, tail, seq_range, records = result.graph_module, None, captured.seq_range, result.records
        notes = []
    else:
        if plan.settings:
            raise ReductionUnavailableError(
                f"per-layer reductions on layers {sorted(plan.settings)} with pruning after layer {split.layer}: "
                "combining them is not part of this build (api.check_inputs refuses such a config); prune before the "
                "first layer or drop the per-layer settings")
        fastv = pruning is not None and pruning.method == "fastv"
        head = apply_plan(split.head, plan, probe_tokens, thin_linear=True,
                          last_query_layer=split.layer if fastv else None)
        after = apply_plan(split.tail, plan, probe_tokens, thin_linear=True)
        result = PipelineResult.of(after.graph_module, head.records + after.records)
        graph, tail, seq_range, records = head.graph_module, after.graph_module, split.seq_range, result.records
        notes = [f"layers 0..{split.layer} run on every row; layers {split.layer + 1}.. and their KV cache on the "
                 "kept rows; decode steps run layer by layer with a mask per layer"]
    notes += [f"layer {i}: hollow attention used the masked fallback ({why}); it saves no work there"
              for i, why in sorted(result.fallback.items())]
    notes += [f"layer {i}: not reduced: {why}" for i, why in sorted(result.skipped.items())]
    # generate's prefill: the same graph (same weights) with logits for the last position only.
    prefill_graph, _ = run_passes(clone_graph_module(tail if tail is not None else graph), [LastPositionLogitsPass()])
    return CompiledDecoder(graph, prefill_graph, tail, pruning, tuple(result.key_bias_layers), seq_range, records,
                           plan, probe_tokens, dict(result.fallback), dict(result.skipped), notes)
