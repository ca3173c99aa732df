"""Run the family's own vision + merge code and catch what it hands to the decoder.

A forward pre-hook on the language model records its keyword arguments (the merged
`inputs_embeds`, the attention mask, the position ids the family computed: M-RoPE for
Qwen2-VL) and stops the forward there. This is exact by construction and needs no
per-family re-implementation of the token merge.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CaptureError, InputError, NoImageTokensError
from .families import FamilyAdapter

logger = logging.getLogger(__name__)


class _DecoderReached(Exception):
    """Raised by the pre-hook to stop the forward once the decoder inputs are known."""


def run_to_decoder(model: nn.Module, adapter: FamilyAdapter, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Run `model`'s forward (vision, projector, token merge) and stop at its language model.

    Returns the keyword arguments the family's code passed to the language model. Other
    hooks registered around this call see the vision path run exactly as in a real forward.
    """
    seen: dict[str, Any] = {}
    caller = threading.get_ident()

    def hook(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != caller:  # another thread's forward on the same model: not this call's
            return
        seen.update(kwargs)
        raise _DecoderReached

    kwargs = dict(inputs)
    kwargs["use_cache"] = False
    handle = adapter.language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**kwargs)
    except _DecoderReached:
        pass
    finally:
        handle.remove()
    return seen


@dataclass
class DecoderInputs:
    """The canonical inputs of the decoder graph; every field is a tensor (no None)."""

    inputs_embeds: torch.Tensor  # [B, S, D]
    attention_mask: torch.Tensor  # [B, S], 1 = attend
    position_ids: torch.Tensor  # [B, S], or [3, B, S] for M-RoPE
    visual_mask: torch.Tensor  # [B, S] bool, True at visual-token positions
    # [B, S] added to every attention score of each key: set by token pruning with proportional
    # attention, read by graphs rewritten with passes/key_bias.py (a fifth input); None otherwise.
    key_bias: torch.Tensor | None = None

    def as_args(self) -> tuple[torch.Tensor, ...]:
        args = (self.inputs_embeds, self.attention_mask, self.position_ids, self.visual_mask)
        return args if self.key_bias is None else (*args, self.key_bias)

    @property
    def batch_size(self) -> int:
        return self.inputs_embeds.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs_embeds.shape[1]

    def repeat_batch(self, times: int) -> "DecoderInputs":
        pos_dim = self.position_ids.dim() - 2
        return DecoderInputs(
            inputs_embeds=self.inputs_embeds.repeat(times, 1, 1),
            attention_mask=self.attention_mask.repeat(times, 1),
            position_ids=torch.cat([self.position_ids] * times, dim=pos_dim),
            visual_mask=self.visual_mask.repeat(times, 1),
            key_bias=None if self.key_bias is None else self.key_bias.repeat(times, 1),
        )


def _canonical_position_ids(
    position_ids: torch.Tensor | None, adapter: FamilyAdapter, batch: int, seq: int, device: torch.device
) -> torch.Tensor:
    rows = adapter.position_rows
    if position_ids is None:
        # What the decoder does itself when given none (no cache): 0..S-1 for every row.
        base = torch.arange(seq, device=device)
        return base.expand(batch, seq).clone() if rows == 1 else base.expand(rows, batch, seq).clone()
    if rows == 1:
        if position_ids.dim() != 2:
            raise CaptureError(f"expected 2-D position ids [batch, seq], got shape {tuple(position_ids.shape)}")
        return position_ids.expand(batch, seq).clone()
    if position_ids.dim() == 2:
        return position_ids[None].expand(rows, batch, seq).clone()
    if position_ids.shape[0] == rows + 1:
        # transformers' generate prepends a text-position row; with an explicit attention
        # mask the decoder only uses the M-RoPE rows.
        position_ids = position_ids[1:]
    if position_ids.shape[0] != rows:
        raise CaptureError(f"expected {rows}-row position ids, got shape {tuple(position_ids.shape)}")
    return position_ids.expand(rows, batch, seq).clone()


# Inputs that carry what image placeholders stand for: pixels, or (transformers' generate) the
# vision tower's outputs encoded before the loop.
_VISUAL_INPUTS = ("pixel_values", "mm_encoder_outputs", "image_embeds", "image_features", "image_patches")


def _has_visual_input(inputs: Mapping[str, Any]) -> bool:
    return any(v is not None and not (isinstance(v, dict) and not v)
               for k, v in inputs.items() if k.startswith(_VISUAL_INPUTS))


def image_token_mask(model: nn.Module, adapter: FamilyAdapter, inputs: Mapping[str, Any],
                     require_visual: bool = True) -> torch.Tensor:
    """[B, S] bool, True at image placeholder positions; NoImageTokensError when there are none."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise CaptureError("inputs need 'input_ids' (the dict a processor returns) to locate visual tokens")
    visual_mask = adapter.visual_mask(model, input_ids)
    if require_visual and not bool(visual_mask.any()):
        raise NoImageTokensError(
            f"the inputs hold no image token (ids {adapter.visual_token_ids(model)}): there is nothing visual "
            "to optimize. Build the prompt with the processor, passing images= and a text that contains the "
            "image placeholder (e.g. processor.image_token)."
        )
    if bool(visual_mask.any()) and not _has_visual_input(inputs):
        # the family would embed the placeholders as text (or fail deep in its vision code)
        raise InputError(
            f"input_ids hold {int(visual_mask.sum())} image placeholder tokens (ids {adapter.visual_token_ids(model)}) "
            "but the inputs have no pixel_values: pass the images the placeholders stand for (the processor's "
            "output for images= and text=), or a text without placeholders")
    return visual_mask


def _check_token_types(model: nn.Module, inputs: Mapping[str, Any], visual_mask: torch.Tensor) -> None:
    """Families whose forward takes token type ids (M-RoPE positions, image blocks that attend both
    ways) compute other results without them, silently: refuse instead."""
    import inspect

    wanted = [p for p in inspect.signature(type(model).forward).parameters if p.endswith("token_type_ids")]
    if wanted and bool(visual_mask.any()) and all(inputs.get(name) is None for name in wanted):
        raise CaptureError(
            f"{type(model).__name__} needs {' or '.join(wanted)} with image inputs (its processor returns them): "
            "without them the family computes other positions or masks for the image tokens")


def capture_decoder_inputs(
    model: nn.Module, adapter: FamilyAdapter, inputs: Mapping[str, Any], require_visual: bool = True
) -> DecoderInputs:
    """Run `model`'s forward up to its decoder and return the decoder's canonical inputs."""
    visual_mask = image_token_mask(model, adapter, inputs, require_visual)
    _check_token_types(model, inputs, visual_mask)

    seen = run_to_decoder(model, adapter, inputs)
    if "inputs_embeds" not in seen or seen["inputs_embeds"] is None:
        raise CaptureError(
            f"{type(model).__name__}.forward did not call its language model with inputs_embeds; "
            "this transformers version may have changed the family's forward"
        )

    embeds: torch.Tensor = seen["inputs_embeds"]
    batch, seq = embeds.shape[:2]
    mask = seen.get("attention_mask")
    if isinstance(mask, dict):
        # The family built its decoder's masks itself (image blocks attending both ways, sliding
        # windows); the decoder graph rebuilds them from the 2-D mask (adapter.decoder_masks).
        if adapter.decoder_masks(model) is None:
            raise CaptureError(f"{type(model).__name__} hands its decoder a mask mapping built by code the "
                               "capture does not know how to rebuild (no get_block_sequence_ids_for_mask / "
                               "create_masks_for_vision_model beside the model)")
        mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
    elif not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise CaptureError("only 2-D attention masks [batch, seq] are supported (got a 4-D or mapping mask)")
    return DecoderInputs(
        inputs_embeds=embeds,
        attention_mask=mask.to(torch.long),
        position_ids=_canonical_position_ids(seen.get("position_ids"), adapter, batch, seq, embeds.device),
        visual_mask=visual_mask.to(embeds.device),
    )
