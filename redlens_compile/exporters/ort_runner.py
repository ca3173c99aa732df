"""OnnxRunner: the exported files run by onnxruntime, with greedy KV-cached generation.

Where the export holds a checked vision graph (manifest `front.runs_in == "onnxruntime"`), the
runner needs only the folder: vision and embedding graphs in onnxruntime, the merge and the
position ids in numpy (exporters/vision_front.py). Elsewhere (anyres towers, M-RoPE) the vision
path, merge and positions run in torch, from the model the runner is then given. The pruning
stage (prune.onnx), the decoder prefill and every decode step run in onnxruntime.
CUDA is used when onnxruntime-gpu and a GPU are present (the `gpu` extra), else the CPU;
`provider` says which was picked.
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
from ..passes.token_pruning import check_keep
from .onnx import FORMAT, MANIFEST
from .vision_front import OnnxFront, generation_positions

logger = logging.getLogger(__name__)


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
        logger.info("OnnxRunner on %s", self.provider)
        self.pruning = self.manifest.get("pruning")  # what the prune graph does, or None
        self.key_bias_layers = graphs["decoder_step"]["key_bias_layers"]
        self.front = (OnnxFront(self._run, front["image_inputs"], self.manifest["token_ids"]["visual"], "vision" in graphs,
                                graphs.get("vision", {}).get("shapes"))
                      if front["runs_in"] == "onnxruntime" else None)

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[name].run(None, feeds)

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
        args = [arg.detach().cpu().numpy() for arg in decoder_inputs.as_args()[:4]]
        if self.pruning["method"] == "random":  # the torch module's per-sample scores, the same function
            args.append(random_scores(decoder_inputs.inputs_embeds, decoder_inputs.attention_mask,
                                      decoder_inputs.visual_mask, self.pruning["seed"]).cpu().numpy())
        feeds = dict(zip(self.manifest["graphs"]["prune"]["inputs"], args))
        outputs = [torch.from_numpy(out) for out in self._run("prune", feeds)]
        return DecoderInputs(*outputs[:4], key_bias=outputs[4] if len(outputs) > 4 else None)

    def prefill(self, decoder_inputs: DecoderInputs) -> tuple[np.ndarray, list[np.ndarray]]:
        names = self.manifest["graphs"]["decoder_prefill"]["inputs"]
        feeds = {name: arg.detach().cpu().numpy() for name, arg in zip(names, decoder_inputs.as_args())}
        logits, *kv = self._run("decoder_prefill", feeds)
        return logits, kv

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
            inputs["position_ids"] = torch.from_numpy(generation_positions(inputs["attention_mask"].numpy()))
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
        mask = decoder_inputs.attention_mask.numpy().astype(np.int64)
        bias = (decoder_inputs.key_bias.numpy() if decoder_inputs.key_bias is not None
                else np.zeros(mask.shape, dtype=np.float32)).astype(np.float32)
        positions = decoder_inputs.position_ids[..., -1:].numpy()
        unfinished = np.ones(batch, dtype=bool)
        sequences = ids
        next_logits = logits[:, -1]
        step_names = self.manifest["graphs"]["decoder_step"]["inputs"]
        for step in range(max_new_tokens):
            tokens = next_logits.argmax(-1)
            if pad is not None:
                tokens = np.where(unfinished, tokens, pad)
            sequences = torch.cat([sequences, torch.from_numpy(tokens.astype(np.int64))[:, None]], dim=1)
            if eos_ids:
                unfinished &= ~np.isin(tokens, eos_ids)
            if step == max_new_tokens - 1 or not unfinished.any():
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            bias = np.concatenate([bias, np.zeros((batch, 1), dtype=np.float32)], axis=1)
            positions = positions + 1
            feeds = dict(zip(step_names, [tokens.astype(np.int64)[:, None], positions, mask, bias, *kv]))
            out, *kv = self._run("decoder_step", feeds)
            next_logits = out[:, -1]
        return sequences
