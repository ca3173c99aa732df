"""Passes stage: graph rewrites on the decoder GraphModule, one pass per file."""

from .causal_fast_path import CausalFastPathPass
from .dead_code import DeadCodeEliminationPass
from .dynamic_ffn import DynamicFFNPass
from .hollow_attention import HollowAttentionPass
from .infra import PassRecord, RedLensPass, run_passes
from .last_position_logits import LastPositionLogitsPass
from .pipeline import PipelineResult, apply_plan, build_passes
from .strip_asserts import StripAssertsPass
from .thin_linear import ThinLinearPass

__all__ = [
    "CausalFastPathPass",
    "LastPositionLogitsPass",
    "DeadCodeEliminationPass",
    "DynamicFFNPass",
    "HollowAttentionPass",
    "PassRecord",
    "PipelineResult",
    "RedLensPass",
    "StripAssertsPass",
    "ThinLinearPass",
    "apply_plan",
    "build_passes",
    "run_passes",
]
