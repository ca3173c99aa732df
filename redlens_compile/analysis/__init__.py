"""Analysis stage: FLOPs counting (fvcore), layer ranking and the budget planner."""

from .budget import LayerSettings, ReductionPlan, plan_fixed, plan_to_budget
from .ranking import LayerRanking
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
    "LayerRanking",
    "LayerSettings",
    "ReductionPlan",
    "VisionFlops",
    "causal_keys_seen",
    "count_eager_decoder_flops",
    "count_graph_flops",
    "count_vision_flops",
    "plan_fixed",
    "plan_to_budget",
    "sdpa_flop_handle",
]
