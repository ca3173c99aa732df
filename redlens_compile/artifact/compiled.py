"""torch.compile of the rewritten prefill graphs (`OptimizedModel.compile`).

The graphs compile with dynamic shapes (sequence length and batch are symbols), so a prompt of
another length runs the same compiled code. The runtime ops read a few sizes from data (the
longest sample's visual rows, a layer's probe count, the text keys a visual block sees): those
are traced as unbacked sizes (dynamo's capture_scalar_outputs and dynamic-output-shape ops,
patched on around every call, since tracing can happen on any call), not graph breaks. The two
once-per-forward mask checks, which pick kernel paths in Python (a graph break each, and the
pieces after a break recompiled for the next length), are lowered away first as for the ONNX
export (OptimizedModel.compile): a forward is one compiled graph.

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


class CompiledGraph:
    """A graph module compiled with torch.compile; called like the graph, with TRACE_CONFIG on
    and ExternBmmPass among inductor's post-grad passes (compiling happens on a call)."""

    def __init__(self, graph_module: torch.nn.Module, **compile_kwargs: Any):
        self.graph_module = graph_module
        self.compiled: Callable = torch.compile(graph_module, **compile_kwargs)
        self._bmm_pass = _extern_bmm_pass()

    def __call__(self, *args: torch.Tensor):
        import torch._inductor.config as inductor_config

        passes = inductor_config.post_grad_custom_pre_pass
        passes = () if passes is None else tuple(passes) if isinstance(passes, (list, tuple)) else (passes,)
        with torch._dynamo.config.patch(**TRACE_CONFIG), \
                inductor_config.patch(post_grad_custom_pre_pass=passes + (self._bmm_pass,)):
            return self.compiled(*args)


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
