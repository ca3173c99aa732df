"""generate after a reduction: KV-cached decoding gives the tokens of re-running the rewritten
graph on the whole sequence for every new token (the reference below shares no decode code)."""

import pytest
import torch
from conftest import ALL_FAMILIES
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs

NEW_TOKENS = 6


def rerun_reference(opt, inputs: dict) -> torch.Tensor:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(NEW_TOKENS):
        step = dict(inputs, input_ids=ids, attention_mask=mask)
        if "mm_token_type_ids" in inputs:
            step["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"],
                                                                (0, ids.shape[1] - inputs["input_ids"].shape[1]))
        # Positions as transformers' generate makes them (left padding, M-RoPE), from the model's own code.
        step["position_ids"] = opt.model._prepare_position_ids_for_generation(ids, dict(step))
        decoder_inputs = capture_decoder_inputs(opt.model, opt.adapter, step)
        with torch.no_grad():
            logits = opt.graph_module(*decoder_inputs.as_args())[0][:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_after_reduction_matches_rerunning_the_graph(family_models, family):
    model = family_models(family)
    example = make_inputs(family, model)
    config = rc.RedLensConfig(layers="all", ffn_keep=0.5, hollow_window=4)
    opt = rc.optimize(model, example, config=config)
    batch = make_inputs(family, model, text_before=6, text_after=2, batch=2, pad_left=(3,), seed=7)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    want = rerun_reference(opt, batch)
    assert torch.equal(ours, want), (ours[:, -NEW_TOKENS:], want[:, -NEW_TOKENS:])
    # The reduction is real: the prefill logits differ from the original model's.
    with torch.no_grad():
        assert (opt(**batch).logits - model(**batch).logits).abs().max() > 1e-3


def test_generate_serves_min_new_tokens_and_refuses_what_it_does_not_serve(identity_optimized):
    model, example, opt = identity_optimized("llava")
    first = int(opt.generate(**example, max_new_tokens=1)[0, -1])
    # the model's own first choice becomes the end token: min_new_tokens must hold it off for 3 steps
    kwargs = dict(max_new_tokens=6, min_new_tokens=3, eos_token_id=first, pad_token_id=0)
    ours = opt.generate(**example, **kwargs)
    want = model.generate(**example, do_sample=False, **kwargs)
    assert torch.equal(ours, want)
    assert first not in ours[0, -6:-3].tolist()
    for option in ({"num_beams": 3}, {"num_return_sequences": 2, "num_beams": 2}, {"return_dict_in_generate": True},
                   {"max_length": 50}, {"streamer": object()}, {"output_scores": True}):
        with pytest.raises(ValueError, match="does not serve"):
            opt.generate(**example, max_new_tokens=2, **option)
    assert torch.equal(opt.generate(**example, max_new_tokens=2, num_beams=1, use_cache=True, temperature=0.5),
                       opt.generate(**example, max_new_tokens=2))  # greedy ignores these, as transformers does
