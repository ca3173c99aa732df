"""A guard for device-agnostic code, on a machine without an accelerator.

`factories_without_device()` records every tensor factory call (torch.arange, zeros, ones,
full, empty, tensor, eye, linspace, rand*, ...) made directly from redlens_compile's own code
without a `device=`: such a tensor lands on the default device (the CPU), not beside the
inputs, and on a GPU model it is the first cross-device op that fails. Everything runs on the
CPU here, so mixing cannot be seen; the missing argument can. With `runtime=True` it also
records float64 in redlens_compile's code (dtype=torch.float64, .double(), .to(torch.float64)),
which some accelerators lack.

`numpy_without_cpu()` reads the package's source: every `.numpy()` must read a `.cpu()` result
(numpy reads host memory only).
"""

from __future__ import annotations

import ast
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import redlens_compile

PACKAGE = Path(redlens_compile.__file__).parent
FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.eye, torch.linspace,
             torch.logspace, torch.randn, torch.rand, torch.randint, torch.randperm, torch.empty_strided,
             torch.scalar_tensor, torch.tril_indices, torch.triu_indices}
# data of these already lives on a device (as_tensor of a tensor keeps it)
MAYBE_FACTORIES = {torch.as_tensor}
# the thin-linear lowering is CPU-only by design
ALLOWED = {PACKAGE / "ops" / "thin_linear.py", PACKAGE / "passes" / "thin_linear.py"}


class _Recorder(TorchFunctionMode):
    def __init__(self, runtime: bool):
        super().__init__()
        self.runtime = runtime
        self.sites: list[str] = []

    def _caller(self) -> str | None:
        frame = sys._getframe(2)  # the code that called the torch function
        path = Path(frame.f_code.co_filename)
        if PACKAGE in path.parents and path not in ALLOWED:
            return f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno}"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        lacks_device = kwargs.get("device") is None
        if (func in FACTORIES and lacks_device) or (func in MAYBE_FACTORIES and lacks_device and args
                                                     and not isinstance(args[0], torch.Tensor)):
            site = self._caller()
            if site is not None:
                self.sites.append(f"{site} torch.{func.__name__} without device=")
        if self.runtime and _makes_float64(func, args, kwargs):
            site = self._caller()
            if site is not None:
                self.sites.append(f"{site} float64 ({getattr(func, '__name__', func)})")
        return func(*args, **kwargs)


def _makes_float64(func, args, kwargs) -> bool:
    if func is torch.Tensor.double:
        return True
    if kwargs.get("dtype") is torch.float64:
        return True
    return func is torch.Tensor.to and any(a is torch.float64 for a in args[1:])


@contextmanager
def factories_without_device(runtime: bool = False):
    """Yields the list of offending call sites ("file:line what") made inside the block."""
    recorder = _Recorder(runtime)
    with recorder:
        yield recorder.sites


def numpy_without_cpu() -> list[str]:
    """`x.numpy()` calls in the package whose receiver is not a `.cpu()` call (or a `.float()`
    / `.detach()` of one), as "file:line"."""
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy":
                if "OrtValue" in lines[node.lineno - 1]:  # onnxruntime's values, said so on the line
                    continue
                if not node.args and not _reads_host(node.func.value):
                    sites.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return sites


def _reads_host(receiver: ast.AST) -> bool:
    """Is `receiver` (what .numpy() is called on) a host tensor by construction?"""
    while isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute):
        if receiver.func.attr == "cpu":
            return True
        if receiver.func.attr not in ("float", "detach", "contiguous"):
            return False
        receiver = receiver.func.value
    if isinstance(receiver, ast.IfExp):  # (a.cpu().float() if ... else a.cpu())
        return _reads_host(receiver.body) and _reads_host(receiver.orelse)
    return False
