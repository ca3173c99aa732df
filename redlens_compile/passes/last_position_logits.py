"""Logits for the last position only: what a generate prefill needs (transformers does the same).

The lm_head reads the final hidden state sliced to its last row, so a prefill no longer pays
S x vocab x D for logits it throws away. The compile step (compile.py) applies it to a copy of
the last decoder graph: CompiledDecoder.prefill_graph, what OptimizedModel.generate runs;
`forward` keeps logits for every position.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .infra import RedLensPass
from .selectors import call_like, has_role, is_linear

aten = torch.ops.aten


def lm_head_node(gm: fx.GraphModule) -> fx.Node | None:
    heads = [n for n in gm.graph.nodes if is_linear(n) and has_role(n, "lm_head")]
    return heads[0] if len(heads) == 1 else None


def _reads_last_position(node: fx.Node) -> bool:
    hidden = node.args[0]
    return isinstance(hidden, fx.Node) and hidden.target == aten.slice.Tensor and hidden.args[1:3] == (1, -1)


class LastPositionLogitsPass(RedLensPass):
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        head = lm_head_node(graph_module)
        if head is None or _reads_last_position(head):
            return PassResult(graph_module, False)
        with graph_module.graph.inserting_before(head):
            last = call_like(graph_module.graph, head, aten.slice.Tensor, (head.args[0], 1, -1))
        head.replace_input_with(head.args[0], last)
        graph_module.recompile()
        return PassResult(graph_module, True)
