import torch
from torch import nn

from redlens_compile.passes import DeadCodeEliminationPass, StripAssertsPass, run_passes
from redlens_compile.passes.strip_asserts import ASSERT_TARGETS


class DataDependentCheck(nn.Module):
    """Like the image-token count check: a value read from data, then asserted on."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        count = mask.sum().item()
        torch._check(count <= x.shape[0])
        return x * 2 + mask.to(x.dtype)[:, None]


def count_asserts(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in ASSERT_TARGETS)


def exported():
    args = (torch.randn(6, 3), torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool))
    return torch.export.export(DataDependentCheck(), args, strict=False).module(), args


def test_strip_asserts_removes_runtime_asserts_and_keeps_numbers():
    gm, args = exported()
    expected = DataDependentCheck()(*args)
    assert count_asserts(gm) > 0
    result = StripAssertsPass()(gm)
    assert result.modified
    assert count_asserts(result.graph_module) == 0
    result.graph_module.recompile()
    torch.testing.assert_close(result.graph_module(*args), expected, rtol=0, atol=0)
    again = StripAssertsPass()(result.graph_module)
    assert not again.modified


def test_dead_code_removes_what_the_asserts_read():
    gm, args = exported()
    gm, records = run_passes(gm, [StripAssertsPass(), DeadCodeEliminationPass()])
    assert [r.name for r in records] == ["StripAssertsPass", "DeadCodeEliminationPass"]
    assert all(r.modified for r in records)
    assert records[1].nodes_after < records[1].nodes_before
    # the .item() that only fed the assert is gone
    assert not any(n.target == torch.ops.aten._local_scalar_dense.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args), DataDependentCheck()(*args), rtol=0, atol=0)
    _, second = run_passes(gm, [StripAssertsPass(), DeadCodeEliminationPass()])
    assert not any(r.modified for r in second)
