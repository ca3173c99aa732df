"""A decode step the project owns: the language model's layers run one by one, each with its own mask.

After pruning inside the decoder (FastV, VTW) the layers before the cut hold the whole prompt in
their KV cache and the layers after it only the kept rows: one 2-D attention mask cannot
describe both, so transformers' forward cannot run the step. This one calls the family's own
modules (token embedding, rotary embedding, decoder layers, final norm, lm_head) and gives each
layer a boolean [B, 1, 1, L_i] mask over its own cache.
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture.families import FamilyAdapter


class LayeredDecodeStep:
    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.language_model = adapter.language_model(model)
        self.lm_head = adapter.lm_head(model)
        self.embed = model.get_input_embeddings()
        self.position_rows = adapter.position_rows

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache, masks: list[torch.Tensor]) -> torch.Tensor:
        """Next-token logits [B, V] for `tokens` [B, 1].

        position_ids: [B, 1] or [rows, B, 1] (M-RoPE); masks: per layer, [B, L_i + 1] over that
        layer's cache after this step's key is appended: 1 = attend (integer or bool), or an
        additive float mask (0 or a key bias to attend, -inf not to).
        """
        lm = self.language_model
        hidden = self.embed(tokens)
        position_embeddings = lm.rotary_emb(hidden, position_ids)
        text_positions = position_ids if position_ids.dim() == 2 else position_ids[0]
        for index, layer in enumerate(lm.layers):
            mask = masks[index]
            mask = (mask if mask.is_floating_point() else mask.bool())[:, None, None, :]
            out = layer(hidden, attention_mask=mask, position_ids=text_positions, cache=cache,
                        use_cache=True, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm_head(lm.norm(hidden))[:, -1]
