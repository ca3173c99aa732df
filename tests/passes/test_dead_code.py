"""DeadCodeEliminationPass: unused pure nodes go, used ones stay; a second run changes nothing."""

import torch
from torch import fx

from redlens_compile.passes import DeadCodeEliminationPass, run_passes


def test_dead_code_elimination():
    graph = fx.Graph()
    x = graph.placeholder("x")
    used = graph.call_function(torch.ops.aten.relu.default, (x,))
    graph.call_function(torch.ops.aten.neg.default, (x,))  # nobody reads it
    graph.output(used)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    gm, records = run_passes(gm, [DeadCodeEliminationPass()])
    assert records[0].modified and records[0].nodes_after == records[0].nodes_before - 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.aten.relu.default]
    assert torch.equal(gm(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    _, again = run_passes(gm, [DeadCodeEliminationPass()])
    assert not again[0].modified
