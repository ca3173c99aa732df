"""ONNX export: onnxruntime gives the torch module's logits and generate tokens (other prompt
lengths, a padded batch of 2), the files carry the rewrites, and bad targets fail cleanly."""

import json
import operator
import os

import numpy as np
import onnx
import pytest
import torch
from device_guard import factories_without_device
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.exporters.ort_runner import OnnxRunner, pick_providers

CONFIGS = {
    "identity": rc.RedLensConfig.identity(),
    "budget-0.5+random-0.25": rc.RedLensConfig(flops_budget=0.5, prune="random", prune_keep=0.25),
}
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory, family_models):
    cache = {}

    def get(family: str, config: str):
        if (family, config) not in cache:
            model = family_models(family)
            opt = rc.optimize(model, make_inputs(family, model), config=CONFIGS[config])
            with factories_without_device() as sites:  # the export's examples beside the model (any device)
                out = opt.export_onnx(tmp_path_factory.mktemp("onnx") / "files")
                runner = OnnxRunner(out, model)
            assert sites == []
            cache[family, config] = (model, opt, runner)
        return cache[family, config]

    return get


def assert_same_as_torch(opt, runner, inputs):
    with torch.no_grad():
        want = opt(**inputs).logits
    got = runner(**inputs)
    assert got.shape == tuple(want.shape)
    real = runner.decoder_inputs(inputs).attention_mask.bool().numpy()  # padded rows are garbage in both
    assert np.abs(got - want.numpy())[real].max() <= 1e-4
    ours = opt.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    assert torch.equal(runner.generate(inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[]), ours)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_onnxruntime_equals_the_torch_module(exported, family, config):
    model, opt, runner = exported(family, config)
    assert runner.provider == pick_providers()[0]  # CUDA where onnxruntime-gpu sees a GPU, else the CPU
    # LLaVA runs from the folder alone (vision.onnx); Qwen2-VL's M-RoPE positions need the model
    assert (runner.model is None) == (family == "llava")
    assert ("vision" in runner.sessions) == (family == "llava")
    assert ("prune" in runner.sessions) == (config != "identity")  # the pruning stage runs in onnxruntime too
    longer = make_inputs(family, model, text_before=8, text_after=6, seed=3)
    batch = make_inputs(family, model, text_before=7, batch=2, pad_left=(2,), seed=5)
    for inputs in (longer, batch):
        assert_same_as_torch(opt, runner, inputs)


def test_a_family_with_no_table_entry_exports_too(exported):
    """LLaVA-OneVision: anyres tiles, an image newline row, a derived adapter."""
    model, opt, runner = exported("llava-onevision", "budget-0.5+random-0.25")
    assert_same_as_torch(opt, runner, make_inputs("llava-onevision", model, text_before=7, batch=2, pad_left=(2,),
                                                  seed=5))


def test_sliding_window_decoders_are_refused(family_models, tmp_path):
    model = family_models("aya-vision")
    opt = rc.optimize(model, make_inputs("aya-vision", model), config=rc.RedLensConfig.identity())
    with pytest.raises(rc.ExportError, match="sliding_attention"):
        opt.export_onnx(tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_the_proof_model_exported_by_the_cli_answers_like_the_torch_module_and_prints_no_noise(
        tmp_path, capfd, monkeypatch):
    """`redlens-compile export` of the bundled model: its stderr holds no torchvision notice and no
    FutureWarning of torch's exporter, and onnxruntime answers a padded batch like the torch module."""
    import logging
    import sys
    import warnings

    import redlens_compile.api
    from redlens_compile.cli import main
    from redlens_compile.exporters.onnx import _REGISTRATION_LOGGER
    from redlens_compile.loading import load_model_dir
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR
    from redlens_compile.models.evaluate import encode_questions
    from redlens_compile.models.shapes_task import heldout_questions

    made = []
    optimize = redlens_compile.api.optimize
    monkeypatch.setattr(redlens_compile.api, "optimize", lambda *a, **k: made.append(optimize(*a, **k)) or made[-1])
    out = tmp_path / "onnx"
    # Under pytest, torch's log handler writes to pytest's own capture and warnings are recorded by
    # pytest: a handler on stderr and a recorder put both back where a user sees them.
    registration = logging.getLogger(_REGISTRATION_LOGGER)
    to_stderr = logging.StreamHandler(sys.stderr)
    registration.addHandler(to_stderr)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            assert main(["export", str(SHIPPED_MODEL_DIR), "--config",
                         json.dumps(CONFIGS["budget-0.5+random-0.25"].to_dict()), "--out", str(out),
                         "--max-new-tokens", "3"]) == 0
    finally:
        registration.removeHandler(to_stderr)
    printed = capfd.readouterr()
    stderr = printed.err + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown)
    noise = [line for line in stderr.splitlines() if "torchvision" in line or "FutureWarning" in line]
    assert noise == []
    assert "same tokens" in printed.out
    (opt,) = made
    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    runner = OnnxRunner(out)  # a LLaVA: no torch model needed
    items = heldout_questions(3)
    batch = encode_questions(processor, [image for image, _ in items[1:]], [qa.question for _, qa in items[1:]])
    assert_same_as_torch(opt, runner, batch)


def test_the_exporter_filter_drops_only_the_exporters_own_noise(caplog):
    import logging
    import warnings

    from redlens_compile.exporters.onnx import _REGISTRATION_LOGGER, _quiet_exporter

    registration = logging.getLogger(_REGISTRATION_LOGGER)
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING, logger=_REGISTRATION_LOGGER):
        warnings.simplefilter("always")
        with _quiet_exporter():
            registration.warning("torchvision is not installed. Skipping torchvision::nms")
            registration.warning("an op could not be registered")
            warnings.warn("LeafSpec is deprecated", FutureWarning)
            warnings.warn("a warning that matters", UserWarning)
        registration.warning("torchvision is not installed. Skipping torchvision::nms")  # outside: shown again
        warnings.warn("outside", FutureWarning)
    assert [str(w.message) for w in shown] == ["a warning that matters", "outside"]
    assert [r.getMessage() for r in caplog.records] == ["an op could not be registered",
                                                        "torchvision is not installed. Skipping torchvision::nms"]
    assert registration.filters == []


def test_the_exported_prefill_carries_the_rewrites(family_models, tmp_path):
    model = family_models("llava")
    # per-layer settings near what a 0.5 budget plans here (0.158 / 0.067 w8 / 0.0625 w8), given: no ranking trials
    plan = {0: {"ffn_keep": 0.16, "hollow_window": None}, 1: {"ffn_keep": 0.07, "hollow_window": 8},
            2: {"ffn_keep": 0.0625, "hollow_window": 8}}
    opt = rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(layers=plan))
    out = opt.export_onnx(tmp_path / "onnx")
    graph = onnx.load(str(out / "decoder_prefill.onnx"), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    gathered = [node.input[0] for node in graph.node if node.op_type == "Gather" and node.input[0] in weights]
    sliced = [name for name in gathered if ".mlp." in name]
    # the down weights are stored transposed once by the lowering (exporters/onnx_lowering.py): row gathers
    transposed_down = [name for name in gathered if name.split(".")[-1].startswith("redlens_onnx_transposed_")]
    settings = opt.report.plan["settings"]
    ffn_layers = [i for i in opt.report.chosen_layers if settings[str(i)]["ffn_keep"] < 1]
    hollow_layers = [i for i in opt.report.chosen_layers if settings[str(i)]["window"] is not None]
    assert ffn_layers and hollow_layers
    # the gate, up and down weights sliced to the probe-selected channels in every FFN-reduced layer
    assert sorted(sliced) == sorted(f"graph_module.language_model.layers.{i}.mlp.{w}_proj.weight"
                                    for i in ffn_layers for w in ("gate", "up"))
    assert len(set(transposed_down)) == len(ffn_layers)
    assert not any(f"layers.{i}.mlp.down_proj.weight" in name for name in weights for i in ffn_layers)
    # hollow attention stays blockwise: text queries and visual query blocks are two softmaxes in a
    # hollow layer; elsewhere the causal family's attention is CAUSAL_CHUNKS query chunks, a softmax each
    from redlens_compile.ops.causal_attention import CAUSAL_CHUNKS

    full = opt.num_layers - len(hollow_layers)
    assert [node.op_type for node in graph.node].count("Softmax") == full * CAUSAL_CHUNKS + 2 * len(hollow_layers)
    manifest = json.loads((out / "redlens.json").read_text())
    assert manifest["lowering"]["sdpa_causal_fast_path -> causal query chunks (the example's mask sees no later key)"] \
        == full and manifest["lowering"]["sdpa_causal_fast_path -> masked SDPA"] == 0
    assert manifest["lowering"]["hollow_attention, blockwise (looks-ahead decided by the family's masks)"] == \
        len(hollow_layers)
    assert [i.name for i in graph.input] == ["inputs_embeds", "attention_mask", "position_ids", "visual_mask"]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    step = onnx.load(str(out / "decoder_step.onnx"), load_external_data=False).graph
    assert [i.name for i in step.input][4:6] == ["past_key_values.0.key", "past_key_values.0.value"]


def test_bad_targets_and_untranslatable_ops_fail_cleanly(identity_optimized, tmp_path):
    model, example, opt = identity_optimized("llava")
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "decoder_prefill.onnx").write_text("old")
    with pytest.raises(rc.ExportError, match="already holds files"):
        opt.export_onnx(stale)
    assert [p.name for p in stale.iterdir()] == ["decoder_prefill.onnx"]
    with pytest.raises(rc.ExportError, match="is not writable|cannot be written"):
        opt.export_onnx(f"/proc/self/redlens-onnx-{os.getpid()}")  # read-only for every user, root included

    # a graph holding an op with no ONNX translation (a stable sort)
    broken = rc.optimize(model, example, config=rc.RedLensConfig.identity())
    graph = broken.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    visual = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "visual_mask")
    logits = output.args[0][0]
    with graph.inserting_before(output):
        as_int = graph.call_function(torch.ops.aten._to_copy.default, (visual,), {"dtype": torch.int8})
        ordered = graph.call_function(torch.ops.aten.sort.stable, (as_int,), {"stable": True, "dim": 1})
        values = graph.call_function(torch.ops.aten.sum.default, (graph.call_function(operator.getitem, (ordered, 0)),))
        zero = graph.call_function(torch.ops.aten.mul.Tensor, (values, 0))
        new_logits = graph.call_function(torch.ops.aten.add.Tensor, (logits, zero))
    output.args = ((new_logits, *output.args[0][1:]),)
    broken.graph_module.recompile()
    target = tmp_path / "broken"
    with pytest.raises(rc.ExportError, match="no ONNX translation.*sort"):
        broken.export_onnx(target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".broken")] == []  # no scratch folder left
