"""A decode step the project owns: the language model's layers run one by one, each with its own mask.

After pruning inside the decoder (FastV, VTW) the layers before the cut hold the whole prompt in
their KV cache and the layers after it only the kept rows: one 2-D attention mask cannot
describe both, so transformers' forward cannot run the step. This one calls the family's own
modules (token embedding, rotary embedding, decoder layers, final norm, lm_head) and gives each
layer a boolean [B, 1, 1, L_i] mask over its own cache.

Each layer keeps its own mask kind: a sliding-window layer's cache (transformers'
DynamicSlidingWindowLayer) holds only the window's last rows, and its keys are those rows plus
the new one, so it takes the last columns of its mask (the keys inside the window), as the
family's own decode step does; full layers take the whole mask. Families whose rotary embedding
differs by layer kind (Gemma 3: a local base for sliding layers) get each layer its own.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..capture.families import FamilyAdapter
from ..capture.layer_kinds import unserved_reason  # noqa: F401  (what this step serves)


class LayeredDecodeStep:
    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.language_model = adapter.language_model(model)
        self.lm_head = adapter.lm_head(model)
        self.embed = model.get_input_embeddings()
        self.position_rows = adapter.position_rows
        config = self.language_model.config
        self.layer_types = list(getattr(config, "layer_types", None) or [None] * len(self.language_model.layers))
        rotary = self.language_model.rotary_emb
        self.rope_by_kind = "layer_type" in inspect.signature(rotary.forward).parameters

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache, masks: list[torch.Tensor]) -> torch.Tensor:
        """Next-token logits [B, V] for `tokens` [B, 1].

        position_ids: [B, 1] or [rows, B, 1] (M-RoPE); masks: per layer, [B, L_i + 1] over that
        layer's cache after this step's key is appended: 1 = attend (integer or bool), or an
        additive float mask (0 or a key bias to attend, -inf not to).
        """
        lm = self.language_model
        hidden = self.embed(tokens)
        if self.rope_by_kind:
            rope = {kind: lm.rotary_emb(hidden, position_ids, kind) for kind in set(self.layer_types)}
        else:
            shared = lm.rotary_emb(hidden, position_ids)
            rope = {kind: shared for kind in set(self.layer_types)}
        text_positions = position_ids if position_ids.dim() == 2 else position_ids[0]
        for index, layer in enumerate(lm.layers):
            # the keys this layer attends: its cached rows (a sliding layer's last window rows) + this step's
            keys = cache.layers[index].keys.shape[-2] + tokens.shape[1]
            mask = masks[index][:, -keys:]
            mask = (mask if mask.is_floating_point() else mask.bool())[:, None, None, :]
            out = layer(hidden, attention_mask=mask, position_ids=text_positions, cache=cache,
                        use_cache=True, position_embeddings=rope[self.layer_types[index]])
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm_head(lm.norm(hidden))[:, -1]
