"""Probe-activated dynamic FFN: visual rows of a reduced layer run through K of F channels.

For each reduced layer the FFN subgraph (entry -> up-side linears and their elementwise glue
-> down linear) is split by rows:
- text rows (gathered with the row layout) run through the original nodes, unchanged; M probe
  rows per sample are stacked under them up to the down projection (one full-width GEMM),
  and their activations score the channels (ops.dynamic_ffn.top_channels);
- the visual rows run through a copy of the glue whose linears use weights sliced to the K kept
  channels, per sample (gate, up and down all shrink: that is the saved work); with a "+route"
  probe rule the probe rows stay stacked under the text rows through the down projection too (one
  GEMM over the whole weight), and those rows take the full FFN's output;
- both halves go back into one [B, S, D] tensor.
The glue is copied, not recognised, so any activation (SiLU, GELU, gated or not) works. A fused
gate-up linear (one [2F, D] weight whose output the graph splits into gate and up) is sliced at the
same K channels in each of its F-wide row blocks, and the copied split cuts K-wide blocks.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from ..capture.annotate import META_KEY, annotation
from ..ops import dynamic_ffn as ops
from ..ops.rows import flatten_rows, gather_padded, merge_rows
from .infra import RedLensPass, RedLensPassResult
from .selectors import FFNMatch, attr_value, call_like, ffn_of_layer, layout_nodes, split_blocks

logger = logging.getLogger(__name__)

aten = torch.ops.aten
REWRITTEN = "redlens_rewritten"


@dataclass
class DynamicFFNPass(RedLensPass):
    """Rewrite the FFN of each layer in `keep` (layer -> fraction of channels kept for visual rows).

    probe_tokens: M, an int count or a fraction of each sample's visual rows (resolved at run time).
    probe_rule: how each sample's probe rows are chosen (ops.dynamic_ffn.PROBE_RULES); with "+route"
        the probe rows also take the full FFN's output.
    """

    keep: dict[int, float]
    probe_tokens: int | float = 0.1
    probe_rule: str = ops.DEFAULT_PROBE_RULE
    runs_after: ClassVar[tuple[str, ...]] = ("StripAssertsPass",)

    def call(self, graph_module: fx.GraphModule) -> RedLensPassResult:
        """findings: "skipped" (layer -> why its FFN was not rewritten)."""
        modified = False
        skipped: dict[int, str] = {}
        for layer, keep in sorted(self.keep.items()):
            match, why = ffn_of_layer(graph_module, layer)
            if match is None:
                skipped.setdefault(layer, why)
                continue
            if match.down.meta.get(REWRITTEN):
                continue
            self._rewrite(graph_module, match, keep)
            modified = True
        if modified:
            graph_module.recompile()
        return RedLensPassResult(graph_module, modified, {"skipped": skipped})

    def _rewrite(self, gm: fx.GraphModule, match: FFNMatch, keep: float) -> None:
        graph = gm.graph
        layout = layout_nodes(gm)
        width = _channels(gm, match)
        kept = kept_channels(keep, width)
        entry, down = match.entry, match.down
        users = [u for u in down.users]

        first = match.inner[0]
        with graph.inserting_before(first):
            text_rows = call_like(graph, first, aten.index_select.default,
                                  (call_like(graph, first, flatten_rows, (entry,), token_kind="text"), 0,
                                   layout["txt_flat"]), token_kind="text")
            visual_rows = call_like(graph, first, gather_padded, (entry, layout["vis_pos"]), token_kind="visual")
            probes = call_like(graph, first, ops.probe_rows,
                               (visual_rows, layout["vis_count"], self.probe_tokens, self.probe_rule), token_kind="visual")
            probe_x = call_like(graph, first, operator.getitem, (probes, 0), token_kind="visual")
            probe_valid = call_like(graph, first, operator.getitem, (probes, 1), token_kind="visual")
            probe_index = call_like(graph, first, operator.getitem, (probes, 2), token_kind="visual")
            stacked = call_like(graph, first, ops.stack_rows, (text_rows, probe_x))
        # The original nodes now serve the text rows and, up to the down projection, the probes.
        for split in match.splits:  # the stacked rows are [N, ...]: cut the last dim by its negative index
            split.args = _split_args(split, width, width)
        for node in match.inner:
            node.replace_input_with(entry, stacked)
            if node in match.up_linears:
                weight, bias = _weight_and_bias(node)
                node.target, node.args, node.kwargs = ops.split_linear, (node.args[0], weight, bias, text_rows), {}
        hidden = down.args[0]
        weight, bias = _weight_and_bias(down)
        route = ops.split_rule(self.probe_rule)[1]
        with graph.inserting_before(down):
            probe_hidden = call_like(graph, down, ops.probe_part, (hidden, text_rows, probe_x), token_kind="visual")
            if not route:
                down.replace_input_with(hidden, call_like(graph, down, ops.text_part, (hidden, text_rows),
                                                          token_kind="text"))
        if route:
            # The routed probes take the full down projection too: one GEMM over the stacked rows (one
            # read of the whole weight, a larger product than two thin ones), cut into text and probes.
            down.target, down.args, down.kwargs = ops.split_linear, (hidden, weight, bias, text_rows), {}
        for node in (*match.inner, down):
            node.meta[META_KEY] = annotation(node).with_token_kind("text")
        down.meta[REWRITTEN] = "dynamic_ffn"

        with graph.inserting_before(down.next):
            channels = call_like(graph, down, ops.top_channels, (probe_hidden, probe_valid, kept), token_kind="visual")
            sliced = _copy_inner(graph, match, stacked, hidden, visual_rows, channels, width, kept)
            down_w = call_like(graph, down, ops.slice_in_features, (weight, channels), token_kind="visual")
            visual_out = call_like(graph, down, ops.batched_matmul, (sliced, down_w, bias), token_kind="visual")
            # down's rows: the text rows, then (routed) the probes' full outputs, which replace theirs
            probes_of = (probe_index, probe_valid) if route else ()
            merged = call_like(graph, down, merge_rows, (entry, down, layout["txt_flat"], visual_out,
                                                         layout["vis_valid"], layout["vis_flat"], *probes_of))
        for user in users:
            user.replace_input_with(down, merged)
        logger.info("dynamic FFN on layer %d: %d of %d channels for visual rows", match.layer, kept, width)


CHANNEL_ALIGN = 16
ALIGNED_WIDTH = 1024


def kept_channels(keep: float, width: int) -> int:
    """K = ceil(keep * F), rounded up to a multiple of CHANNEL_ALIGN when F >= ALIGNED_WIDTH.

    The sliced up-side products write [N, K] rows; with an odd K they ran slower than with an
    aligned one (`benchmarks/gemm_shapes.py`, `sliced_up`: 1024 rows, F = 8960). Rounding adds
    under 1.6% of F's channels where it applies; the audit counts the K that runs.
    """
    kept = max(1, min(width, math.ceil(keep * width)))
    if width >= ALIGNED_WIDTH:
        kept = min(width, -(-kept // CHANNEL_ALIGN) * CHANNEL_ALIGN)
    return kept


def _channels(gm: fx.GraphModule, match: FFNMatch) -> int:
    weight, _ = _weight_and_bias(match.down)
    return int(attr_value(gm, weight).shape[1])


def _weight_and_bias(linear: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    weight = linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return weight, bias


def _split_args(split: fx.Node, width: int, kept: int, source: fx.Node | None = None) -> tuple:
    """The args of a split/chunk/slice of a fused linear's F-wide blocks, cutting K-wide blocks of
    the last dim instead (blocks of `width` = F become blocks of `kept` = K), reading `source`."""
    args = list(split.args)
    args[0] = split.args[0] if source is None else source
    if split.target == aten.chunk.default:  # chunk(x, n): n equal blocks whatever their width
        return (args[0], args[1], -1)
    if split.target == aten.split.Tensor:
        return (args[0], args[1] // width * kept, -1)
    if split.target == aten.split_with_sizes.default:
        return (args[0], [size // width * kept for size in args[1]], -1)
    (start, end), = split_blocks(split, width)
    return (args[0], -1, start // width * kept, end // width * kept)


def _copy_inner(graph: fx.Graph, match: FFNMatch, stacked: fx.Node, hidden: fx.Node, rows: fx.Node,
                channels: fx.Node, width: int, kept: int) -> fx.Node:
    """Copy the FFN glue from its (stacked) input to `hidden`, the down projection's input, for the
    visual `rows` [B, N, D]; every up-side linear becomes a per-sample matmul sliced to `channels`
    (a fused one at those channels in each of its blocks, its splits cutting K-wide blocks)."""
    env: dict[fx.Node, fx.Node] = {stacked: rows}
    for node in match.inner:
        if node in match.up_linears:
            weight, bias = node.args[1], node.args[2]
            if node in match.fused:
                channels_of = call_like(graph, node, ops.fused_channels, (channels, width, match.fused[node]),
                                        token_kind="visual")
            else:
                channels_of = channels
            w = call_like(graph, node, ops.slice_out_features, (weight, channels_of), token_kind="visual")
            b = call_like(graph, node, ops.slice_out_features, (bias, channels_of), token_kind="visual") if bias else None
            env[node] = call_like(graph, node, ops.batched_matmul, (env[node.args[0]], w, b), token_kind="visual")
            continue
        new = graph.node_copy(node, lambda n: env.get(n, n))
        if node in match.splits:
            new.args = _split_args(node, width, kept, source=new.args[0])
        new.meta[META_KEY] = annotation(node).with_token_kind("visual")
        env[node] = new
    return env[hidden]
