"""Lowering of the project's runtime ops to forms torch.onnx can export.

The rewritten decoder holds ops that decide things in Python from data (is the mask exactly
causal? how many text keys does a block need?): fine for eager torch, not for a graph whose
shapes are symbolic. This pass replaces them, in a copy of the graph, with the equal
computation in exportable ops, and records what it did for the manifest:

- `sdpa_causal_fast_path` -> SDPA over the mask (the same numbers; ORT has no is_causal switch
  driven by data).
- `hollow_attention` keeps its blockwise computation; its two run-time decisions become static:
  the mask is read entry by entry (no causal shortcut), and whether an image's tokens look
  ahead is what the family's masks say (image blocks attending both ways, or causal), not a
  check of the data. Block sizes stay sizes read from data (ops/rows.py `data_size`), which
  the ONNX graph computes at run time.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from ..ops.causal_attention import is_causal_mask, sdpa_causal_fast_path
from ..ops.hollow_attention import hollow_attention, mask_looks_ahead
from ..ops.token_pruning import key_biased_mask
from ..passes.infra import RedLensPass, RedLensPassResult
from ..passes.selectors import call_like


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)


@dataclass
class LoweringRecord:
    causal_fast_path: int = 0
    hollow_blockwise: int = 0
    finite_key_bias: int = 0
    notes: list[str] = field(default_factory=list)


class LowerForOnnxPass(RedLensPass):
    def __init__(self, looks_ahead: bool):
        super().__init__()
        self.looks_ahead = looks_ahead  # the family's image tokens see later image tokens (masks both ways)

    def call(self, graph_module: fx.GraphModule) -> RedLensPassResult:
        """findings: "lowering", a LoweringRecord counting what was lowered."""
        graph = graph_module.graph
        modified = False
        record = LoweringRecord()
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is sdpa_causal_fast_path:
                q, k, v, mask, _causal = node.args
                with graph.inserting_before(node):
                    new = call_like(graph, node, sdpa_masked, (q, k, v, mask), dict(node.kwargs))
                record.causal_fast_path += 1
            elif node.target is key_biased_mask and "blocked" not in node.kwargs:
                # The lowest finite score instead of -inf for blocked keys: a padded query row with no
                # key to attend stays finite (onnxruntime's softmax makes an all -inf row NaN, which
                # the next layer's values carry into real rows); real rows weigh them exp(-3e38) = 0.
                # None: the lowest finite value of the graph's own dtype (float32's is -inf in float16).
                node.kwargs = dict(node.kwargs, blocked=None)
                record.finite_key_bias += 1
                modified = True
                continue
            elif node.target is hollow_attention and (node.kwargs.get("mask_is_causal") is not False
                                                      or node.kwargs.get("looks_ahead") != self.looks_ahead):
                node.kwargs = dict(node.kwargs, mask_is_causal=False, looks_ahead=self.looks_ahead)
                record.hollow_blockwise += 1
                modified = True
                continue
            else:
                continue
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
        for node in list(graph.nodes):  # the causal checks and layouts nothing reads any more
            if (node.op == "call_function" and node.target in (is_causal_mask, mask_looks_ahead, operator.getitem)
                    and not node.users):
                graph.erase_node(node)
        if modified:
            graph.eliminate_dead_code()
            graph_module.recompile()
        return RedLensPassResult(graph_module, modified, {"lowering": record})
