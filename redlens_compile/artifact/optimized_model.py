"""OptimizedModel: the original model's vision path and token merge, the rewritten decoder graph
for the prefill, and the original decoder for KV-cached decode steps."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from ..capture.decoder_module import kv_to_cache
from ..capture.families import FamilyAdapter
from ..config import RedLensConfig
from ..passes.infra import run_passes
from ..passes.last_position_logits import LastPositionLogitsPass
from ..passes.selectors import clone_graph_module
from ..ops.token_pruning import KeptRows
from ..passes.key_bias import KEY_BIAS_LAYERS
from ..passes.token_pruning import TokenPruning
from .layered_decode import LayeredDecodeStep
from ..report.audit_report import AuditReport

logger = logging.getLogger(__name__)


@dataclass
class Prefill:
    """What a prefill leaves: logits, the KV cache tensors, and each layer's cache mask."""

    logits: torch.Tensor
    kv: tuple[torch.Tensor, ...]
    layer_masks: list[torch.Tensor]  # [B, L_i] per decoder layer, 1 = a real row in that layer's cache
    ran_on: DecoderInputs  # the inputs of the (last) graph, pruned when pruning
    kept: KeptRows | None = None  # which rows pruning kept (original positions), when pruning

    @property
    def uniform(self) -> bool:
        """One mask serves every layer (transformers' own forward can decode)."""
        first = self.layer_masks[0]
        return all(m is first for m in self.layer_masks)


# Generation options that are not model inputs; the values that change nothing are allowed.
_GENERATION_ONLY = ("logits_processor", "stopping_criteria", "streamer", "generation_config",
                    "prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids", "synced_gpus")
# What greedy decoding does anyway (transformers 5's GenerationConfig leaves these None).
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "return_dict_in_generate": False,
            "output_scores": False, "output_logits": False, "output_attentions": False,
            "output_hidden_states": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
# Sampling parameters: transformers' greedy generate ignores them too (do_sample=False).
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _refuse_unserved_generation_options(kwargs: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict()) | set(_GENERATION_ONLY)
    unserved = sorted(k for k, v in kwargs.items() if k in known and k not in _SAMPLING_ONLY
                      and v is not None and not (k in _NEUTRAL and v == _NEUTRAL[k]))
    if unserved:
        raise ValueError(
            f"OptimizedModel.generate decodes greedily with a KV cache and does not serve {unserved}: "
            "remove them (served: max_new_tokens, min_new_tokens, eos_token_id, pad_token_id)"
        )
    for key in [k for k in kwargs if k in known]:  # neutral generation options are not model inputs
        kwargs.pop(key)


class OptimizedModel(nn.Module):
    """Drop-in for the original model: `forward` returns its output type, `generate` is greedy.

    Only the prefill sees visual tokens, so only the prefill runs through the rewritten graph;
    its KV cache is handed to the original decoder for the decode steps, which never recompute
    the prefix.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        graph_module: fx.GraphModule,
        report: AuditReport,
        config: RedLensConfig,
        output_cls: type,
        pruning: TokenPruning | None = None,
        tail_graph_module: fx.GraphModule | None = None,
    ):
        super().__init__()
        self.model = model
        self.graph_module = graph_module
        # generate's prefill: the same graph (same weights) with logits for the last position only.
        # Pruning after layer K: graph_module runs layers 0..K, tail_graph_module the rest and the lm_head.
        self.tail_graph_module = tail_graph_module
        last = tail_graph_module if tail_graph_module is not None else graph_module
        self.prefill_graph, _ = run_passes(clone_graph_module(last), [LastPositionLogitsPass()])
        self.decode_step = LayeredDecodeStep(model, adapter)
        self.adapter = adapter
        self.report = report
        self.config = config
        self._output_cls = output_cls
        self.pruning = pruning

    @property
    def text_config(self):
        return self.adapter.language_model(self.model).config

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def run_decoder(self, decoder_inputs: DecoderInputs, last_position_only: bool = False) -> Prefill:
        """The prefill through the rewritten graph(s), with token pruning where the config prunes."""
        if self.tail_graph_module is not None:
            return self._run_split(decoder_inputs, last_position_only)
        kept = None
        if self.pruning is not None:
            pruned = self.pruning(decoder_inputs)
            decoder_inputs, kept = pruned.inputs, pruned.kept
        graph = self.prefill_graph if last_position_only else self.graph_module
        logits, *kv = graph(*decoder_inputs.as_args())
        return Prefill(logits, tuple(kv), [decoder_inputs.attention_mask] * self.num_layers, decoder_inputs, kept)

    def _run_split(self, decoder_inputs: DecoderInputs, last_position_only: bool) -> Prefill:
        """Layers 0..K on every row, the pruning stage on their output, layers K+1.. on the kept rows."""
        layer = self.pruning.layer
        hidden, *rest = self.graph_module(*decoder_inputs.as_args())
        # fastv's head graph returns layer K's last-query attention after its KV tensors
        head_kv, attention = (tuple(rest[:-1]), rest[-1]) if self.pruning.method == "fastv" else (tuple(rest), None)
        mid = DecoderInputs(hidden, decoder_inputs.attention_mask, decoder_inputs.position_ids, decoder_inputs.visual_mask)
        pruned = self.pruning(mid, attention)
        tail = self.prefill_graph if last_position_only else self.tail_graph_module
        logits, *tail_kv = tail(*pruned.inputs.as_args())
        masks = [decoder_inputs.attention_mask] * (layer + 1) + [pruned.inputs.attention_mask] * (self.num_layers - layer - 1)
        return Prefill(logits, head_kv + tuple(tail_kv), masks, pruned.inputs, pruned.kept)

    def _decode_masks(self, prefill: Prefill) -> list[torch.Tensor]:
        """Each layer's cache mask; additive, with the pruning's key bias, in the layers whose prefill had it."""
        bias = prefill.ran_on.key_bias
        if bias is None:
            return prefill.layer_masks
        biased = set(self.graph_module.meta.get(KEY_BIAS_LAYERS, ()))
        return [torch.where(m.bool(), bias if i in biased else torch.zeros_like(bias), torch.full_like(bias, float("-inf")))
                for i, m in enumerate(prefill.layer_masks)]

    @torch.no_grad()
    def forward(self, **inputs: Any):
        inputs.pop("use_cache", None)
        if inputs.get("past_key_values") is not None:
            raise ValueError(
                "OptimizedModel.forward runs the prefill; pass no past_key_values (use generate for decoding)"
            )
        decoder_inputs = capture_decoder_inputs(self.model, self.adapter, inputs, require_visual=False)
        # With pruning the logits cover the kept rows only: [B, S', V], S' = text + kept visual rows.
        prefill = self.run_decoder(decoder_inputs)
        return self._output_cls(logits=prefill.logits, past_key_values=kv_to_cache(prefill.kv, self.text_config))

    def _generation_position_ids(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The prefill position ids exactly as transformers' generate makes them (M-RoPE too)."""
        kwargs = {k: v for k, v in inputs.items() if k != "position_ids"}
        return self.model._prepare_position_ids_for_generation(inputs["input_ids"], kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        min_new_tokens: int | None = None,
        **model_inputs: Any,
    ) -> torch.Tensor:
        """Greedy decoding; returns the prompt followed by the new tokens, like transformers.

        Served: max_new_tokens, min_new_tokens, eos_token_id, pad_token_id. Any other generation
        option set to a non-default value (beam search, sampling, scores, streamers, ...) raises:
        it is never silently ignored.
        """
        if do_sample:
            raise ValueError("OptimizedModel.generate decodes greedily; pass do_sample=False")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
        min_new = 0 if min_new_tokens is None else min_new_tokens
        if not isinstance(min_new, int) or min_new < 0:
            raise ValueError(f"min_new_tokens={min_new_tokens!r}: must be an int >= 0")
        model_inputs.pop("use_cache", None)  # always a KV cache
        _refuse_unserved_generation_options(model_inputs)
        gen_config = self.model.generation_config
        eos = eos_token_id if eos_token_id is not None else gen_config.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else gen_config.pad_token_id
        if pad is None and eos_ids.numel():
            pad = int(eos_ids[0])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        inputs = dict(model_inputs, input_ids=input_ids, attention_mask=attention_mask)
        position_ids = self._generation_position_ids(inputs)
        decoder_inputs = capture_decoder_inputs(
            self.model, self.adapter, dict(inputs, position_ids=position_ids), require_visual=False
        )
        prefill = self.run_decoder(decoder_inputs, last_position_only=True)
        cache = kv_to_cache(prefill.kv, self.text_config)
        # The cache may hold fewer positions than the prompt (token pruning): its masks follow it.
        # Positions continue from the prompt's last one, which pruning never drops or renumbers.
        layer_masks = self._decode_masks(prefill)
        cache_mask = layer_masks[0]
        canonical_positions = decoder_inputs.position_ids
        logits = prefill.logits

        batch = input_ids.shape[0]
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        sequences = input_ids
        next_logits = logits[:, -1, :]
        for step in range(max_new_tokens):
            if step < min_new and eos_ids.numel():  # as transformers' MinNewTokensLengthLogitsProcessor
                next_logits = next_logits.index_fill(-1, eos_ids, float("-inf"))
            next_tokens = next_logits.argmax(dim=-1)
            if pad is not None:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            if eos_ids.numel():
                unfinished &= ~torch.isin(next_tokens, eos_ids)
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
                break
            if prefill.uniform and prefill.ran_on.key_bias is None:
                cache_mask = torch.cat([cache_mask, cache_mask.new_ones(batch, 1)], dim=-1)
                position_ids = position_ids[..., -1:] + 1
                out = self.model(
                    input_ids=next_tokens[:, None],
                    attention_mask=cache_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = out.past_key_values
                next_logits = out.logits[:, -1, :]
            else:  # layers hold caches of different lengths: the project's own step, a mask per layer
                canonical_positions = canonical_positions[..., -1:] + 1
                # the new key: attend (1 in a 0/1 mask, no bias in an additive one)
                new_key = [m.new_zeros(batch, 1) if m.is_floating_point() else m.new_ones(batch, 1) for m in layer_masks]
                layer_masks = [torch.cat([m, k], dim=-1) for m, k in zip(layer_masks, new_key)]
                next_logits = self.decode_step(next_tokens[:, None], canonical_positions, cache, layer_masks)
        return sequences
