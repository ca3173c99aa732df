"""redlens-compile: a training-free inference compiler for decoder-only multimodal LLMs."""

__version__ = "0.1.0"

from .config import RedLensConfig  # noqa: E402
from .errors import (  # noqa: E402
    BudgetUnreachableError,
    CaptureError,
    CodebookError,
    ConfigError,
    ExportError,
    InputError,
    ModelFilesError,
    NoImageTokensError,
    OutputFolderError,
    PruningError,
    RedLensError,
    ReductionUnavailableError,
    SavedModelError,
    ReportError,
    UnsupportedModelError,
)

# torch and transformers load on first use of these (PEP 562), so the CLI can reject bad
# arguments in well under a second.
_LAZY = {
    "audit": ("api", "audit"),
    # `redlens_compile.capture` is the capture stage's package; its entry point is capture_decoder.
    "capture_decoder": ("api", "capture"),
    "optimize": ("api", "optimize"),
    "load": ("api", "load"),  # = OptimizedModel.from_pretrained
    "OptimizedModel": ("artifact.optimized_model", "OptimizedModel"),
    "AuditReport": ("report.audit_report", "AuditReport"),
    "OnnxRunner": ("exporters.ort_runner", "OnnxRunner"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BudgetUnreachableError",
    "AuditReport",
    "CaptureError",
    "CodebookError",
    "ConfigError",
    "ExportError",
    "NoImageTokensError",
    "OnnxRunner",
    "OptimizedModel",
    "PruningError",
    "RedLensConfig",
    "RedLensError",
    "ReductionUnavailableError",
    "SavedModelError",
    "ReportError",
    "UnsupportedModelError",
    "__version__",
    "audit",
    "capture_decoder",
    "load",
    "optimize",
]
