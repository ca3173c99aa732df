"""LowerForOnnxPass: the causal fast path becomes a masked SDPA, hollow attention keeps its blocks
with static decisions, key-bias masks get a finite floor; the numbers of the real rows stay."""

import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.exporters.onnx_lowering import LowerForOnnxPass
from redlens_compile.ops.causal_attention import is_causal_mask, sdpa_causal_fast_path, sdpa_decomposed
from redlens_compile.ops.hollow_attention import hollow_attention, hollow_plan
from redlens_compile.passes.infra import run_passes
from redlens_compile.passes.selectors import clone_graph_module


def targets(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def lower_and_compare(model, opt, looks_ahead=False, example=None):
    example_args = None if example is None else capture_decoder_inputs(model, opt.adapter, example).as_args()
    lowered, records = run_passes(clone_graph_module(opt.graph_module), [LowerForOnnxPass(looks_ahead, example_args)])
    inputs = capture_decoder_inputs(model, opt.adapter, make_inputs("llava", model, batch=2, pad_left=(2,), seed=3))
    if opt.pruning is not None:
        inputs = opt.pruning(inputs).inputs
    with torch.no_grad():
        want, got = opt.graph_module(*inputs.as_args())[0], lowered(*inputs.as_args())[0]
    real = inputs.attention_mask.bool()
    assert (got - want).abs()[real].max() <= 1e-5
    again = LowerForOnnxPass(looks_ahead, example_args)
    assert not again(lowered).modified  # a second run changes nothing
    return lowered, records[0].findings["lowering"]


def test_causal_fast_path_becomes_a_masked_sdpa(identity_optimized):
    model, _, opt = identity_optimized("llava")
    fast = len(targets(opt.graph_module, sdpa_causal_fast_path))
    assert fast == opt.num_layers
    lowered, record = lower_and_compare(model, opt)
    assert record.causal_fast_path == fast
    assert targets(lowered, sdpa_causal_fast_path) == [] and targets(lowered, is_causal_mask) == []
    assert len(targets(lowered, sdpa_decomposed)) == fast


def test_causal_fast_path_becomes_query_chunks_where_the_example_sees_no_later_key(identity_optimized):
    """With the export's example (a causal family, one prompt): every fast path call becomes query
    chunks; the padded batch of other lengths gets the masked SDPA's numbers. Where the family's
    image tokens look ahead, the masked SDPA stays."""
    from redlens_compile.ops.causal_attention import sdpa_causal_chunks

    model, _, opt = identity_optimized("llava")
    fast = len(targets(opt.graph_module, sdpa_causal_fast_path))
    lowered, record = lower_and_compare(model, opt, example=make_inputs("llava", model))
    assert record.causal_chunks == record.causal_fast_path == fast
    assert len(targets(lowered, sdpa_causal_chunks)) == fast and targets(lowered, sdpa_decomposed) == []
    lowered, record = lower_and_compare(model, opt, looks_ahead=True, example=make_inputs("llava", model))
    assert record.causal_chunks == 0 and len(targets(lowered, sdpa_decomposed)) == fast


def test_decomposed_sdpa_equals_torch_sdpa_and_exports_without_a_nan_guard(tmp_path):
    """GQA and plain heads, a mask per sample or per head, query rows with no allowed key (torch's
    SDPA gives them 0), float16; in onnxruntime the same numbers, with no IsNaN and no Expand of keys."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    mask = torch.rand(2, 1, 9, 12, generator=g) > 0.4
    mask[1, :, 3] = False  # a query that may attend no key
    per_head = torch.rand(2, 6, 9, 12, generator=g) > 0.3
    per_head[0, 4, 2] = False
    for m in (mask, per_head):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        assert (sdpa_decomposed(q, k, v, m, enable_gqa=True) - want).abs().max() <= 1e-6
    assert sdpa_decomposed(q, k, v, mask, enable_gqa=True)[1, :, 3].abs().max() == 0
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.3)
    assert (sdpa_decomposed(q, kk, vv, mask, scale=0.3) - want).abs().max() <= 1e-6
    half = [x.half() for x in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*half, attn_mask=mask, enable_gqa=True).float()
    got = sdpa_decomposed(*half, mask, enable_gqa=True).float()
    assert torch.isfinite(got).all() and (got - want).abs().max() <= 2e-3

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return sdpa_decomposed(q, k, v, mask, enable_gqa=True)

    path = tmp_path / "attention.onnx"
    torch.onnx.export(Attention(), (q, k, v, mask), input_names=["q", "k", "v", "mask"], dynamo=True,
                      optimize=True, verbose=False).save(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "IsNaN" not in ops and "Expand" not in ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()})[0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert np.abs(got - want.numpy()).max() <= 1e-5


def test_causal_chunks_equal_the_masked_sdpa_and_a_look_ahead_mask_is_seen():
    from redlens_compile.ops.causal_attention import sdpa_causal_chunks, sees_no_later_key

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 11, 8, generator=g) for _ in range(3))
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, :, :, :3] = False  # the second sample's first 3 keys are padding
    padded[1, :, :3, :] = True  # (its padded queries see everything before them: finite rows)
    padded[1] &= causal
    for mask in (causal[None, None], padded):
        assert sees_no_later_key(mask)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert (sdpa_causal_chunks(q, k, v, mask) - want).abs().max() <= 1e-6
        assert (sdpa_causal_chunks(q, k, v, mask, decomposed=True) - want).abs().max() <= 1e-6
    ahead = padded.clone()
    ahead[0, 0, 4, 6] = True  # an image token seeing a later one
    assert not sees_no_later_key(ahead)
    assert not sees_no_later_key(torch.zeros(1, 1, 4, 4))  # additive: 0 everywhere allows every key


def test_hollow_attention_stays_blockwise_with_static_decisions(family_models):
    model = family_models("llava")
    opt = rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(layers="all", hollow_window=4))
    hollow = len(targets(opt.graph_module, hollow_attention))
    assert hollow == opt.num_layers
    lowered, record = lower_and_compare(model, opt)
    assert record.hollow_blockwise == hollow
    plans = targets(lowered, hollow_plan)
    assert len(plans) == 1 and all(n.args[3] is plans[0] for n in targets(lowered, hollow_attention))
    assert plans[0].kwargs["mask_is_causal"] is False and plans[0].kwargs["looks_ahead"] is False


def test_key_bias_masks_get_a_finite_floor(family_models):
    model = family_models("llava")
    opt = rc.optimize(model, make_inputs("llava", model),
                      config=rc.RedLensConfig(prune="random", prune_keep=0.25, flops_budget=1.0))
    _, record = lower_and_compare(model, opt)
    assert record.finite_key_bias == 1


def test_reduced_layers_lower_to_onnx_friendly_forms(family_models):
    """Window 12 (blocks of 6: the SDPA path) over 4 query heads and 2 key heads, and the dynamic FFN:
    the blocks stack the heads of a key head, each down weight is stored once, transposed, and
    read by row gathers and matmuls; the real rows' numbers stay."""
    from redlens_compile.exporters.onnx_lowering import linear_transposed, rows_of_transposed
    from redlens_compile.ops.dynamic_ffn import slice_in_features

    model = family_models("llava")
    opt = rc.optimize(model, make_inputs("llava", model),
                      config=rc.RedLensConfig(layers="all", hollow_window=12, ffn_keep=0.5))
    layers = opt.num_layers
    assert len(targets(opt.graph_module, slice_in_features)) == layers
    lowered, record = lower_and_compare(model, opt)
    assert record.transposed_down_weights == layers
    assert targets(lowered, slice_in_features) == []
    assert len(targets(lowered, rows_of_transposed)) == layers and len(targets(lowered, linear_transposed)) == layers
    assert all(n.kwargs["stack_heads"] is True for n in targets(lowered, hollow_attention))
    down = [n.args[0] for n in targets(lowered, rows_of_transposed)]
    for node in down:  # [F, D]: the model's [D, F] down weight, transposed
        weight = getattr(lowered, node.target)
        assert weight.shape == (model.config.text_config.intermediate_size, model.config.text_config.hidden_size)
    assert len({n.target for n in down}) == layers
