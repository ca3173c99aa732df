"""Expose layer K's attention of the last query as an extra graph output (FastV's selection signal).

The layer's SDPA call keeps running as before; a node beside it recomputes the last query's
softmax row from the same query, key and mask (ops.token_pruning.last_query_attention), and the
graph returns it after its other outputs. Under SDPA no attention map exists to read, and an
eager-attention model is not needed: the graph computes the one row it needs.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ops.token_pruning import last_query_attention
from .hollow_attention import sdpa_arguments
from .infra import RedLensPass
from .selectors import append_output, attention_core, call_like


class LastQueryAttentionPass(RedLensPass):
    runs_after = ("StripAssertsPass",)

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        if any(n.target is last_query_attention for n in graph.nodes):
            return PassResult(graph_module, False)
        core = attention_core(graph_module, self.layer)
        if core is None:
            raise ValueError(f"layer {self.layer} has no single SDPA call to read the attention of the last query from")
        args = sdpa_arguments(core)
        with graph.inserting_after(core):
            scores = call_like(graph, core, last_query_attention, (args["query"], args["key"], args.get("attn_mask")),
                               dict(scale=args.get("scale"), enable_gqa=bool(args.get("enable_gqa", False))))
        append_output(graph_module, scores)
        graph_module.recompile()
        return PassResult(graph_module, True)
