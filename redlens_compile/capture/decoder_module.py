"""The decoder as one module with plain tensor inputs and outputs (what gets exported)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache


class ImageBlockMasks:
    """The masks a family's base model hands its decoder when an image's tokens see each other
    both ways (Gemma 3: `create_masks_for_vision_model`), rebuilt inside the graph from the
    visual mask: full layers OR(causal, same image block), sliding layers AND that with the
    window, padding keys off. Plain tensor ops: the family's own builder runs through vmap,
    which the graph's FLOPs count (a jit trace) cannot follow. The capture check (graph against
    eager logits) holds this to the family's code.
    """

    def __call__(self, config, inputs_embeds, attention_mask, position_ids, visual_mask, cache):
        seq = inputs_embeds.shape[1]
        index = torch.arange(seq, device=inputs_embeds.device)
        causal = index[None, :] <= index[:, None]  # [query, key]
        visual = visual_mask.to(torch.bool)
        starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
        block = torch.where(visual, starts.to(torch.long).cumsum(1) - 1, -1)
        same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
        full = (causal[None] | same_block) & attention_mask.to(torch.bool)[:, None, :]
        masks = {"full_attention": full[:, None]}
        window = getattr(config, "sliding_window", None)
        if window:
            masks["sliding_attention"] = (full & (index[None, :] > index[:, None] - window)[None])[:, None]
        return masks


def decoder_attention_mask(masks: ImageBlockMasks | None, config, inputs_embeds, attention_mask, position_ids,
                           visual_mask, cache):
    """What the decoder is given as its attention mask: the 2-D mask, or the family's mask mapping."""
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

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, masks: ImageBlockMasks | None = None):
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
        cache = DynamicCache(config=self.language_model.config)
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
