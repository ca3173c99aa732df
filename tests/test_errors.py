"""Unsupported models, inputs without image tokens, bad configs and unreachable budgets fail clearly."""

import re

import pytest
import torch
from tiny_families import IMAGE_TOKEN, make_inputs
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

import redlens_compile as rc


def test_text_only_llama_is_rejected():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    with pytest.raises(rc.UnsupportedModelError, match="LlamaForCausalLM has no vision_config: not an image-text"):
        rc.optimize(model, {"input_ids": torch.tensor([[1, 2, 3]])}, config=rc.RedLensConfig.identity())


def test_clip_model_is_rejected():
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    with pytest.raises(rc.UnsupportedModelError, match="CLIPModel cannot be served: missing a causal text decoder"):
        rc.audit(CLIPModel(cfg), {"input_ids": torch.tensor([[1, 2]])})


def test_inputs_without_image_tokens_are_rejected(family_models):
    model = family_models("llava")
    inputs = make_inputs("llava", model)
    text_only = {"input_ids": inputs["input_ids"][:, :4], "attention_mask": inputs["attention_mask"][:, :4]}
    assert not (text_only["input_ids"] == IMAGE_TOKEN).any()
    with pytest.raises(rc.NoImageTokensError, match=r"no image token \(ids \[100\]\)"):
        rc.optimize(model, text_only, config=rc.RedLensConfig.identity())
    with pytest.raises(rc.NoImageTokensError, match="image placeholder"):
        rc.audit(model, text_only)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"flops_budget": 0.0}, "flops_budget"),
        ({"flops_budget": 1.5}, "flops_budget"),
        ({"ffn_keep": -0.1}, "ffn_keep"),
        ({"probe_tokens": 0}, "probe_tokens"),
        ({"hollow_window": 0}, "hollow_window"),
        ({"layers": "some"}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"ranking": "magic"}, "ranking"),
        ({"prune": "everything"}, "prune"),
        ({"prune_keep": 1.5}, "prune_keep"),
        ({"prune_layer": -1}, "prune_layer"),
        ({"prune": "codebook"}, "codebook"),
    ],
)
def test_bad_config_value_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        rc.RedLensConfig(**kwargs)
    assert isinstance(err.value, rc.ConfigError)
    assert str(err.value).split(":")[0].find(field) >= 0, str(err.value)


def test_layer_index_out_of_range_is_a_config_error(family_models):
    model = family_models("llava")
    cfg = rc.RedLensConfig(flops_budget=1.0, ffn_keep=1.0, hollow_window=2**31 - 1, layers=[0, 7])
    with pytest.raises(rc.ConfigError, match=r"layers=\[0, 7\]: indices \[7\] are out of range; the decoder has 3"):
        rc.optimize(model, make_inputs("llava", model), config=cfg)


def test_pruning_inside_the_decoder_above_the_budget_is_an_error_not_a_silent_overrun(family_models):
    model = family_models("llava")
    config = rc.RedLensConfig(prune="fastv", prune_layer=1, prune_keep=1.0, flops_budget=0.5)
    with pytest.raises(rc.ReductionUnavailableError, match=r"prune='fastv' after layer 1 brings the decoder FLOPs "
                                                            r"ratio to 1\.000\d, above flops_budget=0.5"):
        rc.optimize(model, make_inputs("llava", model), config=config)
    # explicit layers with pruning inside the decoder: refused before any work, never ignored
    config = rc.RedLensConfig(prune="vtw", prune_layer=0, layers="all")
    with pytest.raises(rc.ReductionUnavailableError, match=r"prune='vtw' with layers='all'"):
        rc.optimize(model, make_inputs("llava", model), config=config)


def test_no_image_tokens_with_a_default_config_is_reported_first(family_models):
    model = family_models("llava")
    inputs = make_inputs("llava", model)
    text_only = {"input_ids": inputs["input_ids"][:, :4], "attention_mask": inputs["attention_mask"][:, :4]}
    for config in (None, rc.RedLensConfig(), rc.RedLensConfig(prune="fastv"), rc.RedLensConfig(layers=[9])):
        with pytest.raises(rc.NoImageTokensError):
            rc.optimize(model, text_only, config=config)


def test_unreachable_budget_names_the_lowest_reachable_ratio(family_models):
    model = family_models("llava")
    with pytest.raises(rc.BudgetUnreachableError) as err:
        rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(flops_budget=0.1))
    msg = str(err.value)
    assert "flops_budget=0.1 cannot be met" in msg and "prune" in msg
    lowest = float(re.search(r"lowest reachable decoder FLOPs ratio is (\d\.\d+)", msg).group(1))
    # The ratio it names is reachable: asking for it succeeds and lands at or under it.
    budget = round(lowest + 1e-3, 3)
    opt = rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(flops_budget=budget))
    assert lowest - 1e-4 <= opt.report.flops_ratio <= budget
    # With one reduction off, the floor is higher (a reduction the user turned off stays off).
    with pytest.raises(rc.BudgetUnreachableError):
        rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(flops_budget=0.5, ffn_keep=1.0))


def test_probe_tokens_above_the_visual_count_are_clamped_and_reported(family_models):
    model = family_models("llava")
    inputs = make_inputs("llava", model)
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    # keep 0.125: with every visual row a probe, a keep of 0.5 costs more than the FFN unreduced (taken off);
    # the stride rule: "+route" rules give every probe the whole down projection too, which never pays here
    base = rc.optimize(model, inputs, config=rc.RedLensConfig(layers=[0], ffn_keep=0.125, probe_tokens=visual,
                                                              probe_rule="stride"))
    big = rc.optimize(model, inputs, config=rc.RedLensConfig(layers=[0], ffn_keep=0.125, probe_tokens=visual + 50,
                                                             probe_rule="stride"))
    assert any(f"probe_tokens={visual + 50} exceeds the {visual} visual tokens" in n for n in big.report.notes)
    assert not any("probe_tokens" in n for n in base.report.notes)
    # Clamped: every visual row is a probe, exactly as with probe_tokens == the visual count.
    assert torch.equal(big(**inputs).logits, base(**inputs).logits)


def test_prune_keep_above_the_visual_count_is_an_error_before_any_work(family_models):
    model = family_models("llava")
    inputs = make_inputs("llava", model)
    with pytest.raises(rc.PruningError, match=r"prune_keep=65 is above the 64 visual tokens of sample 0"):
        rc.optimize(model, inputs, config=rc.RedLensConfig(prune="random", prune_keep=65, flops_budget=1.0))
    with pytest.raises(rc.ConfigError, match=r"prune_keep=0"):
        rc.RedLensConfig(prune="random", prune_keep=0)


def test_prune_layer_beyond_the_last_layer_names_the_range(family_models):
    model = family_models("llava")
    for method in ("fastv", "vtw"):
        with pytest.raises(rc.ConfigError, match=r"prune_layer=3 is beyond the last decoder layer: .* 3 layers"):
            rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(prune=method, prune_layer=3))
        # after the last layer there is nothing left to prune for
        with pytest.raises(rc.ConfigError, match=r"prune_layer=2 is the last decoder layer: .*valid: 0\.\.1"):
            rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(prune=method, prune_layer=2))


def test_a_codebook_of_another_model_is_refused(family_models, tmp_path):
    from redlens_compile.analysis.codebook_file import Codebook

    model = family_models("llava")
    inputs = make_inputs("llava", model)

    def run(path):
        return rc.optimize(model, inputs, config=rc.RedLensConfig(prune="codebook", codebook=str(path)))

    wrong_dim = Codebook(torch.randn(4, 32), {"model_type": "llava"}).save(tmp_path / "dim.safetensors")
    with pytest.raises(rc.CodebookError, match="prototypes of dim 32, but this model's decoder hidden size is 64"):
        run(wrong_dim)
    wrong_type = Codebook(torch.randn(4, 64), {"model_type": "qwen2_vl"}).save(tmp_path / "type.safetensors")
    with pytest.raises(rc.CodebookError, match="built on a 'qwen2_vl' model, this model is 'llava'"):
        run(wrong_type)
    with pytest.raises(rc.CodebookError, match="no such file"):
        run(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(rc.CodebookError, match="not a redlens codebook"):
        run(tmp_path / "other.safetensors")
    with pytest.raises(rc.CodebookError, match="already exists"):
        Codebook(torch.randn(4, 64)).save(wrong_type)


def _count_decoder_calls(model):
    """A counter of the language model's forward calls: 0 after an error means no work was done."""
    from redlens_compile.capture.families import adapter_for

    calls = []
    handle = adapter_for(model).language_model(model).register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_image_placeholders_without_pixel_values_are_refused_before_any_work(family_models, identity_optimized):
    model, inputs, opt = identity_optimized("llava")
    no_pixels = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
    calls, handle = _count_decoder_calls(model)
    try:
        for run in (lambda: rc.optimize(model, no_pixels),  # the default budget: it used to fail after the ranking
                    lambda: rc.optimize(model, no_pixels, config=rc.RedLensConfig(prune="random", prune_keep=8)),
                    lambda: rc.audit(model, no_pixels), lambda: opt(**no_pixels),
                    lambda: opt.generate(**no_pixels, max_new_tokens=2)):
            with pytest.raises(rc.InputError, match=r"input_ids hold 64 image placeholder tokens \(ids \[100\]\) but "
                                                    "the inputs have no pixel_values"):
                run()
        assert calls == []
    finally:
        handle.remove()


def test_bad_inputs_are_refused_before_the_model_runs(family_models, tmp_path):
    model = family_models("llava")
    inputs = make_inputs("llava", model)
    calls, handle = _count_decoder_calls(model)
    cases = [
        (rc.RedLensConfig(prune="random", prune_keep=65, flops_budget=1.0), rc.PruningError, "prune_keep=65 is above"),
        (rc.RedLensConfig(prune="codebook", codebook=str(tmp_path / "none.safetensors")), rc.CodebookError,
         "no such file"),
        (rc.RedLensConfig(layers=[9]), rc.ConfigError, r"layers=\[9\]"),
    ]
    try:
        for config, error, message in cases:
            with pytest.raises(error, match=message) as err:
                rc.optimize(model, inputs, config=config)
            assert len(str(err.value).splitlines()) == 1
        assert calls == []
    finally:
        handle.remove()
