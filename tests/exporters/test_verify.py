"""exporters/verify.py check_onnx, called from Python: onnxruntime against the torch module, and a
torch side with a known difference measured as that difference."""

import copy

import pytest

from redlens_compile.exporters.verify import check_onnx


class _Shifted:
    """The optimized model with 0.5 added to one logit and generate's last token changed; its
    export_onnx writes nothing (the real model's files are already in the folder)."""

    def __init__(self, opt):
        self.opt = opt

    def export_onnx(self, *args, **kwargs):
        return None

    def __call__(self, **inputs):
        out = copy.copy(self.opt(**inputs))
        out.logits = out.logits.clone()
        out.logits[..., 0] += 0.5
        return out

    def generate(self, **kwargs):
        ids = self.opt.generate(**kwargs).clone()
        ids[:, -1] += 1
        return ids


def test_check_onnx_compares_onnxruntime_with_torch(identity_optimized, tmp_path):
    import onnxruntime as ort

    model, example, opt = identity_optimized("llava")
    out = tmp_path / "onnx"
    check = check_onnx(opt, model, example, out, max_new_tokens=2)
    assert check["onnx_provider"] in ort.get_available_providers()
    assert check["onnx_vision_runs_in"] in ("onnxruntime", "torch")
    assert check["onnx_max_abs_logit_diff"] <= 1e-4 and check["onnx_generated_tokens_equal"] is True
    assert (out / "decoder_prefill.onnx").is_file() and (out / "decoder_step.onnx").is_file()
    shifted = check_onnx(_Shifted(opt), model, example, out, max_new_tokens=2)
    assert shifted["onnx_max_abs_logit_diff"] == pytest.approx(0.5, abs=1e-4)
    assert shifted["onnx_generated_tokens_equal"] is False
