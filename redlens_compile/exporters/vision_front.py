"""The decoder's inputs without the torch model: image features from `vision.onnx`, token
embeddings from `embed_tokens.onnx`, the merge and the position ids in numpy.

What the family's forward does before its decoder (vision tower, projector, placing each image's
features on its placeholder tokens, position ids) is only reproduced here where it is checked:
at export the front built from the ONNX files is compared with the family's own code
(capture/decoder_inputs.py) on the example and on the example doubled (two prompts, two
images: a vision graph specialized to the example's image count fails there). Where the vision
part does not export (towers that split on data: anyres tiles, Qwen2-VL's patch grid), its
position ids need the family's code (M-RoPE), or the check fails, the manifest says the front
runs in torch, with the reason, and the runner needs the model.

The vision graph is exported for one image (the leading axis of every image input): the runner
runs it once per image and concatenates the features in order, as the family scatters them.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from ..capture.families import FamilyAdapter
from ..errors import ExportError

logger = logging.getLogger(__name__)

VISION = "vision.onnx"
# Inputs the text side owns, never image inputs even where get_image_features names them.
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids", "inputs_embeds")
EMBED_TOLERANCE = 1e-4


class ImageFeatures(nn.Module):
    """The family's `get_image_features` as one [tokens, hidden] tensor (every image's rows in order)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *image_inputs: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(**dict(zip(self.names, image_inputs)))
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        return features.reshape(-1, features.shape[-1])


def image_input_names(model: nn.Module, inputs: Mapping[str, Any]) -> list[str]:
    """The processor outputs the family's `get_image_features` takes (pixel values, image sizes, ...)."""
    method = getattr(model, "get_image_features", None)
    if method is None:
        return []
    params = inspect.signature(method).parameters
    return [k for k, v in inputs.items() if k in params and k not in TEXT_INPUTS and isinstance(v, torch.Tensor)]


def images_in(inputs: Mapping[str, Any], names: list[str]) -> int | None:
    """The images of a prompt batch: the leading axis every image input shares; None when they differ."""
    sizes = {int(inputs[name].shape[0]) for name in names if name in inputs}
    return sizes.pop() if len(sizes) == 1 else None


def doubled(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Two copies of a prompt batch (every tensor twice along its leading axis): two images at least."""
    return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in inputs.items()}


def generation_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D position ids as transformers' generate makes them: count of real tokens before, pads at 0."""
    positions = attention_mask.astype(np.int64).cumsum(-1) - 1
    return np.where(attention_mask == 0, 0, positions)


class OnnxFront:
    """Processor outputs -> DecoderInputs with onnxruntime sessions for the vision and embedding graphs."""

    def __init__(self, run: Callable[[str, dict], list[np.ndarray]], image_inputs: list[str], visual_ids: list[int],
                 has_vision: bool, image_shapes: Mapping[str, list[int]] | None = None):
        self.run = run  # (graph name, feeds) -> outputs
        self.image_inputs = image_inputs
        self.visual_ids = visual_ids
        self.has_vision = has_vision
        self.image_shapes = dict(image_shapes or {})  # one image's input shapes the vision graph was exported for

    def image_features(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        images = images_in(inputs, self.image_inputs)
        if images is None or any(name not in inputs for name in self.image_inputs):
            raise ExportError(f"the prompt has image tokens but not the image inputs {self.image_inputs} the vision "
                              "graph takes (pass the processor's whole output)")
        for name, shape in self.image_shapes.items():
            if list(inputs[name].shape[1:]) != list(shape[1:]):
                raise ExportError(f"{name} of shape {list(inputs[name].shape)}: the vision graph was exported for "
                                  f"{shape[1:]} per image; export again with such a prompt as the example, or pass "
                                  "the model and run the vision part in torch")
        rows = [self.run("vision", {name: inputs[name][i:i + 1] for name in self.image_inputs})[0]
                for i in range(images)]
        return np.concatenate(rows)

    def __call__(self, inputs: Mapping[str, Any]) -> DecoderInputs:
        # host arrays (numpy reads host memory only; it has no bfloat16): the graphs' feeds are cast to their types
        arrays = {k: (v.detach().cpu().float() if v.dtype == torch.bfloat16 else v.detach().cpu()).numpy()
                  if isinstance(v, torch.Tensor) else np.asarray(v)
                  for k, v in inputs.items() if v is not None}
        ids = arrays["input_ids"].astype(np.int64)
        visual = np.isin(ids, self.visual_ids)
        # placeholder ids may lie outside the embedding table; their rows are replaced below
        embeds = self.run("embed_tokens", {"input_ids": np.where(visual, 0, ids)})[0]
        if visual.any():
            if not self.has_vision:
                raise ExportError("these files have no vision graph (the vision part runs in torch): "
                                  "pass the model, OnnxRunner(directory, model)")
            features = self.image_features(arrays)
            if features.shape[0] != int(visual.sum()):
                raise ExportError(f"the prompt holds {int(visual.sum())} image tokens but its images give "
                                  f"{features.shape[0]} feature rows: build the prompt with the model's processor")
            embeds[visual] = features.astype(embeds.dtype)
        batch, seq = ids.shape
        mask = arrays.get("attention_mask", np.ones_like(ids)).astype(np.int64)
        positions = arrays.get("position_ids")
        if positions is None:  # what the decoder does itself when given none: 0..S-1 on every row
            positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
        return DecoderInputs(
            inputs_embeds=torch.from_numpy(np.ascontiguousarray(embeds)),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(np.array(np.broadcast_to(positions, (batch, seq)), dtype=np.int64)),
            visual_mask=torch.from_numpy(visual),
        )


def _differs(got: DecoderInputs, want: DecoderInputs) -> str | None:
    if got.inputs_embeds.shape != want.inputs_embeds.shape:
        return f"embeddings of shape {tuple(got.inputs_embeds.shape)}, the family's {tuple(want.inputs_embeds.shape)}"
    diff = float((got.inputs_embeds - want.inputs_embeds).abs().max())
    if diff > EMBED_TOLERANCE:
        return f"embeddings differ from the family's by {diff:.2e}"
    for field in ("attention_mask", "position_ids", "visual_mask"):
        if not torch.equal(getattr(got, field), getattr(want, field)):
            return f"{field} differs from the family's"
    return None


def export_front(model: nn.Module, adapter: FamilyAdapter, example_inputs: Mapping[str, Any], staging: Path,
                 export: Callable[..., None], make_run: Callable[[Path], Callable]) -> dict:
    """Export the vision graph where it serves, check the ONNX front against the family's code, and
    return the manifest's `front` section; `vision.onnx` is removed again when the check fails."""
    names = image_input_names(model, example_inputs)
    section: dict[str, Any] = {"runs_in": "torch", "image_inputs": names, "vision": None}
    if adapter.position_rows != 1:
        section["why"] = (f"position ids have {adapter.position_rows} rows (M-RoPE): they come from the family's "
                          "own code, which runs in torch")
        return section
    images = images_in(example_inputs, names)
    if not names or images is None:
        section["why"] = (f"the image inputs {names} do not share a leading image axis: the vision graph cannot be "
                          "run image by image")
        return section
    ids = example_inputs["input_ids"]
    padded = torch.ones_like(ids)
    padded[:, : ids.shape[1] // 2] = 0
    family_rule = getattr(model, "_prepare_position_ids_for_generation", None)  # transformers' generate
    rule = family_rule(ids, {"input_ids": ids, "attention_mask": padded}) if family_rule is not None else None
    numpy_rule = torch.from_numpy(generation_positions(padded.cpu().numpy())).to(ids.device)
    if rule is None or not torch.equal(rule.expand_as(ids), numpy_rule):
        section["why"] = "the family computes generate's position ids by its own rule, which runs in torch"
        return section
    one = tuple(example_inputs[name][:1] for name in names)
    try:
        export(ImageFeatures(model, names).eval(), one, staging / VISION, names, ["image_features"], None)
    except ExportError as exc:
        section["why"] = f"the vision tower and projector did not export: {exc}"
        logger.info("vision part stays in torch: %s", exc)
        return section
    shapes = {name: list(tensor.shape) for name, tensor in zip(names, one)}
    front = OnnxFront(make_run(staging), names, adapter.visual_token_ids(model), has_vision=True, image_shapes=shapes)
    for label, inputs in (("the example", example_inputs), ("the example doubled", doubled(example_inputs))):
        want = capture_decoder_inputs(model, adapter, inputs)
        try:
            problem = _differs(front(inputs), want)
        except Exception as exc:  # a graph that fails at another image count is a failed check, not an export error
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        if problem is not None:
            for path in staging.glob("vision.onnx*"):
                path.unlink()
            section["why"] = f"the ONNX front does not match the family's code on {label}: {problem}"
            logger.info("vision part stays in torch: %s", section["why"])
            return section
    section.update(runs_in="onnxruntime", vision={"file": VISION, "inputs": names, "outputs": ["image_features"],
                                                 "per_image": True, "shapes": shapes}, why=None)
    return section
