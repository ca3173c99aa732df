"""Tag every graph node with (layer index, role) read from its nn_module_stack.

Passes select what to rewrite by these tags (the pt2e quantizer's annotate-then-transform
split); the FLOPs audit groups costs by them. Nodes a pass inserts copy the tag of the node
they replace and may narrow `token_kind` to "visual" or "text".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import fx

META_KEY = "redlens"

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")

# Last attribute name of the module a node runs in -> role.
ROLE_BY_MODULE_NAME = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "o_proj": "o_proj",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "fc1": "ffn_up",
    "fc2": "ffn_down",
    "lm_head": "lm_head",
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attn_norm",
    "embed_tokens": "embed",
    "rotary_emb": "rope",
}
PROJECTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_ROLES = ("ffn_gate", "ffn_up", "ffn_down", "ffn_other")
ATTENTION_CORE_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default,)


@dataclass(frozen=True)
class NodeAnnotation:
    layer: int | None
    role: str
    module_path: str
    token_kind: str = "mixed"  # "mixed" rows of both kinds, or only "visual" / "text" rows

    def with_token_kind(self, token_kind: str) -> "NodeAnnotation":
        return replace(self, token_kind=token_kind)

    @property
    def group(self) -> str:
        """Coarse cost group of the audit: projections, attention core, FFN, lm_head, other."""
        if self.role in PROJECTION_ROLES:
            return "proj"
        if self.role == "attn_core":
            return "attn"
        if self.role in FFN_ROLES:
            return "ffn"
        if self.role == "lm_head":
            return "lm_head"
        return "other"


def module_path_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def classify(node: fx.Node) -> NodeAnnotation:
    path = module_path_of(node)
    match = _LAYER_RE.search(path)
    layer = int(match.group(1)) if match else None
    if node.op == "call_function" and node.target in ATTENTION_CORE_TARGETS:
        role = "attn_core"
    else:
        name = path.rsplit(".", 1)[-1]
        role = ROLE_BY_MODULE_NAME.get(name)
        if role is None:
            if name == "norm" and layer is None:
                role = "final_norm"
            elif ".self_attn" in path:
                role = "attn_other"
            elif ".mlp" in path:
                role = "ffn_other"
            elif layer is not None:
                role = "residual"
            else:
                role = "other"
    return NodeAnnotation(layer=layer, role=role, module_path=path)


def annotate_graph(gm: fx.GraphModule) -> int:
    """Annotate every call node that has none yet; returns how many were annotated."""
    count = 0
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and META_KEY not in node.meta:
            node.meta[META_KEY] = classify(node)
            count += 1
    return count


def annotation(node: fx.Node) -> NodeAnnotation | None:
    return node.meta.get(META_KEY)


def copy_node_meta(src: fx.Node, dst: fx.Node, token_kind: str | None = None) -> None:
    """Give an inserted node the provenance of the node it stands for."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    ann = annotation(src)
    if ann is not None:
        dst.meta[META_KEY] = ann.with_token_kind(token_kind) if token_kind else ann
