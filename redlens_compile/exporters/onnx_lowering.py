"""Lowering of the project's runtime ops to forms torch.onnx can export.

The rewritten decoder holds ops that decide things in Python from data (is the mask exactly
causal? how many text keys does a block need?): fine for eager torch, not for a graph whose
shapes are symbolic. This pass replaces them, in a copy of the graph, with the equal
computation in exportable ops, and records what it did for the manifest:

- `sdpa_causal_fast_path` -> SDPA over the mask (the same numbers; ORT has no is_causal switch
  driven by data), decomposed by `sdpa_decomposed` (a bool mask as the lowest finite score, no NaN
  guard over the scores, no keys expanded to every query head); where the family's image tokens do not look ahead and the example's mask at
  that call lets no query see a later key (causal, padded, sliding), `sdpa_causal_chunks`: query
  blocks against the keys up to their last row, 5/8 of the full S x S scores (onnxruntime computes
  every score of a masked SDPA, and the full mask's Add cost as much as the QK matmul in its profile).
- `hollow_attention` keeps its blockwise computation; the two run-time decisions of its
  `hollow_plan` become static: the mask is read entry by entry (no causal shortcut), and
  whether an image's tokens look ahead is what the family's masks say (image blocks attending
  both ways, or causal), not a check of the data. Block sizes stay sizes read from data (ops/rows.py `data_size`), which
  the ONNX graph computes at run time. Its visual blocks stack the query heads of each key head
  as rows (`stack_heads`): torch.onnx lowers enable_gqa to an Expand of the blocks' keys and
  values to every query head and a transpose of that copy, which cost the layer's attention
  several times its FLOPs in onnxruntime's profile.
- The dynamic FFN's down weight [D, F] is stored transposed ([F, D], once, at export): the
  per-call channel slice becomes a gather of whole rows (a Gather along the columns of [D, F]
  cost as much as a third of the sliced matmul it feeds), and the text rows' projection reads
  the same [F, D] weight as a plain MatMul (the text rows stacked over the routed probe rows),
  so the file holds that weight once.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from ..ops import dynamic_ffn as ffn_ops
from ..ops.causal_attention import (is_causal_mask, sdpa_causal_chunks, sdpa_causal_fast_path, sdpa_decomposed,
                                     sees_no_later_key)
from ..ops.hollow_attention import hollow_attention, hollow_plan, mask_looks_ahead
from ..ops.token_pruning import key_biased_mask
from ..passes.infra import RedLensPass, RedLensPassResult
from ..passes.selectors import attr_value, call_like, nodes_graph
from ..ops.thin_linear import thin_linear

_LINEARS = (torch.ops.aten.linear.default, F.linear, thin_linear, ffn_ops.split_linear)


def rows_of_transposed(weight_t: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """slice_in_features(weight, channels) of weight = weight_t.T [D, F]: rows of weight_t [F, D]
    at channels [B, K] -> [B, K, D], one Gather of whole rows."""
    return weight_t.index_select(0, channels.reshape(-1)).view(*channels.shape, weight_t.shape[1])


def linear_transposed(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                      *_text_rows) -> torch.Tensor:
    """F.linear(x, weight_t.T, bias) as x @ weight_t (weight_t [in, out])."""
    out = torch.matmul(x, weight_t)
    return out if bias is None else out + bias


def masks_without_later_keys(graph_module: fx.GraphModule, example_args: tuple) -> set[str]:
    """Names of the mask nodes of the causal fast path calls whose example value lets no query see a
    later key (the masks alone computed on the example, not the whole graph)."""
    masks = list(dict.fromkeys(n.args[3] for n in graph_module.graph.nodes if n.op == "call_function"
                               and n.target is sdpa_causal_fast_path and isinstance(n.args[3], fx.Node)))
    if not masks:
        return set()
    with torch.no_grad():
        values = nodes_graph(graph_module, masks)(*example_args)
    # square: the queries are the keys' rows (chunk j's keys end where its queries do)
    return {mask.name for mask, value in zip(masks, values)
            if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == value.shape[-2]
            and sees_no_later_key(value)}


@dataclass
class LoweringRecord:
    causal_chunks: int = 0
    causal_fast_path: int = 0
    hollow_blockwise: int = 0
    finite_key_bias: int = 0
    transposed_down_weights: int = 0
    notes: list[str] = field(default_factory=list)


class LowerForOnnxPass(RedLensPass):
    def __init__(self, looks_ahead: bool, example_args: tuple | None = None):
        super().__init__()
        self.looks_ahead = looks_ahead  # the family's image tokens see later image tokens (masks both ways)
        # the decoder inputs the graph is exported at: which masks let no query see a later key
        self.example_args = example_args

    def call(self, graph_module: fx.GraphModule) -> RedLensPassResult:
        """findings: "lowering", a LoweringRecord counting what was lowered."""
        graph = graph_module.graph
        modified = False
        record = LoweringRecord()
        no_later_keys = set() if self.looks_ahead or self.example_args is None else \
            masks_without_later_keys(graph_module, self.example_args)
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is sdpa_causal_fast_path:
                q, k, v, mask, _causal = node.args
                chunked = isinstance(mask, fx.Node) and mask.name in no_later_keys
                with graph.inserting_before(node):
                    if chunked:
                        new = call_like(graph, node, sdpa_causal_chunks, (q, k, v, mask),
                                        dict(node.kwargs, decomposed=True))
                    else:
                        new = call_like(graph, node, sdpa_decomposed, (q, k, v, mask), dict(node.kwargs))
                record.causal_fast_path += 1
                record.causal_chunks += chunked
            elif node.target is key_biased_mask and "blocked" not in node.kwargs:
                # The lowest finite score instead of -inf for blocked keys: a padded query row with no
                # key to attend stays finite (onnxruntime's softmax makes an all -inf row NaN, which
                # the next layer's values carry into real rows); real rows weigh them exp(-3e38) = 0.
                # None: the lowest finite value of the graph's own dtype (float32's is -inf in float16).
                node.kwargs = dict(node.kwargs, blocked=None)
                record.finite_key_bias += 1
                modified = True
                continue
            elif node.target is hollow_plan and (node.kwargs.get("mask_is_causal") is not False
                                                 or node.kwargs.get("looks_ahead") != self.looks_ahead):
                node.kwargs = dict(node.kwargs, mask_is_causal=False, looks_ahead=self.looks_ahead)
                modified = True
                continue
            elif node.target is hollow_attention and not node.kwargs.get("stack_heads"):
                node.kwargs = dict(node.kwargs, stack_heads=True)
                record.hollow_blockwise += 1
                modified = True
                continue
            else:
                continue
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
        modified |= self._transpose_down_weights(graph_module, record)
        for node in list(graph.nodes):  # the causal checks and layouts nothing reads any more
            if (node.op == "call_function" and node.target in (is_causal_mask, mask_looks_ahead, operator.getitem)
                    and not node.users):
                graph.erase_node(node)
        if modified:
            graph.eliminate_dead_code()
            graph_module.recompile()
        return RedLensPassResult(graph_module, modified, {"lowering": record})

    def _transpose_down_weights(self, graph_module: fx.GraphModule, record: LoweringRecord) -> bool:
        """Each weight the dynamic FFN slices by input features, as a transposed copy (a buffer of
        the lowered module, not of the model) read by row gathers and plain matmuls."""
        graph = graph_module.graph
        done = False
        for weight in [n for n in graph.nodes if n.op == "get_attr"]:
            users = list(weight.users)
            if not any(u.op == "call_function" and u.target is ffn_ops.slice_in_features for u in users):
                continue
            if not all(u.op == "call_function" and (u.target is ffn_ops.slice_in_features or
                                                    (u.target in _LINEARS and len(u.args) > 1 and u.args[1] is weight
                                                     and u.args[0] is not weight)) for u in users):
                continue  # another reader of the [D, F] layout: leave it (the numbers are the same)
            name = f"redlens_onnx_transposed_{len([b for b, _ in graph_module.named_buffers()])}"
            graph_module.register_buffer(name, attr_value(graph_module, weight).detach().t().contiguous())
            with graph.inserting_after(weight):
                transposed = graph.get_attr(name)
            for user in users:
                with graph.inserting_before(user):
                    if user.target is ffn_ops.slice_in_features:
                        new = call_like(graph, user, rows_of_transposed, (transposed, user.args[1]))
                    else:
                        bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
                        new = call_like(graph, user, linear_transposed, (user.args[0], transposed, bias))
                user.replace_all_uses_with(new)
                graph.erase_node(user)
            graph.erase_node(weight)
            record.transposed_down_weights += 1
            done = True
        return done
