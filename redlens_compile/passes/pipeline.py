"""The pass pipeline for a reduction plan: cleanups around the reduction passes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..analysis.budget import ReductionPlan
from ..config import DEFAULT_PROBE_RULE
from .causal_fast_path import CausalFastPathPass
from .dead_code import DeadCodeEliminationPass
from .dynamic_ffn import DynamicFFNPass
from .hollow_attention import HollowAttentionPass
from .infra import PassRecord, RedLensPass, run_passes
from .key_bias import KeyBiasPass
from .selectors import clone_graph_module
from .strip_asserts import StripAssertsPass
from .thin_linear import ThinLinearPass


@dataclass
class PipelineResult:
    graph_module: fx.GraphModule
    records: list[PassRecord]
    fallback: dict[int, str] = field(default_factory=dict)  # layer -> why hollow attention used the mask
    skipped: dict[int, str] = field(default_factory=dict)  # layer -> why a reduction could not be applied


def build_passes(plan: ReductionPlan, probe_tokens: int | float, key_bias: bool = False,
                 thin_linear: bool = False, probe_rule: str = DEFAULT_PROBE_RULE) -> list[RedLensPass]:
    """Strip asserts, the reductions the plan asks for, the key-bias input (proportional attention
    after pruning), the causal fast path, the thin-linear lowering (where the graph runs reduced
    work), dead-code elimination."""
    passes: list[RedLensPass] = [StripAssertsPass()]
    keep = {i: s.ffn_keep for i, s in plan.settings.items() if s.reduces_ffn}
    window = {i: s.window for i, s in plan.settings.items() if s.hollow}
    if keep:
        passes.append(DynamicFFNPass(keep=keep, probe_tokens=probe_tokens, probe_rule=probe_rule))
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
               probe_rule: str = DEFAULT_PROBE_RULE) -> PipelineResult:
    """Run the plan's passes (on a copy sharing the weights when `copy`, e.g. for ranking trials)."""
    if copy:
        graph_module = clone_graph_module(graph_module)
    passes = build_passes(plan, probe_tokens, key_bias, thin_linear, probe_rule)
    graph_module, records = run_passes(graph_module, passes)
    result = PipelineResult(graph_module, records)
    for p in passes:
        if isinstance(p, HollowAttentionPass):
            result.fallback.update(p.fallback)
        if isinstance(p, (HollowAttentionPass, DynamicFFNPass)):
            result.skipped.update(p.skipped)
    return result
