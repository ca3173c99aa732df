"""The dynamic FFN on a fused gate-up FFN (GLM-4V's gate_up_proj: one [2F, D] linear whose output the
graph chunks into gate and up): recognised from the graph, equal to a naive sliced reference, exact at
ffn_keep=1.0, counted by its closed form; an FFN the pass cannot read is named, and costs nothing."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from tiny_families import build_and_reload, ffn_output, make_inputs

import redlens_compile as rc
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.ops.dynamic_ffn import batched_matmul
from redlens_compile.passes import DeadCodeEliminationPass, DynamicFFNPass, StripAssertsPass, run_passes
from redlens_compile.passes.dynamic_ffn import kept_channels
from redlens_compile.passes.selectors import clone_graph_module, ffn_of_layer

TOL = 1e-5
FAMILY = "glm4v"


@pytest.fixture(scope="module")
def glm(family_models):
    model = family_models(FAMILY)
    example = make_inputs(FAMILY, model)
    return model, example, rc.capture_decoder(model, example)


def reduce_all(captured, keep, probes=0.25, rule="stride"):
    layers = len(captured.decoder.language_model.layers)
    passes = [StripAssertsPass(), DynamicFFNPass(keep={i: keep for i in range(layers)}, probe_tokens=probes,
                                                  probe_rule=rule),
              DeadCodeEliminationPass()]
    gm, records = run_passes(clone_graph_module(captured.graph_module), passes)
    return gm, records, passes[1], layers


def naive_probe_rows(rows: list[torch.Tensor], probes: float, rule: str) -> list[int]:
    """One sample's probe rows by the rule's definition, a loop over its visual rows: evenly spaced
    (stride), the largest (norm), or the farthest from the sample's mean visual row (outlier)."""
    n = len(rows)
    m = max(1, min(n, math.ceil(probes * n)))
    base = rule.split("+")[0]
    if base == "stride":
        return [j * n // m for j in range(m)]
    mean = sum(rows) / n
    score = [float((r * r).sum()) if base == "norm" else float(((r - mean) ** 2).sum()) for r in rows]
    return sorted(range(n), key=lambda i: -score[i])[:m]


def naive_ffn(mlp, x: torch.Tensor, visual: torch.Tensor, keep: float, probes: float,
              rule: str = "stride") -> torch.Tensor:
    """Row by row: text rows through the whole FFN; each sample's visual rows through the K channels
    its probe rows (by `rule`) activate most (the gate and up row blocks of the fused weight
    sliced at the same channels); with "+route" the probe rows themselves through the whole FFN."""
    w, down = mlp.gate_up_proj.weight, mlp.down_proj.weight
    width = down.shape[1]
    k = kept_channels(keep, width)

    def hidden(row, channels):
        gate = torch.stack([w[c] @ row for c in channels])
        up = torch.stack([w[width + c] @ row for c in channels])
        return F.silu(gate) * up

    out = torch.empty(*x.shape[:2], down.shape[0])
    every = list(range(width))
    for b in range(x.shape[0]):
        rows = [i for i in range(x.shape[1]) if visual[b, i]]
        chosen = [rows[j] for j in naive_probe_rows([x[b, i] for i in rows], probes, rule)]
        score = sum(hidden(x[b, i], every).abs() for i in chosen)
        kept = sorted(torch.topk(score, k).indices.tolist())
        for i in range(x.shape[1]):
            routed = rule.endswith("+route") and i in chosen
            channels = kept if visual[b, i] and not routed else every
            h = hidden(x[b, i], channels)
            out[b, i] = torch.stack([down[d, channels] @ h for d in range(down.shape[0])])
    return out


def test_the_fused_gate_up_is_recognised_from_the_graph(glm):
    _, _, captured = glm
    match, why = ffn_of_layer(captured.graph_module, 1)
    assert match is not None, why
    assert [n.meta["redlens"].role for n in match.up_linears] == ["ffn_other"]  # not named gate/up: read from the split
    assert list(match.fused.values()) == [2] and [n.target for n in match.splits] == [torch.ops.aten.chunk.default]


def ragged_batch(captured, layer: int):
    """Two samples with ragged visual counts, the layer's FFN and a random FFN input for them."""
    inputs = captured.example.repeat_batch(2)
    visual = inputs.visual_mask.clone()
    visual[1, -12:-8] = False  # ragged visual counts
    inputs.visual_mask = visual
    mlp = captured.decoder.language_model.layers[layer].mlp
    x = torch.randn(2, inputs.seq_len, mlp.gate_up_proj.in_features, generator=torch.Generator().manual_seed(0))
    return inputs, visual, mlp, x


def reduced_ffn_output(captured, gm, layer: int, inputs, x):
    """The rewritten graph's FFN of `layer` run on x: from its entry node to the rows' merge."""
    match, _ = ffn_of_layer(captured.graph_module, layer)
    entry = next(n for n in gm.graph.nodes if n.name == match.entry.name)
    merged = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "merge_rows"
                  and n.meta["redlens"].layer == layer)
    return ffn_output(gm, entry, merged, x, inputs.as_args())


def test_sliced_fused_ffn_equals_a_naive_reference(glm):
    model, _, captured = glm
    keep, probes, layer = 0.25, 0.25, 1
    gm, records, _, _ = reduce_all(captured, keep, probes)
    assert records[1].modified
    inputs, visual, mlp, x = ragged_batch(captured, layer)
    out = reduced_ffn_output(captured, gm, layer, inputs, x)
    with torch.no_grad():
        want = naive_ffn(mlp, x, visual, keep, probes)
        full = mlp(x)
    assert (out - want).abs().max().item() <= TOL
    assert (out[visual] - full[visual]).abs().max().item() > 1e-3  # the visual rows did change


@pytest.mark.parametrize("rule", ["outlier+route", "norm+route"])
def test_fused_ffn_with_routed_probes_equals_a_naive_reference(glm, rule):
    """The probe rules that pick rows by content and route them to the full FFN, on the fused form:
    against the loop over rows above (probes picked, channels scored, probe rows routed by hand)."""
    model, _, captured = glm
    keep, probes, layer = 0.25, 0.25, 1
    gm, records, _, _ = reduce_all(captured, keep, probes, rule)
    assert records[1].modified
    inputs, visual, mlp, x = ragged_batch(captured, layer)
    obj = int(visual[0].nonzero()[3])
    x[0, obj] *= 8  # one object row in sample 0: both rules pick it as a probe
    out = reduced_ffn_output(captured, gm, layer, inputs, x)
    with torch.no_grad():
        want = naive_ffn(mlp, x, visual, keep, probes, rule)
        full = mlp(x)
    assert (out - want).abs().max().item() <= TOL
    assert (out[0, obj] - full[0, obj]).abs().max().item() <= TOL  # the routed object row is exact
    assert (out[visual] - full[visual]).abs().max().item() > 1e-3  # the other visual rows are reduced


def test_keep_all_channels_is_exact_on_the_fused_form(glm):
    model, _, captured = glm
    gm, records, _, layers = reduce_all(captured, keep=1.0)
    assert records[1].modified
    assert sum(n.target is batched_matmul for n in gm.graph.nodes) == 2 * layers  # fused gate-up and down
    batch = make_inputs(FAMILY, model, text_before=5, text_after=3, batch=2, pad_left=(4,), seed=5)
    for inputs in [captured.example, capture_decoder_inputs(model, captured.adapter, batch)]:
        with torch.no_grad():
            want, got = captured.graph_module(*inputs.as_args()), gm(*inputs.as_args())
        for a, b in zip(got, want):
            assert (a - b).abs().max().item() <= TOL
    _, again = run_passes(gm, [DynamicFFNPass(keep={i: 1.0 for i in range(layers)})])
    assert not again[0].modified


def test_fused_ffn_flops_are_the_closed_form(glm):
    model, example, _ = glm
    keep, probes = 0.5, 0.1
    # the stride rule: the reference below is its closed form (the probe rules have their own: test_probe_rules.py)
    config = rc.RedLensConfig(layers="all", ffn_keep=keep, probe_tokens=probes, probe_rule="stride",
                              hollow_window=2**31 - 1)
    report = rc.optimize(model, example, config=config).report
    cfg = model.config.text_config
    d, f = cfg.hidden_size, cfg.intermediate_size
    n_v = int((example["input_ids"] == model.config.image_token_id).sum())
    n_t = example["input_ids"].numel() - n_v
    k, m = kept_channels(keep, f), math.ceil(probes * n_v)
    assert report.chosen_layers == [0, 1, 2]
    for row in report.layers:
        # sliced + full-width probes + the channels' scores (a multiply-add per probe activation)
        assert row["after"]["ffn"]["visual"] == 3 * n_v * d * k + 2 * m * d * f + m * f
        assert row["after"]["ffn"]["text"] == pytest.approx(3 * n_t * d * f, rel=1e-12)
    assert report.flops_ratio < 1.0


def test_a_budget_of_half_is_planned_and_met_on_the_fused_form(glm):
    model, example, _ = glm
    opt = rc.optimize(model, example, config=rc.RedLensConfig(flops_budget=0.5))
    report = opt.report
    assert report.flops_ratio <= 0.5 + 1e-9
    assert report.plan["predicted_ratio"] == pytest.approx(report.flops_ratio, rel=1e-9)
    assert any(s["ffn_keep"] < 1 for s in report.plan["settings"].values())
    assert not any("not applied" in n or "not reduced" in n for n in report.notes if "dynamic FFN" in n)


def _interleaved_forward(self, x):
    """gate and up interleaved in the fused output (even/odd columns): a cut the pass does not read."""
    h = self.gate_up_proj(x)
    return self.down_proj(h[..., 1::2] * self.activation_fn(h[..., ::2]))


def test_an_ffn_the_pass_cannot_read_is_named_and_costs_nothing(tmp_path):
    model = build_and_reload(FAMILY, tmp_path / "glm", seed=1)
    for layer in model.model.language_model.layers:
        layer.mlp.forward = types.MethodType(_interleaved_forward, layer.mlp)
    example = make_inputs(FAMILY, model)
    with pytest.raises(rc.BudgetUnreachableError) as err:
        # settings at the floors: a short ladder (the error is the same at any settings)
        rc.optimize(model, example, config=rc.RedLensConfig(flops_budget=0.5, ffn_keep=0.0625, hollow_window=8))
    message = str(err.value)
    assert "cannot reduce layers [0, 1, 2]: no FFN of linear up/down projections found" in message
    assert "enable both reductions" not in message  # both are enabled: the FFN's form is the cause
    opt = rc.optimize(model, example, config=rc.RedLensConfig(layers="all"))  # window 64 cannot pay here either
    assert opt.report.flops_ratio <= 1.0 and opt.report.chosen_layers == []
    assert sum("dynamic FFN (ffn_keep 0.5) not applied: no FFN" in n for n in opt.report.notes) == 3
    with torch.no_grad():
        assert (opt(**example).logits - model(**example).logits).abs().max().item() <= TOL
