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
