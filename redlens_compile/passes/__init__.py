"""Passes stage: graph rewrites on the decoder GraphModule, one pass per file."""

from .dead_code import DeadCodeEliminationPass
from .infra import PassRecord, RedLensPass, run_passes
from .strip_asserts import StripAssertsPass

__all__ = ["DeadCodeEliminationPass", "PassRecord", "RedLensPass", "StripAssertsPass", "run_passes"]
