"""Hollow attention's text queries cost what they cost unreduced, and a window never costs more than
the layer without it (the audit, per layer, against the original's count)."""

import pytest
import torch
from tiny_families import FIRST_FAMILIES, make_inputs

import redlens_compile as rc
from redlens_compile.analysis.flops import groups_total
from redlens_compile.ops.hollow_attention import hollow_attention, hollow_plan
from redlens_compile.ops.rows import visual_layout


def assert_text_attention_unchanged(report):
    for row in report.layers:
        before, after = row["before"]["attn"]["text"], row["after"]["attn"]["text"]
        assert after == pytest.approx(before, rel=1e-9), (row["layer"], before, after)


def test_text_attention_of_a_hollow_layer_equals_the_original(family_models):
    model = family_models("llava")
    opt = rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(layers="all", ffn_keep=1.0,
                                                                                   hollow_window=4))
    report = opt.report
    assert report.chosen_layers == [0, 1, 2] and all(r["settings"]["window"] == 4 for r in report.layers)
    assert_text_attention_unchanged(report)
    for row in report.layers:  # the visual queries are what the window saves
        assert row["after"]["attn"]["visual"] < 0.5 * row["before"]["attn"]["visual"]


def test_the_proof_models_hollow_layers_keep_their_text_attention():
    from redlens_compile.loading import load_model_dir
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR
    from redlens_compile.models.evaluate import encode_questions
    from redlens_compile.models.shapes_task import heldout_questions

    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    image, qa = heldout_questions(1)[0]
    report = rc.optimize(model, encode_questions(processor, [image], [qa.question]),
                         config=rc.RedLensConfig.preset("hollow-only")).report
    assert report.chosen_layers == list(range(len(report.layers)))
    assert_text_attention_unchanged(report)
    assert report.flops_ratio < 1.0


# The four first families, one whose image tokens see each other both ways (and sliding layers),
# and the fused-FFN one; the rule itself is family-agnostic (analysis/budget.py drop_unpaying).
@pytest.mark.parametrize("family", [*FIRST_FAMILIES, "gemma3", "glm4v"])
def test_hollow_only_never_costs_more_than_the_original(family_models, family):
    """The zoo's short prompt: 64-ish visual rows against the default window of 64, where the blocks
    would cost more than causal attention; those windows are taken off (and the numbers kept)."""
    model = family_models(family)
    inputs = make_inputs(family, model)
    opt = rc.optimize(model, inputs, config=rc.RedLensConfig.preset("hollow-only"))
    report = opt.report
    assert report.flops_ratio <= 1.0 + 1e-12
    for row in report.layers:
        assert groups_total(row["after"]) <= groups_total(row["before"]) * (1 + 1e-12)
    if report.flops_ratio == pytest.approx(1.0):  # nothing saved: nothing changed either
        assert not report.chosen_layers
        with torch.no_grad():
            want, got = model(**inputs).logits, opt(**inputs).logits
        assert (got - want).abs().max().item() <= 1e-5


def test_causal_text_rows_before_the_image_run_once_over_their_own_keys():
    """With an exactly causal mask the leading text rows take one causal SDPA over keys [0, P); the
    rows after the image see every key. Same numbers as SDPA over the whole sequence."""
    g = torch.Generator().manual_seed(0)
    batch, heads, seq, dim = 2, 2, 24, 8
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    visual[0, 5:15] = True
    visual[1, 7:20] = True
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g) for _ in range(3))
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(batch, 1, seq, seq)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    layout = visual_layout(visual)
    plan = hollow_plan(causal, visual, *layout[:2], *layout[3:5], seq, mask_is_causal=True)
    got = hollow_attention(q, k, v, plan)
    assert (got - want).abs().max().item() <= 1e-5
    visual_flops, text_flops = hollow_attention._redlens_flops(q, k, v, plan)
    keys_seen = sum(i + 1 for b in range(batch) for i in range(seq) if not visual[b, i])
    text_rows = (~visual).sum(1)
    padded = int((text_rows.max() - text_rows).sum())  # a sample's padded text entries run against all keys
    assert text_flops == (keys_seen + padded * seq) * heads * 2 * dim
