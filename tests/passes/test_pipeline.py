"""The pass pipeline for a plan: which passes run, and trial copies leave the captured graph alone."""

import math

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


def test_trial_copy_leaves_the_captured_graph_unchanged_and_runs_the_plan(captured_family):
    model, _, captured = captured_family("llava")
    before = [(n.name, n.target) for n in captured.graph_module.graph.nodes]
    # the stride probe rule: the reference below writes it out (the other rules: test_probe_rules.py)
    trial = apply_plan(captured.graph_module, ReductionPlan({0: LayerSettings(0.25, 4)}), 0.1, copy=True,
                       probe_rule="stride")
    assert [(n.name, n.target) for n in captured.graph_module.graph.nodes] == before
    assert trial.graph_module is not captured.graph_module
    weights = dict(captured.graph_module.named_parameters())
    assert all(p is weights[name] for name, p in trial.graph_module.named_parameters())  # shared, not copied
    with torch.no_grad():
        out = trial.graph_module(*captured.example.as_args())[0]
        want = reduced_layer_reference(model, captured, layer=0, ffn_keep=0.25, window=4, probes=0.1)
        unreduced = captured.decoder(*captured.example.as_args())[0]
    assert (want - unreduced).abs().max() > 1e-3  # the reduction moves the logits: the comparison below means something
    assert (out - want).abs().max() <= 1e-4


def reduced_layer_reference(model, captured, layer: int, ffn_keep: float, window: int, probes: float) -> torch.Tensor:
    """The eager decoder with one layer reduced as ops/dynamic_ffn.py and ops/hollow_attention.py
    describe it, written here from scratch (hooks on the family's own modules): the hollow mask on its attention (a visual query sees
    text keys as before and visual keys less than `window` rows away), and on its FFN, per sample,
    ceil(probes * visual rows) probe rows at a fixed stride, the ceil(ffn_keep * F) channels of
    largest summed |act(gate) * up| over them, and every visual row through those channels only."""
    inputs = captured.example
    visual = inputs.visual_mask.bool()
    seq = visual.shape[1]
    index = torch.arange(seq)
    causal = (index[None, :] <= index[:, None])[None, None] & inputs.attention_mask.bool()[:, None, None, :]
    far = (index[None, :] - index[:, None]).abs() >= window
    hollow = causal & ~(visual[:, None, :, None] & visual[:, None, None, :] & far)
    block = captured.adapter.language_model(model).layers[layer]

    def masked(_module, args, kwargs):
        return args, dict(kwargs, attention_mask=hollow)

    def ffn(mlp, args, out):
        x = args[0]
        acts = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [B, S, F], the full width
        width = acts.shape[-1]
        keep = math.ceil(ffn_keep * width)
        out = out.clone()
        for b in range(x.shape[0]):
            rows = torch.nonzero(visual[b]).flatten()
            count = rows.numel()
            m = max(1, min(count, math.ceil(probes * count)))
            probe = rows[[j * count // m for j in range(m)]]
            channels = acts[b, probe].abs().sum(0).topk(keep).indices
            out[b, rows] = acts[b, rows][:, channels] @ mlp.down_proj.weight[:, channels].T
        return out

    hooks = [block.self_attn.register_forward_pre_hook(masked, with_kwargs=True), block.mlp.register_forward_hook(ffn)]
    try:
        return captured.decoder(*inputs.as_args())[0]
    finally:
        for hook in hooks:
            hook.remove()
