"""A per-key attention bias as a fifth graph input (`key_bias` [B, S]), added to every SDPA's mask.

Token pruning with proportional attention sets it: a kept visual row that stands for m rows
gets log(m) on its scores in every layer, so the dropped rows' softmax mass is not lost (see
ops.token_pruning.proportional_key_bias). The pass wraps each distinct mask that feeds an aten
SDPA call in ops.token_pruning.key_biased_mask (the family's mask, now additive, plus the bias).
Run after the reduction passes (declared: runs_after): hollow attention layers read the family's
bool mask and do not see the bias (the report says so). A mask-free SDPA (is_causal) is left as
it is. The layers whose attention takes the bias come back in the result's findings
("key_bias_layers"): decode steps apply the same bias in the same layers.
"""

from __future__ import annotations

from torch import fx

from ..capture.annotate import ATTENTION_CORE_TARGETS, annotation
from ..ops.token_pruning import key_biased_mask
from .hollow_attention import sdpa_arguments
from .infra import RedLensPass, RedLensPassResult
from .selectors import add_input, call_like

KEY_BIAS_INPUT = "key_bias"


def biased_layers(graph_module: fx.GraphModule) -> list[int]:
    """The layers whose attention reads the key bias (their SDPA mask is a key_biased_mask)."""
    return sorted({a.layer for n in graph_module.graph.nodes
                   if n.op == "call_function" and n.target in ATTENTION_CORE_TARGETS
                   and isinstance(mask := sdpa_arguments(n).get("attn_mask"), fx.Node) and mask.target is key_biased_mask
                   and (a := annotation(n)) is not None and a.layer is not None})


class KeyBiasPass(RedLensPass):
    runs_after = ("DynamicFFNPass", "HollowAttentionPass")

    def call(self, graph_module: fx.GraphModule) -> RedLensPassResult:
        graph = graph_module.graph
        if any(n.op == "placeholder" and n.name == KEY_BIAS_INPUT for n in graph.nodes):
            return RedLensPassResult(graph_module, False, {"key_bias_layers": biased_layers(graph_module)})
        cores = [n for n in graph.nodes if n.op == "call_function" and n.target in ATTENTION_CORE_TARGETS
                 and isinstance(sdpa_arguments(n).get("attn_mask"), fx.Node)]
        bias = add_input(graph_module, KEY_BIAS_INPUT)
        layers = sorted({a.layer for c in cores if (a := annotation(c)) is not None and a.layer is not None})
        biased: dict[fx.Node, fx.Node] = {}
        for core in cores:
            mask = sdpa_arguments(core)["attn_mask"]
            if mask not in biased:
                with graph.inserting_after(mask):
                    biased[mask] = call_like(graph, mask, key_biased_mask, (mask, bias))
            core.replace_input_with(mask, biased[mask])
        graph_module.recompile()
        return RedLensPassResult(graph_module, True, {"key_bias_layers": layers})
