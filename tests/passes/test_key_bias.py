"""KeyBiasPass: a `key_bias` graph input added to every SDPA's mask (proportional attention)."""

import pytest
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


def test_hollow_layers_with_a_window_over_the_whole_span_see_the_bias_as_full_layers_do(captured_family):
    """Hollow attention after KeyBiasPass adds the bias to the keys it keeps: with a window over the
    whole visual span, hollow + key bias equals the full layers + key bias."""
    from redlens_compile.ops.hollow_attention import hollow_attention
    from redlens_compile.passes.hollow_attention import HollowAttentionPass

    _, _, captured = captured_family("llava")
    layers = len(captured.decoder.language_model.layers)
    span = int(captured.example.visual_mask.sum(dim=1).max())
    full, _ = run_passes(clone_graph_module(captured.graph_module), [StripAssertsPass(), KeyBiasPass()])
    hollow, records = run_passes(clone_graph_module(captured.graph_module),
                                 [StripAssertsPass(), HollowAttentionPass(window={i: span for i in range(layers)}),
                                  KeyBiasPass()])
    cores = [n for n in hollow.graph.nodes if n.target is hollow_attention]
    assert len(cores) == layers and all(n.kwargs["key_bias"].name == KEY_BIAS_INPUT for n in cores)
    assert records[2].findings["key_bias_layers"] == list(range(layers))  # decode steps add it in these layers too
    _, again = run_passes(hollow, [KeyBiasPass()])
    assert again[0].findings["key_bias_layers"] == list(range(layers))
    example = captured.example
    bias = torch.rand(example.attention_mask.shape, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = full(*with_bias(example, bias).as_args())[0]
        got = hollow(*with_bias(example, bias).as_args())[0]
        unbiased = hollow(*with_bias(example, torch.zeros_like(bias)).as_args())[0]
    assert (got - want).abs().max() < 1e-5
    assert (got - unbiased).abs().max() > 1e-3  # the bias reaches the hollow layers


@pytest.mark.parametrize("window", [1, 3, 5, 64])
@pytest.mark.parametrize("causal_shortcut", [False, True])
def test_hollow_op_with_key_bias_equals_an_additive_masked_reference(window, causal_shortcut):
    """Both blockwise paths (small blocks and SDPA blocks), the causal prefix and the masked fallback
    against SDPA over the hollow pattern written out element by element plus the bias on each key."""
    import torch.nn.functional as F
    from test_hollow_attention import random_case, reference_mask

    from redlens_compile.ops.hollow_attention import hollow_attention, hollow_attention_masked, hollow_plan
    from redlens_compile.ops.rows import visual_layout

    q, k, v, family, visual = random_case(window, bidirectional=False)
    if causal_shortcut:  # exactly causal (no padding), so the op may take its causal shortcut
        seq = visual.shape[1]
        family = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(2, 1, seq, seq).clone()
    bias = torch.rand(visual.shape, generator=torch.Generator().manual_seed(window)) * 3
    allowed = reference_mask(family, visual, window)
    additive = torch.where(allowed, bias[:, None, None, :], torch.tensor(float("-inf")))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    layout = visual_layout(visual)
    plan = hollow_plan(family, visual, *layout[:2], *layout[3:5], window, mask_is_causal=causal_shortcut)
    got = hollow_attention(q, k, v, plan, key_bias=bias)
    masked = hollow_attention_masked(q, k, v, family, visual, window, key_bias=bias)
    rows = family[:, 0].any(-1)[:, None, :, None].expand_as(got)  # fully masked (padding) rows are undefined
    assert (got - want).abs()[rows].max().item() <= 1e-5
    assert (masked - want).abs()[rows].max().item() <= 1e-5
    plain = hollow_attention(q, k, v, plan)
    assert (plain - want).abs()[rows].max().item() > 1e-3
