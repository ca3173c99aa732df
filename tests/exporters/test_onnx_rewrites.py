"""onnx_rewrites: the RMS norm's reciprocal product becomes the division onnxruntime fuses."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from redlens_compile.exporters.onnx_rewrites import rewrite_file


class Norms(nn.Module):
    """Two RMS norms as decoders write them, and an rsqrt whose value is read twice (left alone)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.w1 = nn.Parameter(torch.rand(width) + 0.5)
        self.w2 = nn.Parameter(torch.rand(width) + 0.5)

    @staticmethod
    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x):
        h = self.norm(x, self.w1)
        h = self.norm(h @ h.transpose(-1, -2) @ h, self.w2)
        shared = torch.rsqrt(h.abs() + 1.0)
        return h * shared + shared


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_reciprocal_products_become_divisions_that_onnxruntime_fuses(tmp_path):
    module, x = Norms().eval(), torch.randn(2, 5, 32)
    path = tmp_path / "norms.onnx"
    program = torch.onnx.export(module, (x,), input_names=["x"], dynamo=True, optimize=True, verbose=False)
    program.save(str(path), external_data=True)
    before = op_counts(path)
    assert before["Reciprocal"] == 3

    counts = rewrite_file(path)
    assert counts == {"reciprocal products as divisions": 2}  # the shared rsqrt has two readers: kept
    after = op_counts(path)
    assert after["Reciprocal"] == 1 and after["Div"] == before["Div"] + 2
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        want = module(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5

    optimized = tmp_path / "norms.opt.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert op_counts(optimized)["SimplifiedLayerNormalization"] == 2

    assert rewrite_file(path) == {"reciprocal products as divisions": 0}  # a second run changes nothing
