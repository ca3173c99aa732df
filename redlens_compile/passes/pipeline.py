"""The pass pipeline for a reduction plan: cleanups around the reduction passes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..analysis.budget import ReductionPlan
from .causal_fast_path import CausalFastPathPass
from .dead_code import DeadCodeEliminationPass
from .dynamic_ffn import DynamicFFNPass
from .hollow_attention import HollowAttentionPass
from .infra import PassRecord, RedLensPass, merged_findings, run_passes
from .key_bias import KeyBiasPass
from .last_query_attention import LastQueryAttentionPass
from .selectors import clone_graph_module
from .strip_asserts import StripAssertsPass
from .thin_linear import ThinLinearPass


@dataclass
class PipelineResult:
    graph_module: fx.GraphModule
    records: list[PassRecord]
    fallback: dict[int, str] = field(default_factory=dict)  # layer -> why hollow attention used the mask
    skipped: dict[int, str] = field(default_factory=dict)  # layer -> why a reduction could not be applied
    key_bias_layers: list[int] = field(default_factory=list)  # the layers whose attention takes the key bias

    @classmethod
    def of(cls, graph_module: fx.GraphModule, records: list[PassRecord]) -> "PipelineResult":
        """The run's graph with what its passes found, read from their results (records' findings)."""
        return cls(graph_module, records, merged_findings(records, "fallback"), merged_findings(records, "skipped"),
                   sorted({i for r in records for i in r.findings.get("key_bias_layers", ())}))


def build_passes(plan: ReductionPlan, probe_tokens: int | float, key_bias: bool = False,
                 thin_linear: bool = False, last_query_layer: int | None = None) -> list[RedLensPass]:
    """Strip asserts, the reductions the plan asks for, layer K's last-query attention as an extra
    output (FastV's signal, `last_query_layer`), the key-bias input (proportional attention after
    pruning), the causal fast path, the thin-linear lowering (where the graph runs reduced work),
    dead-code elimination. The order is the passes' declared one (runs_after), checked by run_passes."""
    passes: list[RedLensPass] = [StripAssertsPass()]
    keep = {i: s.ffn_keep for i, s in plan.settings.items() if s.reduces_ffn}
    window = {i: s.window for i, s in plan.settings.items() if s.hollow}
    if last_query_layer is not None:
        passes.append(LastQueryAttentionPass(last_query_layer))
    if keep:
        passes.append(DynamicFFNPass(keep=keep, probe_tokens=probe_tokens))
    if window:
        passes.append(HollowAttentionPass(window=window))
    if key_bias:
        passes.append(KeyBiasPass())
    passes.append(CausalFastPathPass())
    if thin_linear:
        passes.append(ThinLinearPass())
    passes.append(DeadCodeEliminationPass())
    return passes


def apply_plan(graph_module: fx.GraphModule, plan: ReductionPlan, probe_tokens: int | float,
               copy: bool = False, key_bias: bool = False, thin_linear: bool = False,
               last_query_layer: int | None = None) -> PipelineResult:
    """Run the plan's passes (on a copy sharing the weights when `copy`, e.g. for ranking trials)."""
    if copy:
        graph_module = clone_graph_module(graph_module)
    passes = build_passes(plan, probe_tokens, key_bias, thin_linear, last_query_layer)
    graph_module, records = run_passes(graph_module, passes)
    return PipelineResult.of(graph_module, records)
