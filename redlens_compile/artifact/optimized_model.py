"""OptimizedModel: the original model's vision path and token merge, the rewritten decoder graph
for the prefill, and the original decoder for KV-cached decode steps."""

from __future__ import annotations

import logging
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
from ..passes.token_pruning import TokenPruning
from ..report.audit_report import AuditReport

logger = logging.getLogger(__name__)


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
    ):
        super().__init__()
        self.model = model
        self.graph_module = graph_module
        # generate's prefill: the same graph (same weights) with logits for the last position only.
        self.prefill_graph, _ = run_passes(clone_graph_module(graph_module), [LastPositionLogitsPass()])
        self.adapter = adapter
        self.report = report
        self.config = config
        self._output_cls = output_cls
        self.pruning = pruning

    @property
    def text_config(self):
        return self.adapter.language_model(self.model).config

    def decoder_inputs(self, decoder_inputs: DecoderInputs) -> DecoderInputs:
        """What the rewritten graph runs on: the captured inputs, token-pruned when the config prunes."""
        return decoder_inputs if self.pruning is None else self.pruning(decoder_inputs).inputs

    def run_decoder(self, decoder_inputs: DecoderInputs, last_position_only: bool = False
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], DecoderInputs]:
        """Prefill: (logits, KV cache tensors, the inputs the graph ran on, pruned when pruning)."""
        decoder_inputs = self.decoder_inputs(decoder_inputs)
        graph = self.prefill_graph if last_position_only else self.graph_module
        logits, *kv = graph(*decoder_inputs.as_args())
        return logits, tuple(kv), decoder_inputs

    @torch.no_grad()
    def forward(self, **inputs: Any):
        inputs.pop("use_cache", None)
        if inputs.get("past_key_values") is not None:
            raise ValueError(
                "OptimizedModel.forward runs the prefill; pass no past_key_values (use generate for decoding)"
            )
        decoder_inputs = capture_decoder_inputs(self.model, self.adapter, inputs, require_visual=False)
        # With pruning the logits cover the kept rows only: [B, S', V], S' = text + kept visual rows.
        logits, kv, _ = self.run_decoder(decoder_inputs)
        return self._output_cls(logits=logits, past_key_values=kv_to_cache(kv, self.text_config))

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
        **model_inputs: Any,
    ) -> torch.Tensor:
        """Greedy decoding; returns the prompt followed by the new tokens, like transformers."""
        if do_sample:
            raise ValueError("OptimizedModel.generate decodes greedily; pass do_sample=False")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
        model_inputs.pop("use_cache", None)
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
        logits, kv, ran_on = self.run_decoder(decoder_inputs, last_position_only=True)
        cache = kv_to_cache(kv, self.text_config)
        # The cache may hold fewer positions than the prompt (token pruning): its mask follows it.
        # Positions continue from the prompt's last one, which pruning never drops or renumbers.
        cache_mask = ran_on.attention_mask

        batch = input_ids.shape[0]
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        sequences = input_ids
        next_logits = logits[:, -1, :]
        for step in range(max_new_tokens):
            next_tokens = next_logits.argmax(dim=-1)
            if pad is not None:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            if eos_ids.numel():
                unfinished &= ~torch.isin(next_tokens, eos_ids)
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
                break
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
        return sequences
