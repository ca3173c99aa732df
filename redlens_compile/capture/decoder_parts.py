"""The decoder cut in two at layer K: layers 0..K (the head) and K+1.. with the lm_head (the tail).

Pruning inside the decoder (FastV, VTW) changes the sequence between the two: the tail runs on
fewer rows than the head. Each part is a view of the family's own language model over a range
of its layers, exported like the whole decoder, with the same four inputs (the tail's
`inputs_embeds` is the head's output hidden state). Views share every module with the model;
the layers keep their names (`layers.<original index>`), so annotations, passes and the FLOPs
audit see the original layer numbers and each layer writes its own slot of the KV cache.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .decoder_module import DecoderMasks, decoder_attention_mask, decoder_cache


class NamedLayers(nn.ModuleList):
    """A ModuleList whose children keep their original indices as names (iteration and slices work)."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for index, layer in layers.items():
            self.add_module(str(index), layer)

    def __getitem__(self, idx):
        items = list(self._modules.items())
        if isinstance(idx, slice):  # transformers iterates over self.layers[: num_hidden_layers]
            return NamedLayers({int(name): layer for name, layer in items[idx]})
        return items[idx][1]


def layer_range_view(language_model: nn.Module, start: int, stop: int, final_norm: bool) -> nn.Module:
    """The language model running only layers [start, stop); without its final norm unless asked."""
    view = copy.copy(language_model)
    view._modules = dict(language_model._modules)
    layers = list(language_model.layers)
    view.layers = NamedLayers({i: layers[i] for i in range(start, stop)})
    if not final_norm:
        view.norm = nn.Identity()
    types = getattr(language_model.config, "layer_types", None)
    if types:
        # families pick each layer's mask by its place in the loop (layer_types[i]): the view's i starts at 0
        view.config = copy.copy(language_model.config)
        view.config.layer_types = list(types[start:stop])
    return view


class DecoderPart(nn.Module):
    """Layers [start, stop) of the decoder; returns (output, key_start, value_start, ...).

    The output is the last layer's hidden state (head), or the logits (tail, with lm_head).
    """

    def __init__(self, language_model: nn.Module, start: int, stop: int, lm_head: nn.Module | None,
                 masks: DecoderMasks | None = None):
        super().__init__()
        self.masks = masks
        self.start, self.stop = start, stop
        self.language_model = layer_range_view(language_model, start, stop, final_norm=lm_head is not None)
        self.lm_head = lm_head if lm_head is not None else nn.Identity()
        self.config = language_model.config

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                visual_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = decoder_cache(self.config, self.masks)
        mask = decoder_attention_mask(self.masks, self.config, inputs_embeds, attention_mask, position_ids,
                                      visual_mask, cache)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=True)
        kv: list[torch.Tensor] = []
        for index in range(self.start, self.stop):
            layer = out.past_key_values.layers[index]
            kv.extend((layer.keys, layer.values))
        return (self.lm_head(out.last_hidden_state), *kv)
