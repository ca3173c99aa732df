"""Rewrites of exported ONNX graphs into the forms onnxruntime's fusions recognise.

torch.onnx writes `x * torch.rsqrt(v)` as Mul(x, Reciprocal(Sqrt(v))); onnxruntime fuses an RMS
norm (Pow, ReduceMean, Add, Sqrt, Div, Mul: SimplifiedLayerNormalization, one kernel) only from the
Div form, so every norm of a decoder ran as six kernels over the whole sequence (a full-sequence
cost the reductions cannot cut). Mul(x, Reciprocal(s)) -> Div(x, s) is the same value up to
rounding (one division instead of a reciprocal and a product). The graph is edited in place, on
the file's structure only: the weights stay in their external data.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def divide_by_square_roots(graph) -> int:
    """Mul(x, Reciprocal(Sqrt(v))) -> Div(x, Sqrt(v)) in an onnx GraphProto (where the reciprocal
    feeds that product alone); returns how many were rewritten."""
    import onnx

    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {out.name for out in graph.output}
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "Reciprocal" or node.domain not in ("", "ai.onnx"):
            continue
        root = producer.get(node.input[0])
        users = readers.get(node.output[0], [])
        if root is None or root.op_type != "Sqrt" or len(users) != 1 or node.output[0] in graph_outputs:
            continue
        mul = users[0]
        if mul.op_type != "Mul" or list(mul.input).count(node.output[0]) != 1:
            continue
        numerator = mul.input[1] if mul.input[0] == node.output[0] else mul.input[0]
        div = onnx.helper.make_node("Div", [numerator, root.output[0]], list(mul.output), name=f"{mul.name}_as_div")
        position = list(graph.node).index(mul)
        graph.node.remove(mul)
        graph.node.insert(position, div)
        graph.node.remove(node)
        rewritten += 1
    return rewritten


def rewrite_file(path: Path) -> dict[str, int]:
    """Apply the rewrites to an ONNX file with external data, in place (the structure only)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = {"reciprocal products as divisions": divide_by_square_roots(model.graph)}
    if any(counts.values()):
        scratch = path.with_name(path.name + ".rewriting")
        onnx.save(model, str(scratch))
        scratch.replace(path)
        logger.info("%s: %s", path.name, counts)
    return counts
