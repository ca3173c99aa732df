"""One decode step, layer by layer: the family's own modules (token embedding, rotary embedding,
decoder layers, final norm, lm_head) run with a mask per layer over that layer's cache.

transformers' forward gives every layer one mask built from one 2-D attention mask. Two callers
need a mask per layer, and both run this step:
- the artifact's decode after pruning inside the decoder (FastV, VTW; artifact/layered_decode.py):
  the layers before the cut hold the whole prompt in their KV cache and the layers after it only
  the kept rows;
- the exported decode step (exporters/decoder_step.py): after pruning with proportional attention
  the layers whose prefill carried the key bias keep it while decoding, and the others do not.

Families whose rotary embedding differs by layer kind (Gemma 3: a local base for sliding layers)
get each layer its own; capture/layer_kinds.py says which decoders the step serves. This module
imports neither the artifact nor the exporters.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from .families import FamilyAdapter
from .layer_kinds import unserved_reason  # noqa: F401  (which decoders this step serves)


class DecodeLayers:
    """The modules of one decode step, shared with the model (no copy). `embed` then `run`:
    callers build their per-layer masks in between, in the hidden state's dtype."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.language_model = adapter.language_model(model)
        self.lm_head = adapter.lm_head(model)
        self.embed_tokens = model.get_input_embeddings()
        config = self.language_model.config
        self.layer_types = list(getattr(config, "layer_types", None) or [None] * len(self.language_model.layers))
        rotary = self.language_model.rotary_emb
        self.rope_by_kind = "layer_type" in inspect.signature(rotary.forward).parameters

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def run(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits [B, T, V] of the embedded tokens `hidden` [B, T, D] on `cache` (updated in place).

        position_ids: [B, T] or [rows, B, T] (M-RoPE); masks: one per layer, [B, 1, T, keys] as the
        layer's attention takes it (boolean, or additive float)."""
        lm = self.language_model
        if self.rope_by_kind:
            rope = {kind: lm.rotary_emb(hidden, position_ids, kind) for kind in set(self.layer_types)}
        else:
            shared = lm.rotary_emb(hidden, position_ids)
            rope = {kind: shared for kind in set(self.layer_types)}
        text_positions = position_ids if position_ids.dim() == 2 else position_ids[0]
        for index, layer in enumerate(lm.layers):
            out = layer(hidden, attention_mask=masks[index], position_ids=text_positions, cache=cache,
                        use_cache=True, position_embeddings=rope[self.layer_types[index]])
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm_head(lm.norm(hidden))
