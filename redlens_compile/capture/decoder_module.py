"""The decoder as one module with plain tensor inputs and outputs (what gets exported)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


# The layer kinds whose masks DecoderMasks builds (the keys of a family's mask mapping).
FULL, SLIDING = "full_attention", "sliding_attention"


class DecoderMasks:
    """The decoder's attention masks, built inside the graph from the 2-D mask with tensor ops that
    never branch on the length, where the family's own mask code would (sliding windows: its
    functions skip or shorten masks by comparing the length with the window, and torch.export
    then serves only one side of the comparison) or cannot be traced (Gemma 3's image blocks
    run through vmap, which the graph's FLOPs count, a jit trace, cannot follow).

    Full layers: causal, OR the same image block where the family's image tokens see each other
    both ways (`create_masks_for_vision_model`); sliding layers: that AND the window (key index >
    query index - window, over sequence indices, padding included, as the family counts them);
    padded keys off. The capture check (graph against eager logits) and the family tests hold
    this to the family's own forward.
    """

    def __init__(self, image_blocks: bool, window: int | None, mapping: bool):
        self.image_blocks = image_blocks  # image tokens attend to later tokens of their image
        self.window = window  # None: no sliding layer
        self.mapping = mapping  # the decoder takes {layer kind: mask}; else one 4-D mask for every layer

    def __call__(self, config, inputs_embeds, attention_mask, position_ids, visual_mask, cache):
        seq = inputs_embeds.shape[1]
        index = torch.arange(seq, device=inputs_embeds.device)
        allowed = (index[None, :] <= index[:, None])[None]  # [1, query, key]
        if self.image_blocks:
            visual = visual_mask.to(torch.bool)
            starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
            block = torch.where(visual, starts.to(torch.long).cumsum(1) - 1, -1)
            allowed = allowed | ((block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0))
        full = allowed & attention_mask.to(torch.bool)[:, None, :]
        masks = {FULL: full[:, None]}
        if self.window is not None:
            masks[SLIDING] = (full & (index[None, :] > index[:, None] - self.window)[None])[:, None]
        if self.mapping:
            return masks
        return masks[SLIDING if self.window is not None else FULL]


def decoder_cache(config, masks: DecoderMasks | None) -> DynamicCache:
    """The cache the wrapped decoder fills. Where the graph builds the masks, sliding layers keep
    every row (full layers): the family's sliding cache crops to the window's last rows, a slice
    whose length depends on the sequence's. kv_to_cache crops them after the graph, in eager."""
    cache = DynamicCache(config=config)
    if masks is not None and masks.window is not None:
        cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                        for layer in cache.layers]
    return cache


def decoder_attention_mask(masks: DecoderMasks | None, config, inputs_embeds, attention_mask, position_ids,
                           visual_mask, cache):
    """What the decoder is given as its attention mask: the 2-D mask, or the masks built in the graph."""
    if masks is None:
        return attention_mask
    text_positions = position_ids if position_ids.dim() == 2 else position_ids[0]
    return masks(config, inputs_embeds, attention_mask, text_positions, visual_mask, cache)


class DecoderWithHead(nn.Module):
    """language model + lm_head; returns (logits, key_0, value_0, key_1, value_1, ...).

    The KV cache leaves as plain tensors so the graph has no cache object in its signature;
    `kv_to_cache` rebuilds the DynamicCache the original model continues decoding with.
    `visual_mask` is an input because the reduction passes read it; the plain decoder ignores it.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, masks: DecoderMasks | None = None):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.masks = masks

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = decoder_cache(self.language_model.config, self.masks)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=decoder_attention_mask(self.masks, self.language_model.config, inputs_embeds,
                                                  attention_mask, position_ids, visual_mask, cache),
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
