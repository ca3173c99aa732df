"""The decode step as a module of plain tensors, for export: one new token per row, a mask and a
key bias over each layer's cache, the KV cache in and out.

It runs capture/decode_step.py's layer-by-layer step (the one the artifact's layered decode
runs), so each layer gets its own additive mask: after pruning with proportional attention the
layers whose prefill carried the key bias keep it while decoding, and the others do not.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from ..capture.decode_step import DecodeLayers
from ..capture.families import FamilyAdapter


class DecoderStep(nn.Module):
    """(input_ids [B, 1], position_ids, attention_mask [B, L + 1], key_bias [B, L + 1], past k/v...)
    -> (logits [B, 1, V], present k/v...). attention_mask: 1 = attend; key_bias is added to the
    scores of the attended keys in the layers listed in `biased_layers`."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, biased_layers: set[int]):
        super().__init__()
        self.step = DecodeLayers(model, adapter)
        # registered here (the same modules): export sees them as this module's parameters
        self.language_model = self.step.language_model
        self.lm_head = self.step.lm_head
        self.embed = self.step.embed_tokens
        self.biased_layers = set(biased_layers)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                key_bias: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lm = self.language_model
        cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)], config=lm.config)
        hidden = self.step.embed(input_ids)
        attend = attention_mask.to(torch.bool)
        blocked = torch.full_like(key_bias, float("-inf"))
        plain = torch.where(attend, torch.zeros_like(key_bias), blocked)[:, None, None, :].to(hidden.dtype)
        biased = torch.where(attend, key_bias, blocked)[:, None, None, :].to(hidden.dtype)
        masks = [biased if index in self.biased_layers else plain for index in range(len(lm.layers))]
        logits = self.step.run(hidden, position_ids, cache, masks)
        kv: list[torch.Tensor] = []
        for layer in cache.layers:
            kv.extend((layer.keys, layer.values))
        return (logits, *kv)
