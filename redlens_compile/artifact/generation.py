"""generate through transformers' own generation loop, with the prefill from the rewritten graph.

`OptimizedModel.generate` calls transformers' `generate` on a shallow copy of the model whose
forward is a `GraphForward` (the user's model is left as it is, so concurrent calls do not
interfere): the first call of the loop (the prefill, the only one
that sees visual tokens) runs the rewritten graph(s) and leaves a `PrefillCache`; every later call
(one new token) decodes on that cache. Everything else (logits processors, stopping criteria,
sampling, beam search, streamers, `GenerationConfig`, `return_dict_in_generate`) is
transformers' own code, so nothing is re-implemented and nothing is silently ignored.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from ..capture.decoder_inputs import capture_decoder_inputs

if TYPE_CHECKING:
    from .optimized_model import OptimizedModel, Prefill

logger = logging.getLogger(__name__)

# What the rewritten prefill cannot give, with the reason the error names.
_UNSERVED_OPTIONS = {
    "output_attentions": "the rewritten graph returns no attention maps",
    "output_hidden_states": "the rewritten graph returns no hidden states",
    "prefill_chunk_size": "the rewritten graph runs the whole prompt at once (its reductions need every visual row)",
    "prompt_lookup_num_tokens": "assisted decoding re-runs prompt rows outside the rewritten prefill",
    "assistant_model": "assisted decoding re-runs prompt rows outside the rewritten prefill",
    "assistant_early_exit": "assisted decoding re-runs prompt rows outside the rewritten prefill",
    "custom_generate": "a custom generation loop may call the model in ways the prefill graph does not serve",
}
# Caches the decode steps can continue: transformers' dynamic cache (what the prefill leaves).
_SERVED_CACHES = (None, "dynamic")
# Keyword arguments of a model forward that are not model inputs (the loop's own bookkeeping).
_LOOP_ARGUMENTS = ("return_dict", "use_cache", "logits_to_keep", "cache_position", "output_attentions",
                   "output_hidden_states")
DEFAULT_MAX_NEW_TOKENS = 32


def check_generation_options(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Raise ValueError for any option the graph prefill cannot serve, before any work."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("OptimizedModel.generate starts from the prompt: pass no cache/past_key_values "
                         "(the rewritten prefill builds the cache)")
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    unserved = {name: reason for name, reason in _UNSERVED_OPTIONS.items()
                if kwargs.get(name) not in (None, False) or getattr(config, name, None) not in (None, False)}
    if config.cache_implementation not in _SERVED_CACHES:
        unserved["cache_implementation"] = f"{config.cache_implementation!r}: the prefill leaves a dynamic cache"
    if unserved:
        detail = "; ".join(f"{name} ({reason})" for name, reason in sorted(unserved.items()))
        raise ValueError(f"OptimizedModel.generate does not serve {detail}: remove them. Everything else "
                         "transformers' generate takes (sampling, beam search, logits processors, stopping "
                         "criteria, streamers, return_dict_in_generate) is served.")


class PrefillCache(DynamicCache):
    """The KV cache the rewritten prefill leaves, with each layer's mask over its own cache rows.

    After token pruning the cache holds fewer rows than the prompt, and after pruning inside the
    decoder (FastV, VTW) layers hold different lengths, or scores carry a key bias: one 2-D
    attention mask over the prompt (what the loop keeps) cannot describe it. The masks live here,
    so beam search's reordering moves them with the keys and values they describe.
    """

    def __init__(self, kv: tuple[torch.Tensor, ...], config, layer_masks: list[torch.Tensor],
                 positions: torch.Tensor, uniform: bool):
        super().__init__(ddp_cache_data=[(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)], config=config)
        self.layer_masks = layer_masks  # per layer [B, L_i]: 0/1 integer, or additive float (key bias)
        self.positions = positions  # canonical position ids of the last token: [B, 1] or [rows, B, 1]
        self.uniform = uniform  # one 0/1 mask serves every layer: the model's own forward can decode

    def append_token(self) -> list[torch.Tensor]:
        """Extend every layer's mask by the next token's key (attend: 1, or 0 added to its scores)."""
        batch = self.layer_masks[0].shape[0]
        self.layer_masks = [torch.cat([m, m.new_zeros(batch, 1) if m.is_floating_point() else m.new_ones(batch, 1)],
                                      dim=-1) for m in self.layer_masks]
        self.positions = self.positions + 1
        return self.layer_masks

    def _select_rows(self, index: torch.Tensor) -> None:
        self.layer_masks = [m.index_select(0, index) for m in self.layer_masks]
        self.positions = self.positions.index_select(self.positions.dim() - 2, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx.to(self.layer_masks[0].device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(indices.to(self.layer_masks[0].device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        index = torch.arange(self.layer_masks[0].shape[0], device=self.layer_masks[0].device)
        self._select_rows(index.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a PrefillCache cannot be cropped: its rows are not the prompt's (token pruning)")


class GraphForward:
    """Stands in for the model's forward during `generate`: graph prefill, then cached decode steps."""

    def __init__(self, opt: "OptimizedModel"):
        self.opt = opt
        self.original = opt.model.forward
        # generate validates its model kwargs against the forward's signature: keep the original's
        self.__signature__ = inspect.signature(self.original)

    def generation_model(self) -> torch.nn.Module:
        """A shallow copy of the model whose forward is this one, for one generate call.

        It shares the model's submodules, parameters and config (nn.Module keeps them in dicts the
        copy shares), so nothing is copied; only the copy's own attributes differ. The user's model
        is never touched, so several threads can generate on one model at once."""
        proxy = copy.copy(self.opt.model)
        object.__setattr__(proxy, "forward", self)
        return proxy

    def __call__(self, **kwargs: Any):
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if isinstance(cache, PrefillCache):
            return self._decode(kwargs, cache)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("OptimizedModel.generate cannot continue a cache it did not build")
        return self._prefill(kwargs)

    def _prefill(self, kwargs: dict[str, Any]):
        opt = self.opt
        inputs = {k: v for k, v in kwargs.items() if k not in _LOOP_ARGUMENTS and v is not None}
        decoder_inputs = capture_decoder_inputs(opt.model, opt.adapter, inputs, require_visual=False)
        prefill: Prefill = opt.run_decoder(decoder_inputs, last_position_only=True)
        cache = PrefillCache(prefill.kv, opt.text_config, opt.decode_masks(prefill),
                             decoder_inputs.position_ids[..., -1:], prefill.uniform and prefill.ran_on.key_bias is None)
        return opt.output_cls(logits=prefill.logits, cache=cache)

    def _decode(self, kwargs: dict[str, Any], cache: PrefillCache):
        tokens = kwargs.get("input_ids")
        if tokens is None or tokens.shape[-1] != 1:
            raise ValueError("OptimizedModel's decode steps take one new token id per row (input_ids [B, 1])")
        masks = cache.append_token()
        if cache.uniform:
            # The model's own forward, with the cache's mask (the prompt's mask may be longer than the
            # pruned cache) and the positions the loop tracks (the prompt's, never renumbered).
            positions = kwargs.get("position_ids")
            out = self.original(input_ids=tokens, attention_mask=masks[0],
                                position_ids=cache.positions if positions is None else positions,
                                cache=cache, use_cache=True, return_dict=True)
            return self.opt.output_cls(logits=out.logits[:, -1:], cache=cache)
        # layers hold caches of different lengths, or a key bias: the project's own step, a mask per layer
        logits = self.opt.decode_step(tokens, cache.positions, cache, masks)
        return self.opt.output_cls(logits=logits[:, None], cache=cache)
