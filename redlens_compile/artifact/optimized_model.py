"""OptimizedModel: the original model's vision path and token merge, the compiled decoder
(passes/compile.py CompiledDecoder: the rewritten graph(s) and the pruning stage) for the
prefill, and the original decoder for KV-cached decode steps."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from ..capture.decoder_module import kv_to_cache
from ..capture.families import FamilyAdapter
from ..config import RedLensConfig
from ..ops.token_pruning import KeptRows
from ..passes.compile import CompiledDecoder
from ..runtime.token_pruning import align_left, compose
from .forward_options import keep_logits, kept_labels, split_arguments
from .generation import DEFAULT_MAX_NEW_TOKENS, GraphForward, check_generation_options
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


class OptimizedModel(nn.Module):
    """Drop-in for the original model: `forward` returns its output type, `generate` is transformers'.

    Only the prefill sees visual tokens, so only the prefill runs through the rewritten graph;
    its KV cache is handed to the original decoder for the decode steps (artifact/generation.py),
    which never recompute the prefix.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        compiled: CompiledDecoder,
        report: AuditReport | None,
        config: RedLensConfig,
        output_cls: type,
        example_inputs: dict[str, Any] | None = None,
        rebuild: Callable[["OptimizedModel", torch.dtype, dict], "OptimizedModel"] | None = None,
    ):
        super().__init__()
        self.model = model
        self.compiled = compiled
        # Pruning after layer K: graph_module runs layers 0..K, tail_graph_module the rest and the lm_head.
        self.graph_module = compiled.graph_module
        self.tail_graph_module = compiled.tail_graph_module
        # generate's prefill: the same graph (same weights) with logits for the last position only.
        self.prefill_graph = compiled.prefill_graph
        self.decode_step = LayeredDecodeStep(model, adapter)
        self.adapter = adapter
        self.report = report
        self.config = config
        self.output_cls = output_cls  # the original model's output type
        self.example_inputs = example_inputs  # set by optimize: export_onnx's default example
        # (opt, dtype, example) -> opt rebuilt on a copy of the model in dtype, captured on example
        # (set by optimize: api.at_dtype; re-optimizing sits above the artifact)
        self.rebuild = rebuild
        self._torch_compiled: dict[str, Any] = {}  # graph name -> CompiledGraph, set by compile()

    def compile(self, backend: Any = "inductor", dynamic: bool = True, fallback: bool = True,
                **torch_compile_kwargs: Any) -> "OptimizedModel":
        """Compile the rewritten prefill graph(s) with torch.compile (inductor by default), shapes
        dynamic: prompts of other lengths and batch sizes reuse the compiled code. Where compiling
        cannot work (inductor on a CPU without a C++ compiler) the prefill stays eager with a logged
        warning, or with fallback=False a CompileError. The decode steps stay eager (one row a step:
        transformers' own layers). Returns self; `torch_compiled` says whether the graphs are compiled."""
        from .compiled import compile_graphs

        graphs = {"graph": self.graph_module, "prefill": self.prefill_graph}
        if self.tail_graph_module is not None:
            graphs["tail"] = self.tail_graph_module
        device = next(iter(self.graph_module.parameters()), torch.empty(0)).device
        self._torch_compiled = compile_graphs(graphs, device, backend=backend, dynamic=dynamic, fallback=fallback,
                                        **torch_compile_kwargs)
        return self

    @property
    def torch_compiled(self) -> bool:
        return bool(self._torch_compiled)

    def _graph(self, name: str):
        """The graph to run: compiled where compile() compiled it."""
        if name in self._torch_compiled:
            return self._torch_compiled[name]
        return {"graph": self.graph_module, "prefill": self.prefill_graph, "tail": self.tail_graph_module}[name]

    @property
    def pruning(self):
        return self.compiled.pruning

    @property
    def text_config(self):
        return self.adapter.language_model(self.model).config

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def run_decoder(self, decoder_inputs: DecoderInputs, last_position_only: bool = False) -> Prefill:
        """The prefill through the rewritten graph(s), with token pruning where the config prunes."""
        longest = self.compiled.seq_range[1]
        if longest is not None and decoder_inputs.seq_len > longest:
            raise ValueError(f"the prompt holds {decoder_inputs.seq_len} positions; the decoder graph serves at most "
                             f"{longest} ({self._length_limit(longest)}): use a shorter prompt or fewer image tiles")
        if self.tail_graph_module is not None:
            return self._run_split(decoder_inputs, last_position_only)
        kept = None
        if self.pruning is not None:
            pruned = self.pruning(decoder_inputs)
            decoder_inputs, kept = pruned.inputs, pruned.kept
        graph = self._graph("prefill" if last_position_only else "graph")
        logits, *kv = graph(*decoder_inputs.as_args())
        return Prefill(logits, tuple(kv), [decoder_inputs.attention_mask] * self.num_layers, decoder_inputs, kept)

    def _length_limit(self, longest: int) -> str:
        """Why the graph serves no longer prompt: the model's positions, or the family's length-dependent masks."""
        limit = getattr(self.text_config, "max_position_embeddings", None)
        if limit is not None and longest >= limit:
            return "the model's max_position_embeddings"
        window = getattr(self.text_config, "sliding_window", None)
        kind = f"with its sliding window of {window}" if window else "with the length"
        return f"the family's own mask code branches {kind}, and torch.export captured the lengths up to {longest}"

    def _run_split(self, decoder_inputs: DecoderInputs, last_position_only: bool) -> Prefill:
        """Layers 0..K on every row, the pruning stage on their output, layers K+1.. on the kept rows."""
        layer = self.pruning.layer
        # layers 0..K on left-aligned rows: FastV reads each sample's last row as its last real query
        decoder_inputs, aligned = align_left(decoder_inputs)
        hidden, *rest = self._graph("graph")(*decoder_inputs.as_args())
        # fastv's head graph returns layer K's last-query attention after its KV tensors
        head_kv, attention = (tuple(rest[:-1]), rest[-1]) if self.pruning.method == "fastv" else (tuple(rest), None)
        mid = DecoderInputs(hidden, decoder_inputs.attention_mask, decoder_inputs.position_ids, decoder_inputs.visual_mask)
        pruned = self.pruning(mid, attention)
        tail = self._graph("prefill" if last_position_only else "tail")
        logits, *tail_kv = tail(*pruned.inputs.as_args())
        masks = [decoder_inputs.attention_mask] * (layer + 1) + [pruned.inputs.attention_mask] * (self.num_layers - layer - 1)
        return Prefill(logits, head_kv + tuple(tail_kv), masks, pruned.inputs, compose(aligned, pruned.kept))

    def decode_masks(self, prefill: Prefill) -> list[torch.Tensor]:
        """Each layer's cache mask; additive, with the pruning's key bias, in the layers whose prefill had it."""
        bias = prefill.ran_on.key_bias
        if bias is None:
            return prefill.layer_masks
        biased = set(self.compiled.key_bias_layers)
        return [torch.where(m.bool(), bias if i in biased else torch.zeros_like(bias), torch.full_like(bias, float("-inf")))
                for i, m in enumerate(prefill.layer_masks)]

    @torch.no_grad()
    def forward(self, **kwargs: Any):
        """The original forward's output for a prompt: logits (with pruning over the kept rows only:
        [B, S', V], S' = text + kept visual rows), the KV cache, and with `labels` the family's loss
        (no gradient). `logits_to_keep` as the family takes it; what the graph cannot give raises."""
        inputs, own = split_arguments(self.model, kwargs)
        decoder_inputs = capture_decoder_inputs(self.model, self.adapter, inputs, require_visual=False)
        prefill = self.run_decoder(decoder_inputs)
        logits, loss = prefill.logits, None
        if own.get("labels") is not None:
            labels = kept_labels(own["labels"], prefill.kept)
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=self.text_config.vocab_size)
        if own.get("logits_to_keep") is not None:
            logits = keep_logits(logits, own["logits_to_keep"], prefill.kept, decoder_inputs.seq_len)
        out = self.output_cls(loss=loss, logits=logits, cache=kv_to_cache(prefill.kv, self.text_config))
        if prefill.kept is not None:
            # With pruning the rows are the batch's longest kept sample, left-padded: `kept_positions`
            # [B, S'] names each row's position in the input (-1: a pad).
            out["kept_positions"] = torch.where(prefill.kept.valid, prefill.kept.index,
                                                torch.full_like(prefill.kept.index, -1))
        return out if own.get("return_dict", True) is not False else out.to_tuple()

    def save_pretrained(self, directory):
        """Write this model's plan, config, report, example inputs, codebook (when pruning uses one),
        library versions and the model's fingerprint as a folder of JSON + safetensors, atomically;
        `from_pretrained` rebuilds it without ranking or planning. See artifact/saved.py."""
        from .saved import save_optimized

        return save_optimized(self, directory)

    @classmethod
    def from_pretrained(cls, directory, model: nn.Module, example_inputs: dict[str, Any] | None = None,
                        progress=None, check_versions: bool = True) -> "OptimizedModel":
        """The OptimizedModel saved in `directory`, rebuilt on `model` (the model it was optimized from).

        The folder and `model`'s fingerprint (class, config, parameter shapes, sampled weights) and
        the transformers version are checked before any capture; then the decoder is captured on
        `example_inputs` (default: the example saved in the folder) and the saved plan applied,
        with no ranking and no planning. The same as `rc.load(directory, model)` (api.load), which
        it calls through the package's entry points: loading re-optimizes, and the artifact sits
        below api in the layering (pyproject.toml's import-linter contract).
        """
        import redlens_compile

        return redlens_compile.load(directory, model, example_inputs, progress=progress, check_versions=check_versions)

    def export_onnx(self, directory, example_inputs: dict[str, Any] | None = None, dtype: str | None = None,
                    ort_optimized: bool = False):
        """ONNX files of this model (rewritten prefill, decode step, embedding) + redlens.json; see
        exporters/onnx.py. `directory` must be new, empty or an earlier export (replaced whole). `dtype` ("float32" or "float16"): what
        the files hold (default: the model's dtype; float32 for a bfloat16 model). `ort_optimized`: also
        onnxruntime's offline-optimized CPU files of the decoder graphs (*.ort-cpu.onnx)."""
        from ..exporters.onnx import check_export_dir, check_exportable, export_dtype, export_onnx
        from ..fingerprint import weights_fingerprint

        example = example_inputs if example_inputs is not None else self.example_inputs
        if example is None:
            raise ValueError("export_onnx needs example_inputs (the processor's output for one prompt)")
        own = self.model.get_input_embeddings().weight.dtype
        target = export_dtype(own, dtype)
        check_export_dir(directory)
        check_exportable(self.compiled, self.model, self.adapter)
        # the runner checks the model the user holds (before a rebuild in another dtype changes its bytes)
        fingerprint = weights_fingerprint(self.model)
        opt = self
        if target != own:
            if self.rebuild is None:
                from ..errors import ExportError

                raise ExportError(f"this optimized model does not hold the plan it was built from: export it in "
                                  f"{own} or optimize the model in the dtype the files should hold")
            logger.info("exporting in %s: rebuilding the %s model in that dtype", target, own)
            opt = self.rebuild(self, target, example)
        return export_onnx(opt.compiled, opt.model, opt.adapter, directory, example, config=opt.config,
                           fingerprint=fingerprint, ort_optimized=ort_optimized)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any):
        """The original model's `generate`, with the prefill run through the rewritten graph.

        transformers' own generation loop drives the decoding (greedy, sampling, beam search, logits
        processors, stopping criteria, `GenerationConfig`, `return_dict_in_generate`, streamers);
        what the graph prefill cannot serve (attention maps, hidden states, assisted decoding, chunked
        prefill, a cache passed in) raises before any work. Without a length limit (max_new_tokens,
        max_length, generation_config) it generates up to 32 new tokens.
        """
        check_generation_options(self.model, kwargs)
        if (self.model.generation_config.max_new_tokens is None and kwargs.get("generation_config") is None
                and kwargs.get("max_new_tokens") is None and kwargs.get("max_length") is None):
            kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        # on a copy of the model with its own forward: the user's model is never swapped (thread-safe)
        return GraphForward(self).generation_model().generate(input_ids=input_ids, **kwargs)
