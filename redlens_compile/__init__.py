"""redlens-compile: a training-free inference compiler for decoder-only multimodal LLMs."""

__version__ = "0.1.0"

from .api import audit, capture, optimize  # noqa: E402
from .artifact.optimized_model import OptimizedModel  # noqa: E402
from .config import RedLensConfig  # noqa: E402
from .errors import (  # noqa: E402
    BudgetUnreachableError,
    CaptureError,
    CodebookError,
    ConfigError,
    NoImageTokensError,
    PruningError,
    RedLensError,
    ReductionUnavailableError,
    UnsupportedModelError,
)
from .report.audit_report import AuditReport  # noqa: E402

__all__ = [
    "BudgetUnreachableError",
    "AuditReport",
    "CaptureError",
    "CodebookError",
    "ConfigError",
    "NoImageTokensError",
    "PruningError",
    "OptimizedModel",
    "RedLensConfig",
    "RedLensError",
    "ReductionUnavailableError",
    "UnsupportedModelError",
    "__version__",
    "audit",
    "capture",
    "optimize",
]
