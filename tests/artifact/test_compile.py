"""OptimizedModel.compile: the rewritten prefill under torch.compile, exact, one compile for every
prompt length, few graph pieces, and an eager fallback where compiling cannot work."""

import logging

import pytest
import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.artifact import compiled as compiled_module
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.errors import CompileError


@pytest.fixture(scope="module")
def reduced(family_models):
    model = family_models("llava")
    # both reductions on two explicit layers: no ranking (fast), hollow windows inside the 64 visual rows
    config = rc.RedLensConfig(flops_budget=1.0, layers=[0, 1], hollow_window=8, ffn_keep=0.5)
    return model, rc.optimize(model, make_inputs("llava", model), config=config)


def _eager_and_compiled(opt, model, inputs):
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, inputs)
    with torch.no_grad():
        eager = opt.graph_module(*decoder_inputs.as_args())[0]
        return eager, opt.run_decoder(decoder_inputs).logits


def test_compiled_prefill_compiles_once_for_two_lengths(reduced):
    model, opt = reduced
    graphs = []

    def counting(gm, example):  # a backend that counts the pieces dynamo hands it, and runs them as traced
        graphs.append(gm)
        return gm.forward

    opt.compile(backend=counting)
    try:
        assert opt.torch_compiled
        eager, logits = _eager_and_compiled(opt, model, make_inputs("llava", model, text_before=3))
        assert (logits - eager).abs().max().item() < 1e-4
        first = len(graphs)
        # the mask checks run before the compiled graph and the sizes read from data are unbacked
        # symbols: one graph for the 2 reduced layers (counted so that a new break in our ops fails this)
        assert opt.report.chosen_layers and first == 1
        eager, logits = _eager_and_compiled(opt, model, make_inputs("llava", model, text_before=9, text_after=2))
        assert logits.shape[1] == 9 + 2 + 1 + 64 and (logits - eager).abs().max().item() < 1e-4
        assert len(graphs) == first  # no recompile for another prompt length
    finally:
        opt._torch_compiled = {}


def test_a_padded_batch_gets_its_own_graph_for_a_mask_that_is_not_causal(reduced):
    """Left padding makes the mask not exactly causal: the checks' other answer, a second graph
    (masked kernels), exact against eager; the causal prompt after it reuses the first graph."""
    model, opt = reduced
    graphs = []

    def counting(gm, example):
        graphs.append(gm)
        return gm.forward

    opt.compile(backend=counting)
    try:
        eager, logits = _eager_and_compiled(opt, model, make_inputs("llava", model))
        assert (logits - eager).abs().max().item() < 1e-4 and len(graphs) == 1
        padded = make_inputs("llava", model, batch=2, pad_left=(0, 3))
        eager, logits = _eager_and_compiled(opt, model, padded)
        real = padded["attention_mask"].bool()
        assert (logits - eager)[real].abs().max().item() < 1e-4 and len(graphs) == 2
        # the second sample's answer is its own: the same prompt alone gives the same real rows
        alone = {k: v[1:] for k, v in padded.items()}
        _, alone_logits = _eager_and_compiled(opt, model, alone)
        assert (alone_logits[0][real[1]] - logits[1][real[1]]).abs().max().item() < 1e-4
        # its mask is still not causal (its padding), but batch 1 is a size dynamo specializes (0 and
        # 1 are): the masked graph compiles once more, for batch 1
        assert len(graphs) == 3
    finally:
        opt._torch_compiled = {}


@pytest.fixture(scope="module")
def one_layer(family_models):
    model = family_models("llava")
    # hollow attention (window 16: blocks of 8 through SDPA, as the presets' window 64 runs) and the
    # dynamic FFN (default probe rule) on one layer
    config = rc.RedLensConfig(flops_budget=1.0, layers=[0], hollow_window=16, ffn_keep=0.5)
    return model, rc.optimize(model, make_inputs("llava", model), config=config)


def test_inductor_compiles_the_whole_reduced_graph(one_layer):
    """Real inductor (C++ codegen): the sizes our ops read from data lower without a guard on them."""
    from torch._dynamo.utils import counters

    model, opt = one_layer
    counters.clear()
    opt.compile(fallback=False)
    try:
        eager, logits = _eager_and_compiled(opt, model, make_inputs("llava", model, text_before=3))
        assert (logits - eager).abs().max().item() < 1e-4
        # one graph, no break: the mask checks are lowered away, and the data-sized text rows and
        # probe counts are unbacked sizes
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        eager, logits = _eager_and_compiled(opt, model, make_inputs("llava", model, text_before=9, text_after=2))
        assert logits.shape[1] == 9 + 2 + 1 + 64 and (logits - eager).abs().max().item() < 1e-4
        assert counters["stats"]["unique_graphs"] == 1  # no recompile for another prompt length
    finally:
        opt._torch_compiled = {}


def test_no_cpp_compiler_falls_back_or_raises(reduced, monkeypatch, caplog):
    model, opt = reduced
    monkeypatch.setattr(compiled_module, "cpp_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger=compiled_module.__name__):
        assert opt.compile() is opt and not opt.torch_compiled
    assert "C++ compiler" in caplog.text and "stays eager" in caplog.text
    eager, logits = _eager_and_compiled(opt, model, make_inputs("llava", model))
    assert torch.equal(eager, logits)
    with pytest.raises(CompileError, match=r"C\+\+ compiler"):
        opt.compile(fallback=False)
    opt.compile(backend="aot_eager")  # needs no compiler
    try:
        assert opt.torch_compiled
    finally:
        opt._torch_compiled = {}
