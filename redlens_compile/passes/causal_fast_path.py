"""Causal fast path: SDPA calls whose mask is exactly causal at run time take `is_causal=True`.

Rewrites every remaining aten SDPA call that has a mask tensor (reduced layers are already
hollow attention) into ops.causal_attention.sdpa_causal_fast_path; one `is_causal_mask` node
per distinct mask checks it once per forward. Numbers are those of eager transformers, which
takes the same path when nothing is padded, up to rounding. Keys and values repeated for
grouped-query attention (repeat_kv) are read unrepeated, with enable_gqa=True.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..capture.annotate import ATTENTION_CORE_TARGETS
from ..ops.causal_attention import sdpa_causal_fast_path
from .hollow_attention import sdpa_arguments
from .infra import RedLensPass
from .selectors import call_like, causal_check, unrepeated_kv


class CausalFastPathPass(RedLensPass):
    # the passes that read or replace an aten SDPA call (or its mask) see it before it is rewritten
    runs_after = ("HollowAttentionPass", "KeyBiasPass", "LastQueryAttentionPass")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in ATTENTION_CORE_TARGETS:
                continue
            args = sdpa_arguments(node)
            mask = args.get("attn_mask")
            if not isinstance(mask, fx.Node) or args.get("is_causal") or args.get("dropout_p", 0.0):
                continue
            k, v, gqa = args["key"], args["value"], bool(args.get("enable_gqa", False))
            if unrepeated_kv(k) is not None and unrepeated_kv(v) is not None:
                k, v, gqa = unrepeated_kv(k), unrepeated_kv(v), True  # no H / H_kv copies of K and V
            with graph.inserting_before(node):
                new = call_like(graph, node, sdpa_causal_fast_path, (args["query"], k, v, mask, causal_check(graph, mask)),
                                dict(scale=args.get("scale"), enable_gqa=gqa))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified)
