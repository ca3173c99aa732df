"""ops.thin_linear: F.linear's numbers in the output-features-major orientation for thin row counts."""

import pytest
import torch
import torch.nn.functional as F

from redlens_compile.ops.thin_linear import ROW_ALIGN, THIN_ROWS, thin_linear


def _weights(out_features: int, in_features: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    return w, (torch.randn(out_features, generator=g) if bias else None), g


@pytest.mark.parametrize("rows", [THIN_ROWS[0], 67, 128, 200, THIN_ROWS[1]])
@pytest.mark.parametrize("shape", [(448, 96), (96, 448)])
def test_thin_rows_take_the_transposed_product_with_f_linear_numbers(rows, shape):
    w, _, g = _weights(*shape, bias=False)
    x = torch.randn(rows, shape[1], generator=g)
    with torch.no_grad():
        got, want = thin_linear(x, w), F.linear(x, w)
    assert got.shape == want.shape
    assert got.stride(0) == 1  # the output-features-major path ran (rows padded to ROW_ALIGN)
    assert got.stride(1) == rows + (-rows % ROW_ALIGN)
    # The same dot products: bit-equal with MKL from 64 rows up (what the dynamic FFN's text rows rely on).
    assert torch.equal(got, want)


def test_batched_input_bias_and_views_downstream():
    w, b, g = _weights(40, 24, bias=True)
    x = torch.randn(3, 30, 24, generator=g)  # 90 rows in all
    with torch.no_grad():
        got = thin_linear(x, w, b)
    want = F.linear(x, w, b)
    assert got.shape == (3, 30, 40) and got.stride(-1) != 1
    assert (got - want).abs().max().item() <= 1e-5
    # what the decoder does next with a projection: split heads, transpose, elementwise
    heads = got.view(3, 30, 5, 8).transpose(1, 2)
    assert (heads - want.view(3, 30, 5, 8).transpose(1, 2)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rows", [1, THIN_ROWS[0] - 1, THIN_ROWS[1] + 1])
def test_outside_the_thin_range_it_is_f_linear(rows):
    w, b, g = _weights(32, 16, bias=True)
    x = torch.randn(rows, 16, generator=g)
    with torch.no_grad():
        got = thin_linear(x, w, b)
    assert got.is_contiguous() and torch.equal(got, F.linear(x, w, b))


def test_autograd_and_tracing_see_f_linear():
    w, b, g = _weights(32, 16, bias=True)
    w.requires_grad_(True)
    x = torch.randn(100, 16, generator=g)
    out = thin_linear(x, w, b)  # grad mode: the plain op, differentiable
    assert out.is_contiguous()
    out.sum().backward()
    assert torch.allclose(w.grad, x.sum(0).expand(32, 16))
    with torch.no_grad():
        plain = w.detach()
        traced = torch.jit.trace(lambda a: thin_linear(a, plain, b), (x,))
    assert "aten::linear" in str(traced.graph) and "aten::mm" not in str(traced.graph)
