"""OnnxRunner: provider choice, checks on the folder and the model, greedy generation that stops
at the end token and pads finished rows as transformers does."""

import copy
import json

import pytest
import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.exporters.ort_runner import OnnxRunner, pick_providers


def test_cuda_is_picked_where_present_else_the_cpu_and_an_unavailable_one_is_named(monkeypatch):
    import onnxruntime as ort

    # what this machine has: CUDA first where onnxruntime-gpu sees a GPU, the CPU always last
    picked = pick_providers()
    assert picked[-1] == "CPUExecutionProvider"
    assert picked[:-1] == (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
    # both machines' answers, whichever this one is
    for available, want in ((["CPUExecutionProvider"], ["CPUExecutionProvider"]),
                            (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                             ["CUDAExecutionProvider", "CPUExecutionProvider"])):
        monkeypatch.setattr(ort, "get_available_providers", lambda available=available: available)
        assert pick_providers() == want
    monkeypatch.undo()
    with pytest.raises(rc.ExportError, match="NoSuchExecutionProvider"):
        pick_providers(["NoSuchExecutionProvider"])


def test_runner_checks_the_folder_and_the_model(identity_optimized, family_models, tmp_path):
    model, _, opt = identity_optimized("llava")
    with pytest.raises(rc.ExportError, match="no readable redlens.json"):
        OnnxRunner(tmp_path, model)
    out = opt.export_onnx(tmp_path / "onnx")
    with pytest.raises(rc.ExportError, match="exported from LlavaForConditionalGeneration"):
        OnnxRunner(out, family_models("internvl"))
    manifest = json.loads((out / "redlens.json").read_text())
    (out / "redlens.json").write_text(json.dumps(dict(manifest, format="other/1")))
    with pytest.raises(rc.ExportError, match="format 'other/1'"):
        OnnxRunner(out, model)
    (out / "redlens.json").write_text(json.dumps(manifest))
    # a model of the same class with other weights: refused (its vision part would run in torch)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.01)
    with pytest.raises(rc.ExportError, match="other weights than the one the files were exported from"):
        OnnxRunner(out, other)

    runner = OnnxRunner(out, copy.deepcopy(model))  # the same weights in another object: accepted
    batch = make_inputs("llava", model, batch=2, pad_left=(1,), seed=8)
    free = runner.generate(batch, max_new_tokens=4, eos_token_id=[])
    # row 0's second new token as the end token: row 0 stops there and is padded after it
    eos = int(free[0, -3])
    stopped = runner.generate(batch, max_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    want = opt.generate(**batch, max_new_tokens=4, eos_token_id=eos, pad_token_id=0, do_sample=False)
    assert torch.equal(stopped, want)
    # what stopping means, written out from the free run: each row keeps its tokens up to and
    # including its first end token, then pads (a row that never meets it runs to the end)
    for row in range(2):
        new = free[row, -4:].tolist()
        cut = new.index(eos) + 1 if eos in new else 4
        assert stopped[row, -4:].tolist() == new[:cut] + [0] * (4 - cut), (row, new)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        runner.generate(batch, max_new_tokens=0)


def test_onnxruntime_optimized_files_beside_the_standard_ones(family_models, tmp_path):
    """ort_optimized=True: the decoder graphs also as onnxruntime's offline-optimized CPU files, named
    in both manifests; the runner runs them on request, with the standard files' logits (1e-4)."""
    import numpy as np

    from redlens_compile.files import OUTPUTS_MANIFEST

    model = family_models("llava")
    opt = rc.optimize(model, make_inputs("llava", model),
                      config=rc.RedLensConfig(layers="all", hollow_window=12, ffn_keep=0.5))
    out = opt.export_onnx(tmp_path / "onnx", ort_optimized=True)
    manifest = json.loads((out / "redlens.json").read_text())
    graphs = manifest["graphs"]
    # the same folder as a standard export's manifest would describe it: optimized=True is refused
    (out / "redlens.json").write_text(json.dumps(dict(manifest, graphs={
        name: {k: v for k, v in g.items() if k != "optimized"} for name, g in graphs.items()})))
    with pytest.raises(rc.ExportError, match="no onnxruntime-optimized graph for CPUExecutionProvider"):
        OnnxRunner(out, model, optimized=True)
    (out / "redlens.json").write_text(json.dumps(manifest))
    listed = json.dumps(json.loads((out / OUTPUTS_MANIFEST).read_text())["files"])
    for name, file in (("decoder_prefill", "decoder_prefill.ort-cpu.onnx"), ("decoder_step", "decoder_step.ort-cpu.onnx")):
        assert graphs[name]["optimized"]["CPUExecutionProvider"]["file"] == file and (out / file).is_file()
        assert file in listed and graphs[name]["file"] in listed
    assert "optimized" not in graphs["embed_tokens"]
    standard, fused = OnnxRunner(out, model), OnnxRunner(out, model, optimized=True)
    assert fused.files["decoder_prefill"] == "decoder_prefill.ort-cpu.onnx"
    assert standard.files["decoder_prefill"] == "decoder_prefill.onnx"
    batch = make_inputs("llava", model, batch=2, pad_left=(2,), seed=5)
    real = batch["attention_mask"].bool().numpy()
    want, got = standard(**batch), fused(**batch)
    assert np.abs(got - want)[real].max() <= 1e-4
    assert torch.equal(fused.generate(batch, max_new_tokens=3, eos_token_id=[]),
                       standard.generate(batch, max_new_tokens=3, eos_token_id=[]))
