"""KeyBiasPass: a `key_bias` graph input added to every SDPA's mask (proportional attention)."""

import torch

from redlens_compile.capture.decoder_inputs import DecoderInputs
from redlens_compile.ops.token_pruning import key_biased_mask
from redlens_compile.passes.infra import run_passes
from redlens_compile.passes.key_bias import KEY_BIAS_INPUT, KeyBiasPass
from redlens_compile.passes.selectors import clone_graph_module
from redlens_compile.passes.strip_asserts import StripAssertsPass


def with_bias(example: DecoderInputs, bias: torch.Tensor) -> DecoderInputs:
    return DecoderInputs(example.inputs_embeds, example.attention_mask, example.position_ids, example.visual_mask, bias)


def test_key_bias_input_reaches_every_layer_and_matches_an_additive_mask(captured_family):
    model, _, captured = captured_family("llava")
    gm, records = run_passes(clone_graph_module(captured.graph_module), [StripAssertsPass(), KeyBiasPass()])
    assert records[1].modified
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"][-1] == KEY_BIAS_INPUT
    assert sum(n.target is key_biased_mask for n in gm.graph.nodes) == 1  # one shared mask, wrapped once
    assert records[1].findings["key_bias_layers"] == [0, 1, 2]  # in the pass result, not on the graph
    assert not gm.meta.get("redlens_key_bias_layers")
    example = captured.example
    with torch.no_grad():
        want = captured.graph_module(*example.as_args())[0]
        zero = gm(*with_bias(example, torch.zeros(example.attention_mask.shape)).as_args())[0]
    assert (zero - want).abs().max() <= 1e-5  # a zero bias changes nothing

    # Independent reference: the original language model with its own additive 4-D mask.
    g = torch.Generator().manual_seed(0)
    bias = torch.rand(example.attention_mask.shape, generator=g) * 2
    seq = example.seq_len
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None] + bias[:, None, None, :]
    lm, head = captured.adapter.language_model(model), captured.adapter.lm_head(model)
    with torch.no_grad():
        got = gm(*with_bias(example, bias).as_args())[0]
        reference = head(lm(inputs_embeds=example.inputs_embeds, attention_mask=mask,
                            position_ids=example.position_ids).last_hidden_state)
    assert (got - reference).abs().max() <= 1e-5
    assert (got - want).abs().max() > 1e-3  # the bias is real

    _, again = run_passes(gm, [KeyBiasPass()])
    assert not again[0].modified
