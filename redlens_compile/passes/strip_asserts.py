"""Remove data-dependent runtime asserts that export leaves in the graph.

They guard facts already checked at capture (e.g. the image-token count equals the number of
image features) and block ONNX conversion; the values they read become dead and are removed
by DeadCodeEliminationPass.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .infra import RedLensPass

aten = torch.ops.aten

ASSERT_TARGETS = frozenset(
    {
        aten._assert_scalar.default,
        aten._assert_tensor_metadata.default,
        aten._assert_async.default,
        aten._assert_async.msg,
        aten.sym_constrain_range.default,
        aten.sym_constrain_range_for_size.default,
    }
)


def is_runtime_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ASSERT_TARGETS and not node.users


class StripAssertsPass(RedLensPass):
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        asserts = [n for n in graph_module.graph.nodes if is_runtime_assert(n)]
        for node in asserts:
            graph_module.graph.erase_node(node)
        return PassResult(graph_module, bool(asserts))
