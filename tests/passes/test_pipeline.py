"""The pass pipeline for a plan: which passes run, and trial copies leave the captured graph alone."""

import torch

from redlens_compile.analysis.budget import LayerSettings, ReductionPlan
from redlens_compile.config import UNBOUNDED_WINDOW
from redlens_compile.passes import apply_plan, build_passes


def test_build_passes_follows_the_plan():
    names = lambda plan: [p.name for p in build_passes(plan, 0.1)]  # noqa: E731
    assert names(ReductionPlan({})) == ["StripAssertsPass", "CausalFastPathPass", "DeadCodeEliminationPass"]
    hollow_only = ReductionPlan({1: LayerSettings(ffn_keep=1.0, window=16)})
    assert names(hollow_only) == ["StripAssertsPass", "HollowAttentionPass", "CausalFastPathPass",
                                  "DeadCodeEliminationPass"]
    ffn_only = ReductionPlan({0: LayerSettings(ffn_keep=0.5, window=UNBOUNDED_WINDOW)})
    assert "DynamicFFNPass" in names(ffn_only) and "HollowAttentionPass" not in names(ffn_only)
    lowered = [p.name for p in build_passes(ffn_only, 0.1, thin_linear=True)]
    assert lowered[-3:] == ["CausalFastPathPass", "ThinLinearPass", "DeadCodeEliminationPass"]


def test_trial_copy_leaves_the_captured_graph_unchanged(captured_family):
    _, _, captured = captured_family("llava")
    before = [(n.name, n.target) for n in captured.graph_module.graph.nodes]
    trial = apply_plan(captured.graph_module, ReductionPlan({0: LayerSettings(0.25, 4)}), 0.1, copy=True)
    assert [(n.name, n.target) for n in captured.graph_module.graph.nodes] == before
    assert trial.graph_module is not captured.graph_module
    weights = dict(captured.graph_module.named_parameters())
    assert all(p is weights[name] for name, p in trial.graph_module.named_parameters())  # shared, not copied
    with torch.no_grad():
        out = trial.graph_module(*captured.example.as_args())[0]
    assert torch.isfinite(out).all()
