"""Selectors over the node annotations: what the passes may rewrite, found by module path and role."""

import pytest
import torch
from conftest import ALL_FAMILIES

from redlens_compile.capture.annotate import annotation, copy_node_meta
from redlens_compile.passes.selectors import (
    attention_core,
    clone_graph_module,
    decoder_layers,
    ffn_of_layer,
    layout_nodes,
    unrepeated_kv,
)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_layer_has_an_ffn_and_an_attention_core(captured_family, family):
    _, _, captured = captured_family(family)
    gm = captured.graph_module
    layers = decoder_layers(gm)
    assert layers == list(range(len(captured.decoder.language_model.layers)))
    for layer in layers:
        match, why = ffn_of_layer(gm, layer)
        assert match is not None, why
        assert len(match.up_linears) == 2  # gate and up (SwiGLU)
        assert annotation(match.down).role == "ffn_down" and annotation(match.entry).role == "post_attn_norm"
        core = attention_core(gm, layer)
        assert core is not None and annotation(core).layer == layer
        # transformers repeats the 2 KV heads to 4 for SDPA; the selector finds the unrepeated tensor
        source = unrepeated_kv(core.args[1])
        assert source is not None and source.meta["val"].shape[1] == 2


def test_layout_is_inserted_once_and_copy_node_meta_narrows_the_token_kind(captured_family):
    _, _, captured = captured_family("llava")
    gm = clone_graph_module(captured.graph_module)
    first = layout_nodes(gm)
    assert layout_nodes(gm) == first and len(first) == 7
    src = next(n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "ffn_gate")
    with gm.graph.inserting_after(src):
        new = gm.graph.call_function(torch.ops.aten.relu.default, (src,))
    copy_node_meta(src, new, token_kind="visual")
    assert annotation(new).layer == annotation(src).layer and annotation(new).role == "ffn_gate"
    assert annotation(new).token_kind == "visual" and annotation(src).token_kind == "mixed"
    assert new.meta["nn_module_stack"] == src.meta["nn_module_stack"]
    # the clone shares weights and does not share nodes
    assert gm.graph is not captured.graph_module.graph
    assert len([n for n in captured.graph_module.graph.nodes if n.name == new.name]) == 0
