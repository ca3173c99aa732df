"""The decode step as a module of plain tensors, for export: one new token per row, a mask and a
key bias over each layer's cache, the KV cache in and out.

It runs the family's own modules layer by layer (as artifact/layered_decode.py does), so each
layer gets its own additive mask: after pruning with proportional attention the layers whose
prefill carried the key bias keep it while decoding, and the others do not.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from ..capture.families import FamilyAdapter


class DecoderStep(nn.Module):
    """(input_ids [B, 1], position_ids, attention_mask [B, L + 1], key_bias [B, L + 1], past k/v...)
    -> (logits [B, 1, V], present k/v...). attention_mask: 1 = attend; key_bias is added to the
    scores of the attended keys in the layers listed in `biased_layers`."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, biased_layers: set[int]):
        super().__init__()
        self.language_model = adapter.language_model(model)
        self.lm_head = adapter.lm_head(model)
        self.embed = model.get_input_embeddings()
        self.biased_layers = set(biased_layers)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                key_bias: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lm = self.language_model
        cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)], config=lm.config)
        hidden = self.embed(input_ids)
        position_embeddings = lm.rotary_emb(hidden, position_ids)
        text_positions = position_ids if position_ids.dim() == 2 else position_ids[0]
        attend = attention_mask.to(torch.bool)
        blocked = torch.full_like(key_bias, float("-inf"))
        plain = torch.where(attend, torch.zeros_like(key_bias), blocked)[:, None, None, :].to(hidden.dtype)
        biased = torch.where(attend, key_bias, blocked)[:, None, None, :].to(hidden.dtype)
        for index, layer in enumerate(lm.layers):
            mask = biased if index in self.biased_layers else plain
            out = layer(hidden, attention_mask=mask, position_ids=text_positions, cache=cache, use_cache=True,
                        position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = self.lm_head(lm.norm(hidden))
        kv: list[torch.Tensor] = []
        for layer in cache.layers:
            kv.extend((layer.keys, layer.values))
        return (logits, *kv)
