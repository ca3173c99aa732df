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


