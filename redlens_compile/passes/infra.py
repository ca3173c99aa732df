"""Pass infrastructure on torch.fx.passes.infra: PassBase passes run by a PassManager.

Every pass returns a PassResult (RedLensPassResult: graph_module, modified, and `findings`,
what the pass found, e.g. the layers it could not rewrite): a pass keeps no state of its own
between runs. The manager lints the graph after each pass, and `run_passes` records what each
pass did (and found) for the audit report.

Ordering is declared: a pass class names in `runs_after` the passes that must come before it
when both are in one list (e.g. the key bias after the reductions), and `run_passes` refuses a
list that breaks it before any pass runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from ..errors import PassOrderError

logger = logging.getLogger(__name__)


class RedLensPassResult(PassResult):
    """PassResult with what the pass found (findings: name -> value, e.g. "skipped": {layer: why})."""

    def __new__(cls, graph_module: fx.GraphModule, modified: bool, findings: dict[str, Any] | None = None):
        result = super().__new__(cls, graph_module, modified)
        result.findings = dict(findings or {})
        return result


class RedLensPass(PassBase):
    """A graph rewrite on the decoder GraphModule. Subclasses implement `call`.

    runs_after: names of the pass classes that must run before this one when both are in a list
    (checked by run_passes); runs_last: nothing but another runs_last pass may follow it."""

    runs_after: ClassVar[tuple[str, ...]] = ()
    runs_last: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass
class PassRecord:
    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    findings: dict[str, Any] = field(default_factory=dict)  # the pass's result findings (not in the report)

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
        records.append(PassRecord(inner.name, bool(result.modified), before, after,
                                  dict(getattr(result, "findings", {}))))
        logger.info("pass %s: modified=%s nodes %d -> %d", inner.name, result.modified, before, after)
        return result

    run.__name__ = inner.name
    return run


def lint_graph_module(graph_module: fx.GraphModule) -> None:
    graph_module.graph.lint()


def check_order(passes: Sequence[RedLensPass]) -> None:
    """The declared order (runs_after, runs_last) holds for `passes`, or a PassOrderError names the pair."""
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        for later in passes[i + 1:]:
            if later.name in p.runs_after:
                raise PassOrderError(f"{p.name} is listed before {later.name}, and {p.name} declares it runs after "
                                     f"{later.name} (runs_after); passes in order: {names}")
            if p.runs_last and not later.runs_last:
                raise PassOrderError(f"{p.name} runs last (runs_last) but {later.name} follows it; passes in order: "
                                     f"{names}")


def merged_findings(records: Sequence[PassRecord], name: str) -> dict:
    """The dict finding `name` of every record, merged (first writer of a key wins)."""
    merged: dict = {}
    for record in records:
        for key, value in record.findings.get(name, {}).items():
            merged.setdefault(key, value)
    return merged


def run_passes(
    graph_module: fx.GraphModule, passes: Sequence[RedLensPass]
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `passes` in order once, linting after each; return the graph and the records
    (each with the pass's findings). A list breaking the passes' declared order raises first."""
    check_order(passes)
    records: list[PassRecord] = []
    manager = PassManager(
        passes=[_recorded(p, records) for p in passes],
        run_checks_after_each_pass=True,
        steps=1,
    )
    manager.add_checks(lint_graph_module)
    result = manager(graph_module)
    return result.graph_module, records
