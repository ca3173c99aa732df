"""Which decoders the project's layer-by-layer decode step (artifact/layered_decode.py) serves.

Read from the model's config and its layer class only, so capture (the family table), the
runtime's pruning builder and the artifact ask the same question without importing the step.
"""

from __future__ import annotations

import inspect

from torch import nn

from .families import FamilyAdapter


# What the step hands each decoder layer; a layer forward that takes more (Gemma 4's per-layer
# inputs and shared KV states) is not served, and neither are layer kinds other than full and sliding.
_STEP_LAYER_INPUTS = {"self", "hidden_states", "attention_mask", "position_ids", "position_embeddings", "cache",
                      "past_key_values", "use_cache", "cache_position", "args", "kwargs"}
_SERVED_KINDS = {None, "full_attention", "sliding_attention"}


def unserved_reason(model: nn.Module, adapter: FamilyAdapter) -> str | None:
    """Why the layer-by-layer decode cannot run this decoder, or None where it can."""
    language_model = adapter.language_model(model)
    kinds = sorted(set(getattr(language_model.config, "layer_types", None) or []) - _SERVED_KINDS)
    if kinds:
        return f"this decoder has {kinds} layers (served: full-attention and sliding-window layers)"
    layer = language_model.layers[0]
    extra = [name for name in inspect.signature(type(layer).forward).parameters if name not in _STEP_LAYER_INPUTS]
    if extra:
        return f"its decoder layers take {extra}, which the family's own forward computes across layers"
    return None
