"""Passes stage: graph rewrites on the decoder GraphModule, one pass per file, ending in the
compile step (compile.py) that hands one CompiledDecoder to the artifact and the exporters."""

from .causal_fast_path import CausalFastPathPass
from .compile import CompiledDecoder, compile_decoder
from .dead_code import DeadCodeEliminationPass
from .dynamic_ffn import DynamicFFNPass
from .hollow_attention import HollowAttentionPass
from .infra import PassRecord, RedLensPass, RedLensPassResult, run_passes
from .last_position_logits import LastPositionLogitsPass
from .pipeline import PipelineResult, apply_plan, build_passes
from .strip_asserts import StripAssertsPass
from .thin_linear import ThinLinearPass

__all__ = [
    "CausalFastPathPass",
    "CompiledDecoder",
    "LastPositionLogitsPass",
    "DeadCodeEliminationPass",
    "DynamicFFNPass",
    "HollowAttentionPass",
    "PassRecord",
    "PipelineResult",
    "RedLensPass",
    "RedLensPassResult",
    "StripAssertsPass",
    "ThinLinearPass",
    "apply_plan",
    "build_passes",
    "compile_decoder",
    "run_passes",
]
