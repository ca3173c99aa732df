"""torch.compile of the rewritten prefill graphs (`OptimizedModel.compile`).

The graphs compile with dynamic shapes (sequence length and batch are symbols), so a prompt of
another length runs the same compiled code. The runtime ops read a few sizes from data (the
longest sample's visual rows, a layer's probe count, the text keys a visual block sees): those
are traced as unbacked sizes (dynamo's capture_scalar_outputs and dynamic-output-shape ops,
patched on around every call, since tracing can happen on any call), not graph breaks. The two
once-per-forward mask checks (is the mask exactly causal? do image tokens see later ones?) pick
kernel paths in Python; inside the compiled graph each would be a graph break, and the pieces
after a break recompile for the next length. So they run first, eagerly, in a small graph of
their own (the nodes they read, cut out of the prefill graph: selectors.nodes_graph), and each answer gets a graph with
the answers as constants, compiled on first use: a forward is one compiled graph, and the exactly
causal mask of a prompt without padding keeps the eager graph's fast paths (the causal SDPA
kernel, hollow attention's masks from positions instead of gathers from the S x S mask).

Inductor's CPU lowering of a batched matmul asks whether an operand's row count is 1 (a layout
preference), which it cannot answer for a size read from data (GuardOnDataDependentSymNode): a
post-grad pass (ExternBmmPass) hands exactly those matmuls to the same aten kernel as an opaque op.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable

import torch

from ..errors import CompileError
from ..ops.causal_attention import is_causal_mask
from ..ops.hollow_attention import mask_looks_ahead
from ..passes.selectors import clone_graph_module, nodes_graph

logger = logging.getLogger(__name__)

# Sizes read from data become unbacked symbols instead of graph breaks.
TRACE_CONFIG = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)


@torch.library.custom_op("redlens::extern_bmm", mutates_args=())
def extern_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aten.bmm as an op inductor calls without lowering it (ExternBmmPass)."""
    return torch.bmm(a, b)


@extern_bmm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2])


def _unbacked(node: torch.fx.Node) -> bool:
    """Does a node's value have a size read from data (an unbacked symbol)?"""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and bool(free_unbacked_symbols(value.shape))


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU ($CXX or inductor's candidates), or None."""
    import torch._inductor.config as inductor_config

    candidates = inductor_config.cpp.cxx
    candidates = list(candidates) if isinstance(candidates, (list, tuple)) else [candidates]
    for name in [os.environ.get("CXX")] + candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_unavailable(backend: Any, device: torch.device) -> str | None:
    """Why `backend` cannot compile on `device` here, or None."""
    if backend == "inductor" and device.type == "cpu" and cpp_compiler() is None:
        return ("inductor's CPU code needs a C++ compiler and none was found (set $CXX or install g++/clang; "
                "or compile with backend='aot_eager', which needs none)")
    return None


def _extern_bmm_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class ExternBmmPass(CustomGraphPass):
        """Post-grad: aten.bmm over an operand of data-dependent size -> redlens::extern_bmm (the
        same kernel inductor's CPU bmm calls, without the lowering's layout guard on that size)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            for node in graph.find_nodes(op="call_function", target=torch.ops.aten.bmm.default):
                if any(_unbacked(arg) for arg in node.args[:2]):
                    node.target = torch.ops.redlens.extern_bmm.default

        def uuid(self) -> Any:  # inductor's cache key: this file's source
            return get_hash_for_files((__file__,))

    return ExternBmmPass()


# Ops that decide a kernel path from data, once per forward, returning a Python bool.
MASK_CHECKS = (is_causal_mask, mask_looks_ahead)


def mask_check_nodes(graph_module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in MASK_CHECKS]


def with_answers(graph_module: torch.fx.GraphModule, answers: dict[str, bool]) -> torch.fx.GraphModule:
    """A copy of the graph (same parameters) with each check node (by name) replaced by its answer."""
    clone = clone_graph_module(graph_module)
    for node in mask_check_nodes(clone):
        answer = answers[node.name]
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda n: answer if n is node else n)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n: answer if n is node else n)
        clone.graph.erase_node(node)
    clone.graph.eliminate_dead_code()
    clone.recompile()
    return clone


class CompiledGraph:
    """A graph module compiled with torch.compile; called like the graph, with TRACE_CONFIG on
    and ExternBmmPass among inductor's post-grad passes (compiling happens on a call). The graph's
    mask checks run eagerly first; each set of answers has its own compiled graph."""

    def __init__(self, graph_module: torch.fx.GraphModule, **compile_kwargs: Any):
        self.graph_module = graph_module
        self.compile_kwargs = compile_kwargs
        checks = mask_check_nodes(graph_module)
        self._check_names = [c.name for c in checks]
        self._checks = nodes_graph(graph_module, checks) if checks else None
        self._compiled: dict[tuple[bool, ...], Callable] = {}
        self._bmm_pass = _extern_bmm_pass()

    def _for_answers(self, args: tuple) -> Callable:
        answers = () if self._checks is None else tuple(bool(a) for a in self._checks(*args))
        if answers not in self._compiled:
            graph = self.graph_module if not answers else with_answers(
                self.graph_module, dict(zip(self._check_names, answers)))
            self._compiled[answers] = torch.compile(graph, **self.compile_kwargs)
        return self._compiled[answers]

    def __call__(self, *args: torch.Tensor):
        import torch._inductor.config as inductor_config

        compiled = self._for_answers(args)
        passes = inductor_config.post_grad_custom_pre_pass
        passes = () if passes is None else tuple(passes) if isinstance(passes, (list, tuple)) else (passes,)
        with torch._dynamo.config.patch(**TRACE_CONFIG), \
                inductor_config.patch(post_grad_custom_pre_pass=passes + (self._bmm_pass,)):
            return compiled(*args)


def compile_graphs(graphs: dict[str, torch.nn.Module], device: torch.device, backend: Any = "inductor",
                   dynamic: bool = True, fallback: bool = True, **kwargs: Any) -> dict[str, CompiledGraph]:
    """Each graph compiled; {} (logged) where compiling cannot work and `fallback`, else CompileError."""
    why = compile_unavailable(backend, device)
    if why is not None:
        if not fallback:
            raise CompileError(f"cannot compile the rewritten graph: {why}")
        logger.warning("torch.compile skipped, the prefill stays eager: %s", why)
        return {}
    return {name: CompiledGraph(gm, backend=backend, dynamic=dynamic, **kwargs) for name, gm in graphs.items()}
