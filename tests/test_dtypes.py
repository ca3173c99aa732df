"""Half precision end to end: bf16 and fp16 through optimize, forward, generate, pruning, the
codebook build and the ONNX export (fp16 files; a bf16 model's files hold what the flag says)."""

import json

import numpy as np
import pytest
import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.errors import ExportError
from redlens_compile.api import at_dtype
from redlens_compile.exporters.onnx import export_dtype
from redlens_compile.exporters.ort_runner import OnnxRunner

DTYPES = [torch.bfloat16, torch.float16]
NEW_TOKENS = 4
REDUCED = {"budget-0.5": dict(flops_budget=0.5), "random-0.25": dict(flops_budget=1.0, prune="random", prune_keep=0.25)}


@pytest.fixture(scope="module")
def proof_model():
    from redlens_compile.loading import load_model_dir
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR
    from redlens_compile.models.evaluate import encode_questions
    from redlens_compile.models.shapes_task import heldout_questions

    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    image, qa = heldout_questions(1)[0]
    return model, encode_questions(processor, [image], [qa.question])


def _half(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype).eval()


def _check_dtype(model, inputs, dtype, reduced=tuple(REDUCED)):
    """Identity bit-exact against the model in the same dtype; the reductions run and generate."""
    with torch.no_grad():
        want = model(**inputs).logits
    assert want.dtype == dtype
    opt = rc.optimize(model, inputs, config=rc.RedLensConfig.identity())
    got = opt(**inputs).logits
    assert got.dtype == dtype and torch.equal(got, want)
    ours = opt.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    theirs = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    assert torch.equal(ours, theirs)
    for name in reduced:
        opt = rc.optimize(model, inputs, config=rc.RedLensConfig(**REDUCED[name]))
        logits = opt(**inputs).logits
        assert logits.dtype == dtype and torch.isfinite(logits[:, -1]).all(), name
        ids = opt.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
        assert ids.shape == theirs.shape, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_tiny_family_in_half_precision(family_models, dtype):
    model = _half(family_models("llava"), dtype)
    _check_dtype(model, make_inputs("llava", model, batch=2, pad_left=(2,)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_proof_model_in_half_precision(proof_model, dtype):
    model, inputs = proof_model
    _check_dtype(_half(model, dtype), inputs, dtype, reduced=["budget-0.5"])  # pruning: the tiny family's test


def test_what_the_onnx_files_hold_is_decided_before_any_work(family_models, tmp_path):
    assert export_dtype(torch.bfloat16, None) == torch.float32  # onnxruntime's CPU provider has no bf16 kernels
    assert export_dtype(torch.bfloat16, "float16") == torch.float16
    assert export_dtype(torch.float16, None) == torch.float16 and export_dtype(torch.float32, None) == torch.float32
    model = _half(family_models("llava"), torch.bfloat16)
    opt = rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig.identity())
    for bad in ("bfloat16", torch.bfloat16, "int8"):
        with pytest.raises(ExportError, match="float32 or float16"):
            opt.export_onnx(tmp_path / "onnx", dtype=bad)
        assert not (tmp_path / "onnx").exists()
    # the default for a bf16 model: the same plan rebuilt in float32
    rebuilt = at_dtype(opt, torch.float32, opt.example_inputs)
    assert rebuilt.model.dtype == torch.float32 and opt.model.dtype == torch.bfloat16
    with torch.no_grad():
        want = rebuilt.model(**opt.example_inputs).logits
    assert torch.equal(rebuilt(**opt.example_inputs).logits, want)  # identity stays exact in the rebuilt dtype


def test_a_bf16_model_exports_float16_files_that_onnxruntime_runs_like_torch(family_models, tmp_path):
    """fp16 graphs on onnxruntime's CPU provider, with random pruning (TopK in fp16, the key bias's
    lowest finite value in fp16): tokens equal to the torch module rebuilt in fp16."""
    model = _half(family_models("llava"), torch.bfloat16)
    example = make_inputs("llava", model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig(**REDUCED["random-0.25"]))
    out = opt.export_onnx(tmp_path / "onnx", dtype="float16")
    assert json.loads((out / "redlens.json").read_text())["dtype"] == "float16"
    runner = OnnxRunner(out, model)
    fp16 = at_dtype(opt, torch.float16, example)
    batch = make_inputs("llava", model, text_before=6, batch=2, pad_left=(2,), seed=3)
    with torch.no_grad():
        want = fp16(**batch).logits
    got = runner(**batch)
    assert got.dtype == np.float16 and np.isfinite(got[:, -1]).all()
    assert np.abs(got[:, -1].astype(np.float32) - want[:, -1].float().numpy()).max() <= 2e-2
    ours = fp16.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    assert torch.equal(runner.generate(batch, max_new_tokens=NEW_TOKENS, eos_token_id=[]), ours)
