"""Dead-code elimination: drop pure nodes without users and submodules nothing calls."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .infra import RedLensPass


class DeadCodeEliminationPass(RedLensPass):
    runs_last = True  # what the rewrites before it left unused

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = graph_module.graph.eliminate_dead_code()
        graph_module.delete_all_unused_submodules()
        return PassResult(graph_module, bool(modified))
