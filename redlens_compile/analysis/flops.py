"""FLOPs counting with fvcore, attributed to (layer, role) and split visual/text.

fvcore counts one multiply-add as one FLOP. It does not know SDPA, so `sdpa_flop_handle`
counts the attention core: 2 * head_dim * heads per (query, visible key) pair, causal. It
attributes a flattened GraphModule's cost to the root, so `counting_view` wraps every counted
op of the decoder graph in a tiny named submodule (one per node); fvcore's per-module table
then gives the cost of each node, which the node's annotation places in a layer and role.

Visual/text split: a node whose annotation says it serves only visual (or text) rows counts
wholly there. A node over mixed rows is split by the rows it serves: a linear row is one
token; an attention row is one query and the keys it sees.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import fx, nn

from ..capture.annotate import NodeAnnotation, annotation
from ..capture.decoder_inputs import DecoderInputs, run_to_decoder
from ..capture.decoder_module import LogitsOnly
from ..capture.families import FamilyAdapter

logger = logging.getLogger(__name__)

aten = torch.ops.aten

FLOP_CONVENTION = (
    "FLOPs are counted by fvcore: one multiply-add = 1 FLOP. Linear layers and the attention "
    "core (Q.K^T and A.V, causal: a query sees itself and the keys before it) are counted; "
    "elementwise work (norms, RoPE, activations, softmax) is not."
)

SDPA_OP = "aten::scaled_dot_product_attention"
# Graph ops with a matrix-multiply cost; everything else fvcore counts as 0 anyway.
COUNTED_TARGETS = frozenset(
    {
        aten.linear.default,
        aten.scaled_dot_product_attention.default,
        aten.matmul.default,
        aten.mm.default,
        aten.bmm.default,
        aten.addmm.default,
        aten.baddbmm.default,
        aten.einsum.default,
    }
)
GROUPS = ("proj", "attn", "ffn")


def causal_keys_seen(num_queries: int, num_keys: int) -> int:
    """Sum over queries of the keys each sees, when the queries are the last of the keys."""
    return num_queries * num_keys - num_queries * (num_queries - 1) // 2


def sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch_dims, heads, num_queries, head_dim = q_shape
    num_keys = k_shape[-2]
    value_dim = v_shape[-1]
    batch = 1
    for dim in batch_dims:
        batch *= dim
    return batch * heads * causal_keys_seen(num_queries, num_keys) * (head_dim + value_dim)


def full_sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """SDPA where every query sees every key (vision encoders attend both ways)."""
    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch_dims, heads, num_queries, head_dim = q_shape
    batch = 1
    for dim in batch_dims:
        batch *= dim
    return batch * heads * num_queries * k_shape[-2] * (head_dim + v_shape[-1])


def flop_analysis(module: nn.Module, args: tuple, causal: bool = True) -> FlopCountAnalysis:
    """fvcore on `module`; SDPA is counted causally (the decoder) or over every key (vision)."""
    analysis = FlopCountAnalysis(module, args)
    analysis.set_op_handle(SDPA_OP, sdpa_flop_handle if causal else full_sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def is_counted(target: Any) -> bool:
    """aten ops with a matmul cost, and the project's own ops marked with ops.rows.counted."""
    return target in COUNTED_TARGETS or getattr(target, "_redlens_counted", False)


class CountedOp(nn.Module):
    """Calls one graph op; exists so fvcore's per-module table has one row per node.

    An op of our own that knows its cost (`_redlens_flops`) records (visual, text) from its real
    inputs when called; that replaces fvcore's count of the aten calls inside it.
    """

    def __init__(self, target: Any):
        super().__init__()
        self.target = target
        self.own_flops: tuple[float, float] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cost = getattr(self.target, "_redlens_flops", None)
        if cost is not None:
            # float(): under fvcore's jit trace, sizes can come back as 0-dim tensors.
            visual, text = cost(*args, **kwargs)
            self.own_flops = (float(visual), float(text))
        return self.target(*args, **kwargs)


def counting_view(graph_module: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, NodeAnnotation]]:
    """A copy of the graph whose counted ops are call_module nodes named rl_count_<i>.

    The copy shares parameters with `graph_module` (no weight is duplicated).
    """
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(graph_module.graph, value_map)
    graph.output(output)
    view = fx.GraphModule(graph_module, graph)
    names: dict[str, NodeAnnotation] = {}
    for index, (old, new) in enumerate(list(value_map.items())):
        if new.op != "call_function" or not is_counted(new.target):
            continue
        name = f"rl_count_{index}"
        view.add_submodule(name, CountedOp(new.target))
        with graph.inserting_before(new):
            call = graph.call_module(name, new.args, new.kwargs)
        call.meta = dict(new.meta)
        new.replace_all_uses_with(call)
        graph.erase_node(new)
        ann = annotation(old)
        names[name] = ann if ann is not None else NodeAnnotation(layer=None, role="other", module_path="")
    view.recompile()
    return view, names


@dataclass
class TokenSplit:
    """Shares of the rows a mixed node serves that are visual."""

    linear_visual_share: float
    attention_visual_share: float

    @classmethod
    def from_inputs(cls, inputs: DecoderInputs) -> "TokenSplit":
        # integer sums on the mask's own device (exact; no float64, which some accelerators lack)
        visual = inputs.visual_mask.to(torch.int64)
        batch, seq = visual.shape
        keys = torch.arange(1, seq + 1, device=visual.device)  # query i sees i + 1 keys
        visual_rows, visual_pairs = torch.stack([visual.sum(), (visual * keys).sum()]).tolist()  # one host sync
        linear = visual_rows / (batch * seq)
        attention = visual_pairs / (batch * (seq * (seq + 1) // 2))
        return cls(linear_visual_share=linear, attention_visual_share=attention)

    def visual_share(self, ann: NodeAnnotation) -> float:
        if ann.token_kind == "visual":
            return 1.0
        if ann.token_kind == "text":
            return 0.0
        return self.attention_visual_share if ann.group == "attn" else self.linear_visual_share


def groups_total(groups: Mapping[str, Mapping[str, float]], kind: str | None = None) -> float:
    """Sum of one layer's {group: {visual, text}} costs, of one token kind or both."""
    kinds = (kind,) if kind else ("visual", "text")
    return sum(groups.get(g, {}).get(k, 0.0) for g in GROUPS for k in kinds)


@dataclass
class GraphFlops:
    """FLOPs of one decoder graph: per layer and group, split visual/text."""

    layers: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    lm_head: float = 0.0
    other: float = 0.0
    total: float = 0.0

    def layer_total(self, layer: int, kind: str | None = None) -> float:
        return groups_total(self.layers.get(layer, {}), kind)


def _attribute(per_node: Mapping[str, float], names: Mapping[str, NodeAnnotation], split: TokenSplit,
               own: Mapping[str, tuple[float, float]]) -> GraphFlops:
    layers: dict[int, dict[str, dict[str, float]]] = defaultdict(
        lambda: {g: {"visual": 0.0, "text": 0.0} for g in GROUPS}
    )
    result = GraphFlops()
    for name, ann in names.items():
        if name in own:
            visual, text = own[name]
        else:
            flops = float(per_node.get(name, 0))
            share = split.visual_share(ann)
            visual, text = flops * share, flops * (1.0 - share)
        flops = visual + text
        result.total += flops
        if flops == 0:
            continue
        if ann.group == "lm_head":
            result.lm_head += flops
        elif ann.layer is None or ann.group not in GROUPS:
            result.other += flops
        else:
            layers[ann.layer][ann.group]["visual"] += visual
            layers[ann.layer][ann.group]["text"] += text
    result.layers = dict(layers)
    return result


def count_graph_flops(graph_module: fx.GraphModule, inputs: DecoderInputs) -> GraphFlops:
    """fvcore count of a decoder graph on `inputs`, attributed per node."""
    view, names = counting_view(graph_module)
    analysis = flop_analysis(view, inputs.as_args())
    per_module = analysis.by_module()
    own = {name: m.own_flops for name, m in view.named_children()
           if isinstance(m, CountedOp) and m.own_flops is not None}
    result = _attribute(per_module, names, TokenSplit.from_inputs(inputs), own)
    # What fvcore saw, with each self-counting op's inner aten calls swapped for its own count.
    expected = analysis.total() - sum(per_module.get(n, 0) for n in own) + sum(sum(v) for v in own.values())
    if abs(result.total - expected) > 0.5:
        raise RuntimeError(f"FLOPs attribution lost work: nodes sum to {result.total}, fvcore total {expected}")
    return result


def count_eager_decoder_flops(decoder: nn.Module, inputs: DecoderInputs) -> float:
    """fvcore's total on the eager decoder (the cross-check of the graph count)."""
    with torch.no_grad():
        return float(flop_analysis(LogitsOnly(decoder).eval(), inputs.as_args()).total())


class _KwargsCall(nn.Module):
    """Calls `module` with recorded keyword arguments around the traced positional ones."""

    def __init__(self, module: nn.Module, kwargs: dict[str, Any]):
        super().__init__()
        self.inner = module
        self.kwargs = kwargs

    def forward(self, *args: Any) -> Any:
        out = self.inner(*args, **self.kwargs)
        if isinstance(out, torch.Tensor):
            return out
        # Every tensor the module returns, not the first alone: the jit trace drops work that no
        # returned tensor reads (Qwen2-VL's merger, whose rows are the output's pooler_output).
        values = out.values() if hasattr(out, "values") else out
        return tuple(v for v in values if isinstance(v, torch.Tensor))


def _record_calls(model: nn.Module, adapter: FamilyAdapter, inputs: Mapping[str, Any],
                  paths: Iterable[str]) -> dict[str, tuple]:
    """The (args, kwargs) of the first call of each module in `paths` during the vision path."""
    calls: dict[str, tuple] = {}
    handles = []
    for path in paths:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            calls.setdefault(path, (args, kwargs))
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run_to_decoder(model, adapter, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _module_flops(module: nn.Module, args: tuple, kwargs: dict) -> float:
    tensor_args = tuple(a for a in args if isinstance(a, torch.Tensor))
    if len(tensor_args) != len(args):
        raise TypeError("non-tensor positional arguments")
    with torch.no_grad():
        return float(flop_analysis(_KwargsCall(module, kwargs).eval(), tensor_args, causal=False).total())


@dataclass
class VisionFlops:
    vision_tower: float | None
    projector: float | None
    note: str = ""


def count_vision_flops(model: nn.Module, adapter: FamilyAdapter, inputs: Mapping[str, Any]) -> VisionFlops:
    """fvcore count of the vision tower and the projector, each on the inputs it got in a real forward.

    Counting the modules one by one (rather than the family's whole image path) keeps fvcore's
    jit tracer away from the family's glue code (tiling, splits), which it cannot trace.
    """
    vision_keys = [k for k in adapter.vision_input_keys if inputs.get(k) is not None]
    if "pixel_values" not in vision_keys:
        return VisionFlops(None, None, "no pixel_values in the inputs")
    paths = (adapter.vision_tower_path, *adapter.projector_paths)
    calls = _record_calls(model, adapter, inputs, paths)
    try:
        counts = {path: _module_flops(model.get_submodule(path), *calls[path]) for path in paths}
    except Exception as exc:  # fvcore's jit tracer rejects some modules; say so instead of guessing
        logger.warning("vision FLOPs not counted: %s", exc)
        return VisionFlops(None, None, f"fvcore could not trace the vision path: {type(exc).__name__}: {exc}"[:300])
    projector = sum(counts[p] for p in adapter.projector_paths)
    tower = counts[adapter.vision_tower_path]
    # A projector that lives inside the vision module (Qwen2-VL's merger) is already in its count.
    nested = sum(counts[p] for p in adapter.projector_paths if p.startswith(adapter.vision_tower_path + "."))
    return VisionFlops(vision_tower=tower - nested, projector=projector)


def merge_flops(*parts: GraphFlops) -> GraphFlops:
    """The FLOPs of a decoder run as several graphs (each holding its own layers)."""
    merged = GraphFlops()
    for part in parts:
        for layer, groups in part.layers.items():
            if layer in merged.layers:
                raise ValueError(f"layer {layer} is counted in two graphs")
            merged.layers[layer] = groups
        merged.lm_head += part.lm_head
        merged.other += part.other
        merged.total += part.total
    return merged
