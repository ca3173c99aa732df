"""ONNX export of a compiled decoder (passes/compile.py CompiledDecoder, with the model it was
compiled from): the rewritten prefill, a decode step and the token embedding, in the layout
onnxruntime users expect, with a `redlens.json` manifest. OptimizedModel.export_onnx delegates
here (after rebuilding in another dtype where asked); this module never imports the artifact.

Files (weights as external data beside each graph):
- `decoder_prefill.onnx`: the rewritten decoder graph (lowered by onnx_lowering.py):
  inputs_embeds, attention_mask, position_ids, visual_mask (+ key_bias with proportional
  pruning) -> logits, present.%d.key|value.
- `decoder_step.onnx`: one new token: input_ids, position_ids, attention_mask, key_bias,
  past_key_values.%d.key|value -> logits, present.%d.key|value.
- `embed_tokens.onnx`: input_ids -> inputs_embeds.
- `vision.onnx` where the family's vision tower and projector export and the front built on it
  matches the family's code (exporters/vision_front.py): one image's inputs -> its features.
  Elsewhere the manifest's `front` says why the vision part, merge and positions run in torch.
- `prune.onnx` when the config prunes before the first layer (exporters/prune_graph.py): the
  stage that picks the kept rows, between the front and the prefill.

- `decoder_prefill.ort-cpu.onnx`, `decoder_step.ort-cpu.onnx` with `ort_optimized=True`:
  onnxruntime's own offline graph optimization (ORT_ENABLE_EXTENDED, CPU provider) of the two
  decoder graphs, weights as external data beside them. They may hold onnxruntime's CPU-only
  contrib ops (FusedMatMul, QuickGelu...), so they are for that provider only and are not
  onnx.checker-clean; the standard files stay beside them, and the manifest names both
  (`graphs.<name>.optimized.CPUExecutionProvider`). `OnnxRunner(..., optimized=True)` runs them.

Every written graph then goes through onnx_rewrites.py (x * rsqrt(v) as x / sqrt(v): onnxruntime
fuses the RMS norms of that form into one kernel); the manifest's `lowering` counts them.

The manifest says what runs where. Everything is written into a scratch folder
beside the target and renamed into place once every file passed the ONNX checker: a failed
export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.export import Dim

from ..capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from ..errors import ExportError
from ..files import check_output_folder, staged_folder
from ..fingerprint import weights_fingerprint
from ..capture.families import FamilyAdapter
from ..config import RedLensConfig
from ..passes.compile import CompiledDecoder
from ..passes.infra import run_passes
from ..passes.selectors import clone_graph_module
from .decoder_step import DecoderStep
from . import prune_graph
from .onnx_lowering import LowerForOnnxPass
from .onnx_rewrites import rewrite_file
from .vision_front import VISION, export_front

logger = logging.getLogger(__name__)

MANIFEST = "redlens.json"
FORMAT = "redlens-onnx/1"
PREFILL, STEP, EMBED = "decoder_prefill.onnx", "decoder_step.onnx", "embed_tokens.onnx"
MAX_BATCH = 256
EXPORT_COMMAND = "export"  # the outputs manifest's command: a later export replaces the folder whole
# onnxruntime's offline optimization: the files it writes per provider (CPU-only fused ops inside)
ORT_OPTIMIZED = {"CPUExecutionProvider": "ort-cpu"}
ORT_OPTIMIZED_GRAPHS = ("decoder_prefill", "decoder_step")
# what the files may hold: onnxruntime's CPU provider has no bfloat16 kernels for common ops (Mul)
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export_dtype(model_dtype: torch.dtype, dtype: str | torch.dtype | None) -> torch.dtype:
    """The element type the exported files hold, decided before any work: `dtype` where given
    ("float32" or "float16"), else the model's own, except bfloat16, which exports as float32."""
    if dtype is None:
        if model_dtype == torch.bfloat16:
            logger.warning("a bfloat16 model: the ONNX files hold float32 (onnxruntime's CPU provider has no bfloat16 "
                           "kernels); pass dtype='float16' (CLI: --dtype float16) for half-precision files")
            return torch.float32
        if model_dtype in EXPORT_DTYPES.values():
            return model_dtype
        raise ExportError(f"the model's dtype {model_dtype} has no ONNX export here: pass dtype='float32' or 'float16'")
    name = str(dtype).removeprefix("torch.")
    if name not in EXPORT_DTYPES:
        raise ExportError(f"dtype={dtype!r}: the ONNX files can hold {' or '.join(EXPORT_DTYPES)} "
                          "(onnxruntime's CPU provider has no bfloat16 kernels); choose one of them")
    return EXPORT_DTYPES[name]


def cast_inputs(inputs: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The processor's floating tensors (pixel values) in `dtype`; the rest as given."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def check_export_dir(out: Path, flag: str = "") -> None:
    """The target must be new, empty or an earlier export (replaced whole), and writable: checked first."""
    check_output_folder(Path(out), EXPORT_COMMAND, flag=flag, error=ExportError)


class _NamedGraph(nn.Module):
    """The prefill graph module as a plain module (torch.onnx exports modules)."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                visual_mask: torch.Tensor, key_bias: torch.Tensor | None = None):
        args = (inputs_embeds, attention_mask, position_ids, visual_mask)
        return tuple(self.graph_module(*(args if key_bias is None else (*args, key_bias))))


# torch.onnx logs this once per export for each torchvision op it cannot register: no graph of
# ours holds a torchvision op, so it is noise to the user.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


@contextlib.contextmanager
def _quiet_exporter():
    """Around one torch.onnx.export call: drop the torchvision notice and the FutureWarnings torch's
    exporter raises about its own internals (e.g. pytree's LeafSpec); every other warning still shows."""
    registration = logging.getLogger(_REGISTRATION_LOGGER)
    notice = _DropTorchvisionNotice()
    registration.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        registration.removeFilter(notice)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes) -> dict[str, int]:
    """Write `module` to `path` (weights as external data beside it); returns onnx_rewrites' counts."""
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, dynamo=True, optimize=True, verbose=False)
    except Exception as exc:
        lines = str(exc).splitlines()
        missing = next((line for line in lines if "No ONNX function found for" in line), None)
        if missing is not None:
            raise ExportError(f"{path.name}: an op of the graph has no ONNX translation: {missing.strip()[:300]}; "
                              "export a config without the pass that inserts it") from exc
        summary = next((line for line in lines if line.startswith("<class")), lines[0] if lines else "")
        raise ExportError(f"{path.name}: torch.onnx could not export the graph ({type(exc).__name__}: "
                          f"{summary.strip()[:400]})") from exc
    program.save(str(path), external_data=True)
    return rewrite_file(path)


def _staged_sessions(staging: Path):
    """(graph name, feeds) -> outputs over the files written so far, for the front's check."""
    import onnxruntime as ort

    files = {"embed_tokens": EMBED, "vision": VISION}
    sessions: dict[str, Any] = {}

    def run(name: str, feeds: dict) -> list:
        if name not in sessions:
            sessions[name] = ort.InferenceSession(str(staging / files[name]), providers=["CPUExecutionProvider"])
        return sessions[name].run(None, feeds)

    return run


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {exc}") from exc


def _examples(compiled: CompiledDecoder, model: nn.Module, adapter: FamilyAdapter,
              example_inputs: Mapping[str, Any]) -> tuple[DecoderInputs, DecoderInputs]:
    """The decoder inputs before and after pruning, at batch 2 (batch 1 would be specialized by
    export): the prune graph's example and the prefill graph's."""
    decoder_inputs = capture_decoder_inputs(model, adapter, example_inputs)
    if decoder_inputs.batch_size == 1:
        decoder_inputs = decoder_inputs.repeat_batch(2)
    pruning = compiled.pruning
    return decoder_inputs, pruning(decoder_inputs).inputs if pruning is not None else decoder_inputs


def check_exportable(compiled: CompiledDecoder, model: nn.Module, adapter: FamilyAdapter) -> None:
    """What the export does not serve, refused before any work."""
    sliding = adapter.sliding_layer_types(model)
    if sliding:
        raise ExportError(f"this decoder has {sliding} layers: the exported decode step gives every layer one mask over "
                          "its whole cache, right for full attention only; ONNX export of sliding-window decoders is "
                          "not built yet")
    if compiled.tail_graph_module is not None:
        raise ExportError(f"prune={compiled.pruning.method!r} cuts the decoder in two graphs with a layer-by-layer "
                          "decode: its ONNX export is not built yet; export a config that prunes before the first layer")


def export_onnx(compiled: CompiledDecoder, model: nn.Module, adapter: FamilyAdapter, directory: str | os.PathLike,
                example_inputs: Mapping[str, Any], config: RedLensConfig, fingerprint: str | None = None,
                ort_optimized: bool = False) -> Path:
    """Write the ONNX files of `compiled` (compiled from `model`) and the manifest into `directory`
    (new, empty or an earlier export, which is replaced whole); returns its path.

    The files hold the model's dtype (a bfloat16 model is refused: onnxruntime's CPU provider has
    no bfloat16 kernels; OptimizedModel.export_onnx rebuilds it in float32 or float16 first).
    `fingerprint`: the weights the runner later checks (default: `model`'s).
    `ort_optimized`: also write onnxruntime's offline-optimized CPU files of the decoder graphs
    (write_ort_optimized), beside the standard ones.
    """
    out = Path(directory)
    own = model.get_input_embeddings().weight.dtype
    target = export_dtype(own, None)
    if target != own:
        raise ExportError(f"the model's dtype {own}: the files hold {target}; rebuild the optimized model in that dtype "
                          "first (OptimizedModel.export_onnx(dtype=...) does)")
    check_export_dir(out)
    check_exportable(compiled, model, adapter)
    fingerprint = fingerprint if fingerprint is not None else weights_fingerprint(model)
    example_inputs = cast_inputs(example_inputs, target)
    try:
        with staged_folder(out, EXPORT_COMMAND, error=ExportError) as staging:  # checked above
            manifest = _write_graphs(compiled, model, adapter, config, staging, example_inputs)
            # OnnxRunner(directory, model) refuses a model whose weights are not these
            manifest["model"]["weights_fingerprint"] = fingerprint
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            for graph in manifest["graphs"].values():
                _check(staging / graph["file"])
            if ort_optimized:  # from the checked files; the manifest again, naming them
                for name in ORT_OPTIMIZED_GRAPHS:
                    graph = manifest["graphs"][name]
                    graph["optimized"] = {"CPUExecutionProvider": write_ort_optimized(staging, graph["file"])}
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except OSError as exc:
        raise ExportError(f"{out}: the folder cannot be written ({exc.strerror or exc})") from exc
    logger.info("ONNX files written to %s", out)
    return out


def optimized_name(file: str, provider: str = "CPUExecutionProvider") -> str:
    """decoder_prefill.onnx -> decoder_prefill.ort-cpu.onnx (the provider it was optimized for)."""
    return f"{Path(file).stem}.{ORT_OPTIMIZED[provider]}.onnx"


def write_ort_optimized(folder: Path, file: str) -> dict:
    """onnxruntime's offline optimization of `file` (ORT_ENABLE_EXTENDED on the CPU provider: the
    fusions every machine's CPU provider runs; ORT_ENABLE_ALL would add layout changes for this
    machine's instruction set) written beside it, weights as external data; its manifest entry."""
    import onnxruntime as ort

    target = optimized_name(file)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{target}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(folder / file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{file}: onnxruntime could not optimize it offline ({type(exc).__name__}: {exc})"[:600]
                          + "; export without ort_optimized") from exc
    return {"file": target, "graph_optimization_level": "ORT_ENABLE_EXTENDED", "onnxruntime": ort.__version__,
            "note": "onnxruntime's CPU-only fused ops inside: for the CPU provider of this onnxruntime version, "
                    "not onnx.checker-clean; the standard file beside it is"}


def _write_graphs(compiled: CompiledDecoder, model: nn.Module, adapter: FamilyAdapter, config: RedLensConfig,
                  staging: Path, example_inputs: Mapping[str, Any]) -> dict:
    import onnx
    import onnxruntime
    import transformers

    layers = adapter.num_layers(model)
    unpruned, example = _examples(compiled, model, adapter, example_inputs)
    masks = adapter.decoder_masks(model)
    lowered, records = run_passes(clone_graph_module(compiled.graph_module),
                                  [LowerForOnnxPass(looks_ahead=masks is not None and masks.image_blocks,
                                                    example_args=example.as_args())])
    lowering = records[0].findings["lowering"]

    # prefill: the rewritten graph
    # The sequence axis is left to export (Dim.AUTO): the block plans of hollow attention give
    # guards sympy cannot prove for a stated range, though they hold for every length.
    batch, seq = Dim("batch", min=1, max=MAX_BATCH), Dim.AUTO
    pos_axis = example.position_ids.dim() - 2
    names = ["inputs_embeds", "attention_mask", "position_ids", "visual_mask"]
    shapes = [{0: batch, 1: seq}, {0: batch, 1: seq}, {pos_axis: batch, pos_axis + 1: seq}, {0: batch, 1: seq}]
    if example.key_bias is not None:
        names.append("key_bias")
        shapes.append({0: batch, 1: seq})
    prefill_rewrites = _export(_NamedGraph(lowered).eval(), example.as_args(), staging / PREFILL, names,
                               ["logits", *kv_names("present", layers)], dict(zip(names, shapes)))

    # decode step: the original layers over the cache, a mask and a key bias per step
    biased = set(compiled.key_bias_layers) if example.key_bias is not None else set()
    step = DecoderStep(model, adapter, biased).eval()
    with torch.no_grad():
        _, *past = lowered(*example.as_args())
    rows = example.batch_size
    step_positions = example.position_ids[..., -1:] + 1
    device = example.inputs_embeds.device  # the step's example beside the prefill's (any device)
    step_args = (torch.ones(rows, 1, dtype=torch.long, device=device), step_positions,
                 torch.ones(rows, example.seq_len + 1, dtype=torch.long, device=device),
                 torch.zeros(rows, example.seq_len + 1, dtype=example.inputs_embeds.dtype, device=device), *past)
    step_names = ["input_ids", "position_ids", "attention_mask", "key_bias", *kv_names("past_key_values", layers)]
    auto = Dim.AUTO
    step_shapes = {"input_ids": {0: auto}, "position_ids": {pos_axis: auto}, "attention_mask": {0: auto, 1: auto},
                   "key_bias": {0: auto, 1: auto}, "past": tuple({0: auto, 2: auto} for _ in past)}
    step_rewrites = _export(step, step_args, staging / STEP, step_names, ["logits", *kv_names("present", layers)],
                            step_shapes)

    # token embedding
    embed = model.get_input_embeddings()
    _export(embed, (torch.ones(2, 3, dtype=torch.long, device=embed.weight.device),), staging / EMBED, ["input_ids"], ["inputs_embeds"],
            {"input": {0: Dim("batch", min=1, max=MAX_BATCH), 1: Dim("seq", min=1, max=8192)}})

    front = export_front(model, adapter, example_inputs, staging, _export, _staged_sessions)
    graphs = {
        "decoder_prefill": {"file": PREFILL, "inputs": names, "outputs": ["logits", *kv_names("present", layers)]},
        "decoder_step": {"file": STEP, "inputs": step_names, "outputs": ["logits", *kv_names("present", layers)],
                         "key_bias_layers": sorted(biased)},
        "embed_tokens": {"file": EMBED, "inputs": ["input_ids"], "outputs": ["inputs_embeds"]},
    }
    if front["vision"] is not None:
        graphs["vision"] = front["vision"]
    in_ort = front["runs_in"] == "onnxruntime"

    stage = compiled.pruning
    pruning = stage.describe() if stage is not None else None
    if stage is not None:
        # the pruning stage before the first layer (prototypes as a constant of the graph)
        prune_inputs, prune_outputs = prune_graph.input_names(stage), prune_graph.output_names(stage)
        _export(prune_graph.PruneGraph(stage).eval(), prune_graph.example_args(stage, unpruned),
                staging / prune_graph.PRUNE, prune_inputs, prune_outputs,
                prune_graph.dynamic_shapes(stage, unpruned))
        graphs["prune"] = {"file": prune_graph.PRUNE, "inputs": prune_inputs, "outputs": prune_outputs}
    text_config = adapter.language_model(model).config
    return {
        "format": FORMAT,
        "dtype": str(example.inputs_embeds.dtype).removeprefix("torch."),  # what the graphs compute in
        "model": {"class": type(model).__name__, "model_type": model.config.model_type,
                  "layers": layers, "hidden_size": text_config.hidden_size, "vocab_size": text_config.vocab_size},
        "graphs": graphs,
        "front": {k: v for k, v in front.items() if k != "vision"},
        "position_rows": adapter.position_rows,
        "token_ids": {"visual": adapter.visual_token_ids(model),
                      "eos": model.generation_config.eos_token_id, "pad": model.generation_config.pad_token_id},
        "config": config.to_dict(),
        "pruning": pruning,
        "runs_where": {
            "vision tower and projector": "onnxruntime (vision.onnx, once per image)" if in_ort
            else "torch (the family's own code; front.why says why)",
            "token merge, position ids": "numpy" if in_ort else "torch (the family's own code)",
            "token pruning stage (which rows are kept)": "onnxruntime (prune.onnx; random's seeded scores from "
            "torch's generator)" if pruning else "not used",
            "decoder prefill": "onnxruntime",
            "decode steps": "onnxruntime",
        },
        "lowering": {
            "sdpa_causal_fast_path -> masked SDPA": lowering.causal_fast_path - lowering.causal_chunks,
            "sdpa_causal_fast_path -> causal query chunks (the example's mask sees no later key)":
                lowering.causal_chunks,
            "hollow_attention, blockwise (looks-ahead decided by the family's masks)": lowering.hollow_blockwise,
            "key bias masks with the lowest finite score for blocked keys": lowering.finite_key_bias,
            "dynamic FFN down weights stored transposed (row gathers, plain MatMul)": lowering.transposed_down_weights,
            # onnx_rewrites.py, on the written files: the RMS norms in the form onnxruntime fuses
            "x * rsqrt(v) as x / sqrt(v), prefill": prefill_rewrites["reciprocal products as divisions"],
            "x * rsqrt(v) as x / sqrt(v), decode step": step_rewrites["reciprocal products as divisions"],
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }
