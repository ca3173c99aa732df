import collections

import pytest
import torch
from conftest import ALL_FAMILIES

import redlens_compile as rc
from redlens_compile.capture.annotate import annotation
from tiny_families import make_inputs


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_matmul_has_layer_and_role(family_models, family):
    model = family_models(family)
    captured = rc.capture_decoder(model, make_inputs(family, model))
    roles = collections.Counter()
    for node in captured.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.linear.default,
                                                           torch.ops.aten.scaled_dot_product_attention.default):
            ann = annotation(node)
            roles[(ann.layer, ann.role)] += 1
    layers = model.config.text_config.num_hidden_layers
    expected = {(i, r): 1 for i in range(layers)
                for r in ("q_proj", "k_proj", "v_proj", "o_proj", "attn_core", "ffn_gate", "ffn_up", "ffn_down")}
    expected[(None, "lm_head")] = 1
    assert dict(roles) == expected
