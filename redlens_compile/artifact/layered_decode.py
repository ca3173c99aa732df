"""The artifact's decode step after pruning inside the decoder: capture/decode_step.py's
layer-by-layer step, each layer given its own mask over its own cache.

After pruning inside the decoder (FastV, VTW) the layers before the cut hold the whole prompt in
their KV cache and the layers after it only the kept rows: one 2-D attention mask cannot
describe both, so transformers' forward cannot run the step. Each layer keeps its own mask kind:
a sliding-window layer's cache (transformers' DynamicSlidingWindowLayer) holds only the window's
last rows, and its keys are those rows plus the new one, so it takes the last columns of its
mask (the keys inside the window), as the family's own decode step does; full layers take the
whole mask.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture.decode_step import DecodeLayers
from ..capture.families import FamilyAdapter
from ..capture.layer_kinds import unserved_reason  # noqa: F401  (what this step serves)


class LayeredDecodeStep:
    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.layers = DecodeLayers(model, adapter)
        self.position_rows = adapter.position_rows

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache, masks: list[torch.Tensor]) -> torch.Tensor:
        """Next-token logits [B, V] for `tokens` [B, 1].

        position_ids: [B, 1] or [rows, B, 1] (M-RoPE); masks: per layer, [B, L_i + 1] over that
        layer's cache after this step's key is appended: 1 = attend (integer or bool), or an
        additive float mask (0 or a key bias to attend, -inf not to).
        """
        layer_masks = []
        for index, mask in enumerate(masks):
            # the keys this layer attends: its cached rows (a sliding layer's last window rows) + this step's
            keys = cache.layers[index].keys.shape[-2] + tokens.shape[1]
            mask = mask[:, -keys:]
            layer_masks.append((mask if mask.is_floating_point() else mask.bool())[:, None, None, :])
        hidden = self.layers.embed(tokens)
        return self.layers.run(hidden, position_ids, cache, layer_masks)[:, -1]
