"""Small predicates over the capture stage's NodeAnnotation: what a pass may rewrite.

Selection is by module path and role (the pt2e quantizer's module-name filters), never by a
model's name: a layer's FFN is the nodes under that layer's `.mlp`, its attention core the SDPA
call under it. Also the graph inputs passes read (`visual_mask`) and the shared row layout.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import fx

from ..capture.annotate import ATTENTION_CORE_TARGETS, FFN_ROLES, annotation, copy_node_meta
from ..ops.causal_attention import is_causal_mask
from ..ops.rows import visual_layout
from ..ops.thin_linear import thin_linear

aten = torch.ops.aten

VISUAL_MASK_INPUT = "visual_mask"
LAYOUT_FIELDS = ("vis_pos", "vis_valid", "vis_count", "txt_pos", "txt_valid", "vis_flat", "txt_flat")


def in_layer(node: fx.Node, layer: int) -> bool:
    ann = annotation(node)
    return ann is not None and ann.layer == layer


def has_role(node: fx.Node, *roles: str) -> bool:
    ann = annotation(node)
    return ann is not None and ann.role in roles


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (aten.linear.default, thin_linear)


def decoder_layers(gm: fx.GraphModule) -> list[int]:
    return sorted({a.layer for n in gm.graph.nodes if (a := annotation(n)) is not None and a.layer is not None})


def attention_core(gm: fx.GraphModule, layer: int) -> fx.Node | None:
    """The layer's SDPA call (None when the layer has no single SDPA node)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_CORE_TARGETS
             and in_layer(n, layer)]
    return nodes[0] if len(nodes) == 1 else None


@dataclass
class FFNMatch:
    """One layer's FFN: entry -> (up-side linears, elementwise glue) -> down linear."""

    layer: int
    entry: fx.Node  # the FFN input [B, S, D] (the post-attention norm's output)
    up_linears: list[fx.Node]  # gate and up (SwiGLU), fc1 (two-matrix) or one fused gate-up linear
    inner: list[fx.Node]  # every node from entry to the down linear's input, in graph order
    down: fx.Node
    # A fused up-side linear (gate and up in one weight) -> how many F-wide blocks its output holds;
    # `splits` are the nodes that cut its output into those blocks (their sizes are in units of F).
    fused: dict[fx.Node, int] = field(default_factory=dict)
    splits: list[fx.Node] = field(default_factory=list)


SPLIT_TARGETS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor)


def _last_dim(node: fx.Node, dim: int) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and dim in (-1, val.dim() - 1)


def split_blocks(split: fx.Node, width: int) -> list[tuple[int, int]] | None:
    """The [start, end) column ranges a split/chunk/slice node takes from its input's last dim, when
    each is whole F-wide blocks (`width` = F); None for any other cut."""
    source = split.args[0]
    val = source.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    total = int(val.shape[-1])
    args = list(split.args) + [None] * 4
    if split.target == aten.slice.Tensor:
        dim, start, end, step = (args[1] if args[1] is not None else 0), args[2] or 0, args[3], args[4] or 1
        end = total if end is None or end > total else end
        start, end = (x + total if isinstance(x, int) and x < 0 else x for x in (start, end))
        ranges = [(start, end)] if step == 1 else None
    else:
        dim = split.kwargs.get("dim", args[2] if args[2] is not None else 0)
        if split.target == aten.chunk.default:
            parts = args[1]
            sizes = [total // parts] * parts if total % parts == 0 else None
        elif split.target == aten.split.Tensor:
            sizes = [args[1]] * (total // args[1]) if total % args[1] == 0 else None
        else:
            sizes = list(args[1])
        if sizes is None:
            return None
        ranges = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    if ranges is None or not _last_dim(source, dim):
        return None
    if any(not isinstance(x, int) or x % width for r in ranges for x in r):
        return None
    return ranges


def fused_up_linear(linear: fx.Node, width: int) -> tuple[int, list[fx.Node]] | None:
    """(blocks, split nodes) when `linear`'s output is F-wide blocks (gate and up in one weight, as
    GLM-4V's and Phi-3's gate_up_proj) that its users cut apart; None otherwise. Read from the
    graph: the split/chunk/slice nodes after the linear, never the module's name."""
    val = linear.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.shape[-1] % width or val.shape[-1] // width < 2:
        return None
    users = list(linear.users)
    if not users or any(u.op != "call_function" or u.target not in SPLIT_TARGETS for u in users):
        return None
    if any(split_blocks(u, width) is None for u in users):
        return None
    return int(val.shape[-1]) // width, users


def ffn_of_layer(gm: fx.GraphModule, layer: int) -> tuple[FFNMatch | None, str]:
    """The layer's FFN as a closed subgraph, or (None, why not)."""
    nodes = [n for n in gm.graph.nodes if in_layer(n, layer) and has_role(n, *FFN_ROLES)]
    downs = [n for n in nodes if has_role(n, "ffn_down") and is_linear(n)]
    ups = [n for n in nodes if has_role(n, "ffn_gate", "ffn_up") and is_linear(n)]
    fused: dict[fx.Node, int] = {}
    splits: list[fx.Node] = []
    if len(downs) == 1 and not ups:
        # One linear whose output is cut into F-wide gate and up blocks (F: the down projection's input).
        hidden = downs[0].args[0].meta.get("val") if isinstance(downs[0].args[0], fx.Node) else None
        width = int(hidden.shape[-1]) if isinstance(hidden, torch.Tensor) else 0
        for node in nodes:
            found = fused_up_linear(node, width) if width and is_linear(node) and node is not downs[0] else None
            if found is not None:
                ups.append(node)
                fused[node] = found[0]
                splits += found[1]
        if not ups:
            return None, (f"layer {layer}: no FFN of linear up/down projections found (its up-side linears are "
                          "neither gate/up projections nor one fused linear whose output the graph splits into "
                          "F-wide gate and up blocks)")
    if len(downs) != 1 or not ups:
        return None, f"layer {layer}: no FFN of linear up/down projections found"
    entries = {n.args[0] for n in ups}
    if len(entries) != 1:
        return None, f"layer {layer}: the FFN's up projections read different inputs"
    entry, down = next(iter(entries)), downs[0]
    inner = [n for n in nodes if n is not down]
    members = set(inner) | {down}
    for node in inner:
        for arg in node.all_input_nodes:
            if arg is not entry and arg not in members and arg.op != "get_attr":
                return None, f"layer {layer}: FFN node {node.name} reads {arg.name} from outside the FFN"
        if any(user not in members for user in node.users):
            return None, f"layer {layer}: FFN node {node.name} is used outside the FFN"
    if any(arg not in inner for arg in down.all_input_nodes if arg.op != "get_attr"):
        return None, f"layer {layer}: the down projection reads from outside the FFN"
    return FFNMatch(layer, entry, ups, inner, down, fused, splits), ""


def unrepeated_kv(node: fx.Node) -> fx.Node | None:
    """The [B, H_kv, S, d] tensor behind transformers' repeat_kv (unsqueeze -> expand -> reshape), if any.

    SDPA with enable_gqa=True reads it directly: the H / H_kv copies need not be made or gathered.
    """
    if not (isinstance(node, fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target == aten.unsqueeze.default and unsqueeze.args[1] == 2):
        return None
    source, out = unsqueeze.args[0], node.meta.get("val")
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(out, torch.Tensor) or val.dim() != 4 or out.dim() != 4:
        return None
    return source


def causal_check(graph: fx.Graph, mask: fx.Node) -> fx.Node:
    """The node that tells, once per forward, whether `mask` is exactly causal (inserted on first use)."""
    for user in mask.users:
        if user.target is is_causal_mask:
            return user
    with graph.inserting_before(mask.next):
        return call_like(graph, mask, is_causal_mask, (mask,))


def attr_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node reads (its target is a dotted path)."""
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name == name:
            return node
    raise KeyError(f"the decoder graph has no input named {name!r}")


def layout_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The graph's row-layout nodes (computed once from visual_mask), inserted on first use."""
    graph = gm.graph
    existing = next((n for n in graph.nodes if n.op == "call_function" and n.target is visual_layout), None)
    if existing is None:
        mask = placeholder(gm, VISUAL_MASK_INPUT)
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_input):
            existing = graph.call_function(visual_layout, (mask,))
    getters = {n.args[1]: n for n in existing.users if n.target is operator.getitem}
    out = {}
    for index, name in enumerate(LAYOUT_FIELDS):
        if index not in getters:
            with graph.inserting_after(existing):
                getters[index] = graph.call_function(operator.getitem, (existing, index))
        out[name] = getters[index]
    return out


def call_like(graph: fx.Graph, src: fx.Node, target, args: tuple, kwargs: dict | None = None,
              token_kind: str | None = None) -> fx.Node:
    """A new call_function node carrying `src`'s provenance (inserted at the current point)."""
    node = graph.call_function(target, args, kwargs or {})
    copy_node_meta(src, node, token_kind)
    return node


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph (node meta included) over the same parameters: no weight is copied."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def nodes_graph(gm: fx.GraphModule, nodes: list[fx.Node]) -> fx.GraphModule:
    """`nodes` and the nodes they read, as a graph of the same inputs returning their values: what
    they compute on given inputs, without running the rest of the graph."""
    needed, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in nodes))
    return fx.GraphModule(gm, graph)


# Graph signature: an exported graph's codegen carries pytree specs that must follow its
# placeholders and outputs.


def add_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """A new last placeholder, keeping an exported graph's pytree input spec true."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(name)
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        codegen.pytree_info = info._replace(
            orig_args=[*info.orig_args, name] if info.orig_args else info.orig_args,
            in_spec=pytree.tree_flatten((tuple(range(len(placeholders) + 1)), {}))[1])
    return node


def append_output(gm: fx.GraphModule, value: fx.Node) -> None:
    """Add `value` after the graph's outputs (a flat tuple), keeping an exported graph's pytree spec true."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    (values,) = out.args
    out.args = ((*values, value),)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        codegen.pytree_info = info._replace(out_spec=pytree.tree_flatten(tuple(range(len(values) + 1)))[1])
