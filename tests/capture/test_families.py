"""The derived adapter (capture/families.py): families with no table entry are served from what the
model itself says, checked against each family's own forward and generate; what it cannot serve is
refused with a clear error."""

from pathlib import Path

import pytest
import torch
from tiny_families import FIRST_FAMILIES, GENERIC_FAMILIES, IMAGE_TOKEN, build_and_reload, make_inputs

import redlens_compile as rc
from redlens_compile.capture.families import FAMILIES, adapter_for

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_and_reload(family, tmp_path_factory.mktemp(family.replace(".", "_")))
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(GENERIC_FAMILIES))
def test_identity_equals_the_family_on_other_lengths_batches_and_generate(models, family):
    model = models(family)
    example = make_inputs(family, model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig.identity())
    longer = make_inputs(family, model, text_before=9, text_after=6, seed=1)
    batch = make_inputs(family, model, text_before=6, batch=2, pad_left=(3,), seed=2)
    with torch.no_grad():
        for inputs in (example, longer, batch):
            assert (opt(**inputs).logits - model(**inputs).logits).abs().max() <= 1e-5
        want = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = opt.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", list(FIRST_FAMILIES) + list(GENERIC_FAMILIES))
def test_a_budget_of_0_6_is_met_and_generates(models, family_models, family):
    model = family_models(family) if family in FIRST_FAMILIES else models(family)
    opt = rc.optimize(model, make_inputs(family, model), config=rc.RedLensConfig(flops_budget=0.6))
    assert opt.report.flops_ratio <= 0.6 + 1e-9
    batch = make_inputs(family, model, text_before=5, batch=2, pad_left=(2,), seed=4)
    with torch.no_grad():
        assert (opt(**batch).logits - model(**batch).logits).abs().max() > 1e-4  # the reduction is real
        ids = opt.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ids.shape == (2, batch["input_ids"].shape[1] + NEW_TOKENS)


def test_the_derived_adapter_serves_classes_the_code_never_names(models):
    source = " ".join(p.read_text() for p in Path(rc.__file__).parent.rglob("*.py"))
    for family in GENERIC_FAMILIES:
        name = type(models(family)).__name__
        assert name not in source, f"{name} is named in the package: the test would not prove the derivation"
        assert not any(name in f.model_classes for f in FAMILIES)
    adapter = adapter_for(models("aya-vision"))
    assert (adapter.language_model_path, adapter.vision_tower_path, adapter.projector_paths, adapter.position_rows) == \
        ("model.language_model", "model.vision_tower", ("model.multi_modal_projector",), 1)
    idefics = adapter_for(models("idefics3"))
    assert (idefics.language_model_path, idefics.vision_tower_path, idefics.projector_paths) == \
        ("model.text_model", "model.vision_model", ("model.connector",))
    qwen = adapter_for(models("qwen2.5-vl"))
    assert qwen.projector_paths == ("model.visual.merger",) and qwen.position_rows == 3


def test_image_blocks_that_attend_both_ways_are_kept(models):
    """Gemma 3 lets an image's tokens see each other both ways: a causal graph would differ."""
    model = models("gemma3")
    inputs = make_inputs("gemma3", model)
    opt = rc.optimize(model, inputs, config=rc.RedLensConfig.identity())
    with torch.no_grad():
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, token_type_ids=None).logits
        assert (causal - model(**inputs).logits).abs().max() > 1e-4  # the trap is real
        assert (opt(**inputs).logits - model(**inputs).logits).abs().max() <= 1e-5
    # Without token_type_ids the family silently computes causal image attention: refused.
    with pytest.raises(rc.CaptureError, match="needs token_type_ids"):
        opt(**{k: v for k, v in inputs.items() if k != "token_type_ids"})


def test_sliding_window_decoders_serve_the_lengths_their_graph_holds(models):
    model = models("aya-vision")
    opt = rc.optimize(model, make_inputs("aya-vision", model), config=rc.RedLensConfig.identity())
    window = model.config.text_config.sliding_window
    too_long = make_inputs("aya-vision", model, text_before=window)
    with pytest.raises(ValueError, match=r"the decoder graph serves at most \d+ .*sliding window of 256"):
        opt(**too_long)
    # Pruning that decodes layer by layer is refused for sliding-window layers; plain pruning works.
    with pytest.raises(rc.ReductionUnavailableError, match="sliding_attention"):
        rc.optimize(model, make_inputs("aya-vision", model), config=rc.RedLensConfig(prune="fastv", prune_layer=1))
    with pytest.raises(rc.ReductionUnavailableError, match="prune_proportional=False"):
        rc.optimize(model, make_inputs("aya-vision", model), config=rc.RedLensConfig(prune="random", prune_keep=0.25))
    plain = rc.optimize(model, make_inputs("aya-vision", model),
                        config=rc.RedLensConfig(prune="random", prune_keep=0.25, prune_proportional=False))
    inputs = make_inputs("aya-vision", model, seed=6)
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    with torch.no_grad():
        out = plain(**inputs)
        ids = plain.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - visual + round(visual * 0.25)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 3


def test_encoder_decoder_models_are_refused():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32),
        text_config=dict(model_type="t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64),
        num_query_tokens=4, image_token_index=60)
    model = Blip2ForConditionalGeneration(config).eval()
    with pytest.raises(rc.UnsupportedModelError, match="encoder-decoder text model"):
        rc.optimize(model, {"input_ids": torch.tensor([[60, 1, 2]])}, config=rc.RedLensConfig.identity())


def test_the_readme_family_table_is_the_generated_one(models, family_models):
    import sys

    from tiny_families import FAMILIES

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from families_table import families_table

    built = {name: family_models(name) if name in FIRST_FAMILIES else models(name) for name in FAMILIES}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- families:start -->\n")[1].split("\n<!-- families:end -->")[0]
    assert block == families_table(built), "README out of date: run .venv/bin/python scripts/families_table.py"
