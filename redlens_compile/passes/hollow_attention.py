"""Hollow attention: visual queries of a reduced layer see text keys and a window of visual keys.

The layer's SDPA call becomes `ops.hollow_attention.hollow_attention` (blockwise: the saved
work is real) when its mask is a [B or 1, 1, S, S] tensor, which every family in transformers
5 hands its SDPA. Any other form (no mask, per-head masks) gets the fallback: full SDPA over
the family's mask with the hollow pattern cut out, which is exact and saves nothing; the pass
records each layer where it used it, and the report lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from ..ops.hollow_attention import hollow_attention, hollow_attention_masked, hollow_plan, mask_looks_ahead
from .infra import RedLensPass, RedLensPassResult
from .selectors import (
    VISUAL_MASK_INPUT,
    attention_core,
    call_like,
    causal_check,
    in_layer,
    layout_nodes,
    placeholder,
    unrepeated_kv,
)

logger = logging.getLogger(__name__)


def sdpa_arguments(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _blockwise_serves(args: dict) -> str:
    """'' when the blockwise path serves this SDPA call, else why not."""
    mask = args.get("attn_mask")
    if args.get("is_causal"):
        return "SDPA takes is_causal instead of a mask"
    if args.get("dropout_p", 0.0):
        return "SDPA has dropout"
    if not isinstance(mask, fx.Node):
        return "SDPA has no mask tensor"
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.shape[1] != 1:
        return f"SDPA mask of shape {tuple(val.shape) if isinstance(val, torch.Tensor) else '?'} (per-head)"
    return ""


@dataclass
class HollowAttentionPass(RedLensPass):
    """Rewrite the attention core of each layer in `window` (layer -> w)."""

    window: dict[int, int]
    runs_after: ClassVar[tuple[str, ...]] = ("StripAssertsPass",)

    def call(self, graph_module: fx.GraphModule) -> RedLensPassResult:
        """findings: "fallback" (layer -> why the masked fallback was used), "skipped" (layer -> why not rewritten)."""
        graph = graph_module.graph
        modified = False
        fallback: dict[int, str] = {}
        skipped: dict[int, str] = {}
        for layer, window in sorted(self.window.items()):
            node = attention_core(graph_module, layer)
            if node is None:
                continue  # already rewritten, or no single SDPA call (recorded below)
            args = sdpa_arguments(node)
            why = _blockwise_serves(args)
            q, k, v = args["query"], args["key"], args["value"]
            gqa = bool(args.get("enable_gqa", False))
            if unrepeated_kv(k) is not None and unrepeated_kv(v) is not None:
                k, v, gqa = unrepeated_kv(k), unrepeated_kv(v), True  # gather H_kv heads, not H
            common = dict(scale=args.get("scale"), enable_gqa=gqa)
            with graph.inserting_before(node):
                if why:
                    if not isinstance(args.get("attn_mask"), fx.Node) or args.get("is_causal"):
                        skipped[layer] = why
                        continue
                    fallback[layer] = why
                    mask = placeholder(graph_module, VISUAL_MASK_INPUT)
                    new = call_like(graph, node, hollow_attention_masked,
                                    (q, k, v, args["attn_mask"], mask, window), common)
                else:
                    layout = layout_nodes(graph_module)
                    mask = placeholder(graph_module, VISUAL_MASK_INPUT)
                    plan = plan_node(graph, args["attn_mask"], mask, layout, window, _dtype(q))
                    new = call_like(graph, node, hollow_attention, (q, k, v, plan), common)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
            logger.info("hollow attention on layer %d, window %d%s", layer, window,
                        f" (masked fallback: {why})" if why else "")
        for layer in self.window:
            if attention_core(graph_module, layer) is None and not _rewritten(graph_module, layer):
                skipped.setdefault(layer, f"layer {layer}: no single SDPA call found")
        if modified:
            graph_module.recompile()
        return RedLensPassResult(graph_module, modified, {"fallback": fallback, "skipped": skipped})


def plan_node(graph: fx.Graph, attn_mask: fx.Node, visual_mask: fx.Node, layout: dict[str, fx.Node],
              window: int, score_dtype: torch.dtype | None = None) -> fx.Node:
    """The hollow_plan node of every layer reading `attn_mask` with this window (and queries of
    score_dtype): computed once per forward (inserted at the first such layer, before it)."""
    for user in attn_mask.users:
        if user.target is hollow_plan and user.args[6] == window and user.kwargs.get("score_dtype") == score_dtype:
            return user
    causal = causal_check(graph, attn_mask)
    ahead = looks_ahead_check(graph, attn_mask, visual_mask)
    return call_like(graph, attn_mask, hollow_plan,
                     (attn_mask, visual_mask, layout["vis_pos"], layout["vis_valid"], layout["txt_pos"],
                      layout["txt_valid"], window), dict(mask_is_causal=causal, looks_ahead=ahead,
                                                          score_dtype=score_dtype))


def _dtype(node) -> torch.dtype | None:
    """The dtype a traced node's value has (its fake tensor), or None where the graph does not say."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(value, "dtype", None)


def looks_ahead_check(graph: fx.Graph, attn_mask: fx.Node, visual_mask: fx.Node) -> fx.Node:
    """The node that tells, once per forward, whether `attn_mask` lets image tokens see later image
    tokens (inserted on first use, shared by every layer reading that mask)."""
    for user in attn_mask.users:
        if user.target is mask_looks_ahead:
            return user
    order = {n: i for i, n in enumerate(graph.nodes)}
    after = max((attn_mask, visual_mask), key=order.__getitem__)
    if after.op == "placeholder":  # computed nodes go after every input
        after = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(after):
        return call_like(graph, attn_mask, mask_looks_ahead, (attn_mask, visual_mask))


def _rewritten(gm: fx.GraphModule, layer: int) -> bool:
    return any(n.target in (hollow_attention, hollow_attention_masked) and in_layer(n, layer) for n in gm.graph.nodes)
