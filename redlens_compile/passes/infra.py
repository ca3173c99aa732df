"""Pass infrastructure on torch.fx.passes.infra: PassBase passes run by a PassManager.

Every pass returns PassResult(graph_module, modified); the manager lints the graph after each
pass, and `run_passes` records what each pass did for the audit report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

logger = logging.getLogger(__name__)


class RedLensPass(PassBase):
    """A graph rewrite on the decoder GraphModule. Subclasses implement `call`."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass
class PassRecord:
    name: str
    modified: bool
    nodes_before: int
    nodes_after: int

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "modified": self.modified,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def _recorded(inner: RedLensPass, records: list[PassRecord]):
    """The pass as a function named after it (the manager's logs and errors use that name)."""

    def run(graph_module: fx.GraphModule) -> PassResult:
        before = len(graph_module.graph.nodes)
        result = inner(graph_module)
        after = len(result.graph_module.graph.nodes)
        records.append(PassRecord(inner.name, bool(result.modified), before, after))
        logger.info("pass %s: modified=%s nodes %d -> %d", inner.name, result.modified, before, after)
        return result

    run.__name__ = inner.name
    return run


def lint_graph_module(graph_module: fx.GraphModule) -> None:
    graph_module.graph.lint()


def run_passes(
    graph_module: fx.GraphModule, passes: Sequence[RedLensPass]
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `passes` in order once, linting after each; return the graph and the records."""
    records: list[PassRecord] = []
    manager = PassManager(
        passes=[_recorded(p, records) for p in passes],
        run_checks_after_each_pass=True,
        steps=1,
    )
    manager.add_checks(lint_graph_module)
    result = manager(graph_module)
    return result.graph_module, records
