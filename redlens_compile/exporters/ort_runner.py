"""OnnxRunner: the exported files run by onnxruntime, with greedy KV-cached generation.

Where the export holds a checked vision graph (manifest `front.runs_in == "onnxruntime"`), the
runner needs only the folder: vision and embedding graphs in onnxruntime, the merge and the
position ids in numpy (exporters/vision_front.py). Elsewhere (anyres towers, M-RoPE) the vision
path, merge and positions run in torch, from the model the runner is then given. The pruning
stage (prune.onnx), the decoder prefill and every decode step run in onnxruntime.
CUDA is used when onnxruntime-gpu and a GPU are present (the `gpu` extra), else the CPU;
`provider` says which was picked. The prefill and the decode steps run through onnxruntime's
IOBinding on either provider: their KV cache outputs stay where the provider put them (on the
GPU with CUDA) and are bound as the next step's inputs, and only the last position's logits and
the small per-step inputs cross to and from the host. Feeds are cast to the element type each
graph input declares (float16 graphs take float16 embeddings and key bias).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from ..capture.families import adapter_for
from ..errors import ExportError
from ..fingerprint import weights_fingerprint
from ..ops.token_pruning import random_scores
from ..runtime.token_pruning import check_keep
from .onnx import FORMAT, MANIFEST
from .vision_front import OnnxFront, generation_positions

logger = logging.getLogger(__name__)

# onnxruntime's element type names -> numpy dtypes (what feeds are cast to)
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def to_numpy(x: Any) -> np.ndarray:
    """A host array of a tensor on any device (numpy reads host memory only) or an array."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()  # numpy has no bfloat16
    return np.asarray(x)


def pick_providers(providers: list[str] | None = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is not None:
        missing = [p for p in providers if p not in available]
        if missing:
            raise ExportError(f"onnxruntime providers {missing} are not available here (available: {available}); "
                              "install onnxruntime-gpu (pip install 'redlens-compile[gpu]') for CUDA")
        return providers
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner:
    def __init__(self, directory: str | Path, model: nn.Module | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportError(f"{self.directory}: no readable {MANIFEST}; pass a folder written by export_onnx") from exc
        if self.manifest.get("format") != FORMAT:
            raise ExportError(f"{self.directory}: format {self.manifest.get('format')!r}, this runner reads {FORMAT}")
        front = self.manifest["front"]
        if model is None and front["runs_in"] != "onnxruntime":
            raise ExportError(f"these files run the vision part in torch ({front['why']}): pass the model the files "
                              "were exported from, OnnxRunner(directory, model)")
        if model is not None and type(model).__name__ != self.manifest["model"]["class"]:
            raise ExportError(f"the files were exported from {self.manifest['model']['class']}, "
                              f"the model given is {type(model).__name__}")
        recorded = self.manifest["model"].get("weights_fingerprint")
        if model is not None and recorded is not None and weights_fingerprint(model) != recorded:
            raise ExportError(f"{self.directory}: the model given is a {type(model).__name__} with other weights than "
                              "the one the files were exported from (weights_fingerprint differs): pass the model "
                              "export_onnx was called on (the same checkpoint, loaded the same way)")
        # the model serves only what the files say runs in torch: with a checked ONNX front, none
        if front["runs_in"] == "onnxruntime":
            model = None
        self.model = model.eval() if model is not None else None
        self.adapter = adapter_for(model) if model is not None else None
        self.providers = pick_providers(providers)
        options = ort.SessionOptions()
        graphs = self.manifest["graphs"]
        self.sessions = {name: ort.InferenceSession(str(self.directory / g["file"]), options, providers=self.providers)
                         for name, g in graphs.items()}
        self.provider = self.sessions["decoder_prefill"].get_providers()[0]
        # where IOBinding leaves the outputs it keeps (the KV cache): the provider's device
        self.output_device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.input_types = {name: {i.name: _NUMPY_TYPES.get(i.type) for i in sess.get_inputs()}
                            for name, sess in self.sessions.items()}
        logger.info("OnnxRunner on %s", self.provider)
        self.pruning = self.manifest.get("pruning")  # what the prune graph does, or None
        self.key_bias_layers = graphs["decoder_step"]["key_bias_layers"]
        self.front = (OnnxFront(self._run, front["image_inputs"], self.manifest["token_ids"]["visual"], "vision" in graphs,
                                graphs.get("vision", {}).get("shapes"))
                      if front["runs_in"] == "onnxruntime" else None)

    def _cast(self, name: str, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        types = self.input_types[name]
        return {k: (lambda a, t: a if t is None or a.dtype == t else a.astype(t))(to_numpy(v), types.get(k))
                for k, v in feeds.items()}

    def _run(self, name: str, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        return self.sessions[name].run(None, self._cast(name, feeds))

    def _run_bound(self, name: str, feeds: Mapping[str, Any], bound: Mapping[str, Any] = {}) -> tuple[np.ndarray, list]:
        """One decoder run through IOBinding: `feeds` (host arrays) copied in, `bound` (OrtValues from
        an earlier run: the KV cache) bound where they lie; returns the first output (logits) on the
        host and the others as OrtValues on the provider's device."""
        session = self.sessions[name]
        binding = session.io_binding()
        for key, value in self._cast(name, feeds).items():
            binding.bind_cpu_input(key, np.ascontiguousarray(value))
        for key, value in bound.items():
            binding.bind_ortvalue_input(key, value)
        outputs = [o.name for o in session.get_outputs()]
        binding.bind_output(outputs[0], "cpu")  # the logits: read on the host
        for key in outputs[1:]:
            binding.bind_output(key, self.output_device)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), list(values[1:])  # an OrtValue bound to the host: its numpy() copies nothing

    def decoder_inputs(self, inputs: Mapping[str, Any]) -> DecoderInputs:
        """The decoder inputs of a prompt (the ONNX front, or the family's code in torch), pruned as exported."""
        if self.front is not None:
            decoder_inputs = self.front(inputs)
        else:
            decoder_inputs = capture_decoder_inputs(self.model, self.adapter, inputs, require_visual=False)
        if self.pruning is not None:
            decoder_inputs = self.prune(decoder_inputs)
        return decoder_inputs

    def prune(self, decoder_inputs: DecoderInputs) -> DecoderInputs:
        """The exported pruning stage (prune.onnx) on the decoder inputs."""
        check_keep(self.pruning["method"], self.pruning["keep"], decoder_inputs.visual_mask)
        args = [to_numpy(arg) for arg in decoder_inputs.as_args()[:4]]
        if self.pruning["method"] == "random":  # the torch module's per-sample scores, the same function
            args.append(to_numpy(random_scores(decoder_inputs.inputs_embeds, decoder_inputs.attention_mask,
                                               decoder_inputs.visual_mask, self.pruning["seed"])))
        feeds = dict(zip(self.manifest["graphs"]["prune"]["inputs"], args))
        outputs = [torch.from_numpy(out) for out in self._run("prune", feeds)]
        return DecoderInputs(*outputs[:4], key_bias=outputs[4] if len(outputs) > 4 else None)

    def prefill(self, decoder_inputs: DecoderInputs) -> tuple[np.ndarray, list]:
        """Logits [B, S', V] on the host and the KV cache as OrtValues on the provider's device."""
        names = self.manifest["graphs"]["decoder_prefill"]["inputs"]
        return self._run_bound("decoder_prefill", dict(zip(names, decoder_inputs.as_args())))

    def __call__(self, **inputs: Any) -> np.ndarray:
        """Prefill logits [B, S', V] (S' = the kept rows when pruning)."""
        return self.prefill(self.decoder_inputs(inputs))[0]

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, Any], max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with the KV cache; returns the prompt followed by the new tokens."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
        inputs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
        ids = inputs["input_ids"]
        inputs = dict(inputs, attention_mask=inputs.get("attention_mask", torch.ones_like(ids)))
        # positions as transformers' generate makes them: the family's code where the model is given
        # (M-RoPE), else its 1-D rule (checked against the family's at export)
        if self.model is None:
            inputs["position_ids"] = torch.from_numpy(generation_positions(to_numpy(inputs["attention_mask"])))
        else:
            kwargs = {k: v for k, v in inputs.items() if k != "position_ids"}
            inputs["position_ids"] = self.model._prepare_position_ids_for_generation(ids, kwargs)
        decoder_inputs = self.decoder_inputs(inputs)
        logits, kv = self.prefill(decoder_inputs)
        eos = self.manifest["token_ids"]["eos"] if eos_token_id is None else eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = pad_token_id if pad_token_id is not None else self.manifest["token_ids"]["pad"]
        if pad is None and eos_ids:
            pad = eos_ids[0]
        batch = ids.shape[0]
        mask = to_numpy(decoder_inputs.attention_mask).astype(np.int64)
        bias = (to_numpy(decoder_inputs.key_bias) if decoder_inputs.key_bias is not None
                else np.zeros(mask.shape, dtype=np.float32)).astype(np.float32)
        positions = to_numpy(decoder_inputs.position_ids[..., -1:])
        unfinished = np.ones(batch, dtype=bool)
        sequences = ids
        next_logits = logits[:, -1]
        step_names = self.manifest["graphs"]["decoder_step"]["inputs"]
        past_names = step_names[4:]  # past_key_values.%d.key|value, bound from the last run's present.*
        for step in range(max_new_tokens):
            tokens = next_logits.argmax(-1)
            if pad is not None:
                tokens = np.where(unfinished, tokens, pad)
            sequences = torch.cat([sequences, torch.from_numpy(tokens.astype(np.int64))[:, None].to(sequences.device)], dim=1)
            if eos_ids:
                unfinished &= ~np.isin(tokens, eos_ids)
            if step == max_new_tokens - 1 or not unfinished.any():
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            bias = np.concatenate([bias, np.zeros((batch, 1), dtype=np.float32)], axis=1)
            positions = positions + 1
            feeds = dict(zip(step_names, [tokens.astype(np.int64)[:, None], positions, mask, bias]))
            out, kv = self._run_bound("decoder_step", feeds, dict(zip(past_names, kv)))
            next_logits = out[:, -1]
        return sequences
