"""DecoderStep (the exported decode step): one token on a cache gives the logits of the original
model on the whole sequence; the key bias reaches exactly the layers it is given for."""

import torch
from tiny_families import make_inputs

from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.capture.families import adapter_for
from redlens_compile.exporters.decoder_step import DecoderStep


def prefill(model, adapter, inputs):
    decoder_inputs = capture_decoder_inputs(model, adapter, inputs)
    with torch.no_grad():
        out = adapter.language_model(model)(inputs_embeds=decoder_inputs.inputs_embeds,
                                            position_ids=decoder_inputs.position_ids, use_cache=True)
    kv = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
    return decoder_inputs, kv


def test_one_step_equals_the_original_on_the_whole_sequence(family_models):
    model = family_models("llava")
    adapter = adapter_for(model)
    inputs = make_inputs("llava", model, seed=2)
    decoder_inputs, kv = prefill(model, adapter, inputs)
    token = torch.tensor([[7]])
    seq = decoder_inputs.seq_len
    step_args = (token, decoder_inputs.position_ids[..., -1:] + 1, torch.ones(1, seq + 1, dtype=torch.long),
                 torch.zeros(1, seq + 1))
    with torch.no_grad():
        logits, *present = DecoderStep(model, adapter, set()).eval()(*step_args, *kv)
        full = torch.cat([inputs["input_ids"], token], dim=1)
        want = model(**dict(inputs, input_ids=full, attention_mask=torch.ones_like(full))).logits[:, -1]
    assert (logits[:, -1] - want).abs().max() <= 1e-4
    assert present[0].shape[2] == seq + 1

    # a zero bias changes nothing; a bias on one layer changes the result
    with torch.no_grad():
        zero_biased = DecoderStep(model, adapter, {0, 1, 2}).eval()(*step_args, *kv)[0]
        bias = torch.zeros(1, seq + 1)
        bias[0, 5:20] = 2.0
        biased = DecoderStep(model, adapter, {1}).eval()(*step_args[:3], bias, *kv)[0]
        unbiased = DecoderStep(model, adapter, set()).eval()(*step_args[:3], bias, *kv)[0]
    assert (zero_biased - logits).abs().max() <= 1e-5
    assert (biased - logits).abs().max() > 1e-3
    assert (unbiased - logits).abs().max() <= 1e-5  # layers not listed never see the bias


def test_the_exported_step_and_the_artifacts_layered_decode_are_one_step(family_models):
    """DecoderStep (exported) and LayeredDecodeStep (the artifact after pruning inside the decoder) run
    the same layer-by-layer step: on the same cache, one additive mask per layer, the same logits."""
    from transformers import DynamicCache

    from redlens_compile.artifact.layered_decode import LayeredDecodeStep

    model = family_models("llava")
    adapter = adapter_for(model)
    inputs = make_inputs("llava", model, seed=3)
    decoder_inputs, kv = prefill(model, adapter, inputs)
    seq = decoder_inputs.seq_len
    token, positions = torch.tensor([[5]]), decoder_inputs.position_ids[..., -1:] + 1
    attend = torch.ones(1, seq + 1, dtype=torch.long)
    attend[0, 3] = 0
    bias = torch.zeros(1, seq + 1)
    bias[0, 4:12] = 1.5
    with torch.no_grad():
        exported, *present = DecoderStep(model, adapter, {0, 2}).eval()(token, positions, attend, bias, *kv)
    blocked = torch.where(attend.bool(), torch.zeros_like(bias), torch.full_like(bias, float("-inf")))
    masks = [blocked + bias if i in (0, 2) else blocked for i in range(adapter.num_layers(model))]
    # the same prefill cache (its tensors are not changed in place: each step concatenates)
    cache = DynamicCache(ddp_cache_data=[(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)],
                         config=adapter.language_model(model).config)
    layered = LayeredDecodeStep(model, adapter)(token, positions, cache, masks)
    assert torch.equal(layered, exported[:, -1])
    assert all(torch.equal(a, b) for a, b in zip(present, (t for l in cache.layers for t in (l.keys, l.values))))
