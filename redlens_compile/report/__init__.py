"""Report stage: the FLOPs audit of a model before and after optimization."""

from .audit_report import SCHEMA_VERSION, AuditReport, atomic_write

__all__ = ["SCHEMA_VERSION", "AuditReport", "atomic_write"]
