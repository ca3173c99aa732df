"""Analysis stage: FLOPs counting (fvcore), layer ranking and the budget planner."""

from .budget import ReductionPlan, plan_reductions
from .flops import (
    FLOP_CONVENTION,
    GraphFlops,
    VisionFlops,
    causal_keys_seen,
    count_eager_decoder_flops,
    count_graph_flops,
    count_vision_flops,
    sdpa_flop_handle,
)

__all__ = [
    "FLOP_CONVENTION",
    "GraphFlops",
    "ReductionPlan",
    "VisionFlops",
    "causal_keys_seen",
    "count_eager_decoder_flops",
    "count_graph_flops",
    "count_vision_flops",
    "plan_reductions",
    "sdpa_flop_handle",
]
