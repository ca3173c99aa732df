"""Layer ranking: each metric against an independent computation or a structural fact."""

import math

import pytest
import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.analysis.ranking import activation_scores, divergence, sensitivity_scores
from redlens_compile.analysis.budget import LayerSettings, ReductionPlan
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.passes import apply_plan


def test_divergences_of_known_distributions():
    p = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    assert divergence(p, p, "jsd") == pytest.approx(0.0, abs=1e-12)
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert divergence(p, q, "kl") == pytest.approx(kl, rel=1e-9)
    m = [0.7, 0.3]
    jsd = 0.5 * sum(a * math.log(a / b) for a, b in zip([0.5, 0.5], m)) + \
        0.5 * sum(a * math.log(a / b) for a, b in zip([0.9, 0.1], m))
    assert divergence(p, q, "jsd") == pytest.approx(jsd, rel=1e-9)
    assert divergence(p, q, "jsd") == pytest.approx(divergence(q, p, "jsd"), rel=1e-12)


def _setup(captured_family):
    model, _, captured = captured_family("llava")
    layers = len(captured.decoder.language_model.layers)
    return model, captured, layers


def test_sensitivity_sees_that_the_last_layer_cannot_reach_the_next_token(captured_family):
    """Visual rows of the last layer feed nothing after it: reducing them leaves the last position's
    distribution unchanged, while earlier layers move it."""
    _, captured, layers = _setup(captured_family)
    settings = LayerSettings(ffn_keep=0.25, window=4)

    def reduce_one(layer):
        return apply_plan(captured.graph_module, ReductionPlan({layer: settings}), 0.25, copy=True).graph_module

    scores = sensitivity_scores(captured.graph_module, [captured.example], range(layers), reduce_one, "jsd")
    assert scores[layers - 1] < 1e-12
    assert max(scores[i] for i in range(layers - 1)) > 1e-9


def test_activation_and_variance_match_hidden_states(captured_family):
    model, captured, layers = _setup(captured_family)
    decoder_layers = list(captured.adapter.language_model(model).layers)
    inputs = captured.example
    activation = activation_scores(captured.decoder, decoder_layers, [inputs], "activation")
    variance = activation_scores(captured.decoder, decoder_layers, [inputs], "variance")
    with torch.no_grad():
        hs = captured.adapter.language_model(model)(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids, output_hidden_states=True).hidden_states
    visual = inputs.visual_mask.bool()
    for i in range(layers - 1):  # the last entry of hidden_states has the final norm applied
        update = (hs[i + 1] - hs[i])[visual]
        assert activation[i] == pytest.approx(float(update.abs().mean()), rel=1e-5)
        assert variance[i] == pytest.approx(float(hs[i + 1][visual].var()), rel=1e-5)


def test_gradient_metric_is_zero_where_visual_rows_cannot_matter(captured_family):
    model, captured, layers = _setup(captured_family)
    decoder_layers = list(captured.adapter.language_model(model).layers)
    scores = activation_scores(captured.decoder, decoder_layers, [captured.example], "gradient")
    assert scores[layers - 1] == 0.0
    assert all(scores[i] > 0 for i in range(layers - 1))
    assert not any(p.grad is not None for p in model.parameters())  # nothing accumulated on the model


@pytest.mark.parametrize("metric", ["kl", "activation", "variance", "gradient"])
def test_every_metric_plans_to_the_budget(family_models, metric):
    model = family_models("llava")
    report = rc.optimize(model, make_inputs("llava", model),
                         config=rc.RedLensConfig(flops_budget=0.6, ranking=metric)).report
    assert report.ranking["metric"] == metric and len(report.ranking["order"]) == 3
    assert report.flops_ratio <= 0.6


def test_ranking_runs_on_the_calibration_inputs(family_models):
    model = family_models("llava")
    example = make_inputs("llava", model)
    calib = make_inputs("llava", model, text_before=6, text_after=2, batch=2, pad_left=(3,), seed=11)
    config = rc.RedLensConfig(flops_budget=0.6)
    on_example = rc.optimize(model, example, config=config).report.ranking["scores"]
    on_calib = rc.optimize(model, example, config=config, calibration=[calib]).report.ranking["scores"]
    # the reference, computed here: per layer, that layer alone reduced at the config's settings,
    # and the JSD of the last position's next-token distribution from the unreduced graph's,
    # written out in probabilities, averaged over the rows of each input
    captured = rc.capture_decoder(model, example)
    settings = LayerSettings(ffn_keep=config.ffn_keep, window=config.hollow_window)

    def jsd_scores(inputs) -> dict[str, float]:
        def next_token(graph_module):
            with torch.no_grad():
                return torch.softmax(graph_module(*inputs.as_args())[0][:, -1].double(), dim=-1)

        p = next_token(captured.graph_module)
        scores = {}
        for layer in range(3):
            trial = apply_plan(captured.graph_module, ReductionPlan({layer: settings}), config.probe_tokens, copy=True)
            q = next_token(trial.graph_module)
            m = (p + q) / 2
            rows = [0.5 * float((p[b] * (p[b] / m[b]).log()).sum()) + 0.5 * float((q[b] * (q[b] / m[b]).log()).sum())
                    for b in range(p.shape[0])]
            scores[str(layer)] = sum(rows) / len(rows)
        return scores

    want_example = jsd_scores(captured.example)
    want_calib = jsd_scores(capture_decoder_inputs(model, captured.adapter, calib))
    assert on_example == pytest.approx(want_example, rel=1e-6, abs=1e-12)
    assert on_calib == pytest.approx(want_calib, rel=1e-6, abs=1e-12)
    # and the two inputs score the layers apart (the last layer is 0 on both: it cannot reach the
    # next token), so scoring the example instead would fail the line above
    assert max(abs(want_calib[k] - want_example[k]) / want_calib[k] for k in want_calib if want_calib[k] > 1e-12) > 0.01
