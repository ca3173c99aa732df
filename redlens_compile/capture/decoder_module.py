"""The decoder as one module with plain tensor inputs and outputs (what gets exported)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache


class DecoderWithHead(nn.Module):
    """language model + lm_head; returns (logits, key_0, value_0, key_1, value_1, ...).

    The KV cache leaves as plain tensors so the graph has no cache object in its signature;
    `kv_to_cache` rebuilds the DynamicCache the original model continues decoding with.
    `visual_mask` is an input because the reduction passes read it; the plain decoder ignores it.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.language_model.config)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        kv: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            kv.extend((layer.keys, layer.values))
        return (self.lm_head(out.last_hidden_state), *kv)


class LogitsOnly(nn.Module):
    """Wraps a decoder (eager or graph) to return only logits: what fvcore can trace."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.decoder(*args)[0]


def kv_to_cache(kv: tuple[torch.Tensor, ...], config) -> DynamicCache:
    pairs = [(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
    return DynamicCache(ddp_cache_data=pairs, config=config)
