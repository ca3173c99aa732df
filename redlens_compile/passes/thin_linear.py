"""Thin-linear lowering: every linear of the graph calls ops.thin_linear.

A reduction's saved FLOPs sit in GEMMs with fewer rows than the original's (the pruned
sequence; the text and probe rows of a reduced FFN); ops.thin_linear runs those in the
orientation the CPU's GEMM serves at full rate and is F.linear otherwise. A lowering, not a
reduction: the identity graph does not get it (it stays the family's own ops). Numerics: the
same dot products (bit-equal to F.linear where it was measured); later reductions' reductions
of a column-major output (norms) may round differently in the last bits.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ops.thin_linear import thin_linear
from .infra import RedLensPass

aten = torch.ops.aten


class ThinLinearPass(RedLensPass):
    runs_after = ("DynamicFFNPass",)  # the FFN rewrite matches the family's aten linears

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target == aten.linear.default:
                node.target = thin_linear  # same (x, weight, bias) arguments; meta stays
                modified = True
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified)
