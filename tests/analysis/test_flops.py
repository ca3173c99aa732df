"""Must show 2: per-layer FLOPs equal the closed form; the graph count equals fvcore on eager."""

import pytest
import torch
from conftest import ALL_FAMILIES
from closed_forms import closed_form_per_layer, vision_closed_form
from tiny_families import IMAGE_TOKEN, VIDEO_TOKEN, make_inputs

import redlens_compile as rc
from redlens_compile.analysis.flops import causal_keys_seen, sdpa_flop_handle


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_audit_layers_match_closed_form_within_one_percent(family_models, family):
    model = family_models(family)
    inputs = make_inputs(family, model, text_before=5, text_after=6)
    report = rc.audit(model, inputs)
    text_cfg = model.get_decoder().config if hasattr(model, "get_decoder") else model.config.text_config
    expected = closed_form_per_layer(text_cfg, torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])))
    assert len(report.layers) == text_cfg.num_hidden_layers
    for row in report.layers:
        for kind in ("visual", "text"):
            for group in ("proj", "attn", "ffn"):
                want = expected[kind][group]
                got = row["before"][group][kind]
                assert want > 0
                assert abs(got - want) <= 0.01 * want, (row["layer"], kind, group, got, want)
    # lm_head: every position, D x vocab
    n = inputs["input_ids"].numel()
    assert report.components["lm_head_before"] == n * text_cfg.hidden_size * text_cfg.vocab_size


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_eager_fvcore_total_equals_report_decoder_total(family_models, family):
    model = family_models(family)
    report = rc.audit(model, make_inputs(family, model))
    assert report.totals["eager_fvcore_decoder"] > 0
    assert report.totals["eager_fvcore_decoder"] == report.totals["graph_total_before"]
    layer_sum = sum(sum(g[k] for g in r["before"].values() for k in ("visual", "text")) for r in report.layers)
    # The budget's "decoder prefill" is the decoder layers alone; lm_head and the rest are reported apart.
    assert abs(layer_sum - report.totals["decoder_prefill_before"]) < 1.0
    assert abs(layer_sum + report.components["lm_head_before"] + report.components["other_before"]
               - report.totals["graph_total_before"]) < 1.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_vision_tower_and_projector_equal_the_closed_form(family_models, family):
    """Each family's tower (patch embedding, blocks, norms) and projector, written out from its config
    (tests/closed_forms.py), counted one module at a time on the inputs of a real forward: LLaVA's
    CLIP, LLaVA-NeXT's CLIP on every anyres tile, Qwen2-VL's conv3d patches with attention inside
    each image and its merger, InternVL's ViT with CLS and its pixel-shuffle projector."""
    model = family_models(family)
    inputs = make_inputs(family, model)
    report = rc.audit(model, inputs)
    tower, projector = vision_closed_form(model, inputs)
    assert report.components["vision_tower"] == tower, report.components["vision_note"]
    assert report.components["projector"] == projector


def test_sdpa_handle_counts_causal_pairs():
    class V:  # stands in for a jit value: fvcore's get_shape reads .type().sizes()
        def __init__(self, shape):
            self.shape = shape

        def isCompleteTensor(self):
            return True

        def type(self):
            return self

        def sizes(self):
            return self.shape

    # batch 2, 4 heads, 10 queries over 10 keys, head dim 8: 2*4*55*(8+8)
    assert sdpa_flop_handle([V([2, 4, 10, 8]), V([2, 4, 10, 8]), V([2, 4, 10, 8])], []) == 2 * 4 * 55 * 16
    # one decode query over 11 keys sees all 11
    assert causal_keys_seen(1, 11) == 11
    assert causal_keys_seen(10, 10) == 55
