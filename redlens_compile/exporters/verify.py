"""The ONNX files checked against the torch module they were exported from.

What `redlens-compile export` and `demo` report, callable from Python: the optimized model is
exported, onnxruntime runs the files (OnnxRunner) on the same prompt, and the last-position
logits and greedy generate are compared with the torch module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .ort_runner import OnnxRunner


def check_onnx(optimized: Any, model: Any, inputs: Mapping[str, Any], onnx_dir: Path, max_new_tokens: int,
               dtype: str | None = None) -> dict[str, Any]:
    """Export `optimized` (its export_onnx) into `onnx_dir` and compare onnxruntime with torch:
    {"onnx_provider", "onnx_vision_runs_in", "onnx_max_abs_logit_diff" (last position, float32),
    "onnx_generated_tokens_equal" (`max_new_tokens` greedy tokens)}. `model` serves only what the
    files leave to torch (the vision part where it does not export)."""
    optimized.export_onnx(onnx_dir, inputs, dtype=dtype)
    runner = OnnxRunner(onnx_dir, model)
    with torch.no_grad():
        want = optimized(**inputs).logits[:, -1]
    got = runner(**inputs)[:, -1]
    ids = optimized.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ort_ids = runner.generate(inputs, max_new_tokens=max_new_tokens)
    return {"onnx_provider": runner.provider, "onnx_vision_runs_in": runner.manifest["front"]["runs_in"],
            "onnx_max_abs_logit_diff": float(abs(got.astype("float32") - want.float().cpu().numpy()).max()),
            "onnx_generated_tokens_equal": bool(torch.equal(ids, ort_ids))}
