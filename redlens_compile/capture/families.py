"""The supported model families: one table entry each.

A family adapter says where the pieces of a model live (vision tower, projector, decoder,
lm_head), which token ids mark visual positions and what shape its position ids take.
Everything else (token merge, M-RoPE, masks) is done by the family's own transformers code,
which the capture stage runs unchanged. Adding a family is adding one entry to FAMILIES.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    model_classes: tuple[str, ...]
    # The vision stage is everything under vision_tower_path; the projector part of it is
    # counted apart (for Qwen2-VL the merger lives inside the visual module).
    vision_tower_path: str
    projector_paths: tuple[str, ...]
    language_model_path: str = "model.language_model"
    lm_head_path: str = "lm_head"
    visual_token_attrs: tuple[str, ...] = ("image_token_id",)
    # Rows of the position ids the decoder takes: 1 for [B, S], 3 for M-RoPE [3, B, S].
    position_rows: int = 1
    # Inputs that feed the vision path (everything else goes to the decoder as text).
    vision_input_keys: tuple[str, ...] = ("pixel_values",)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.language_model_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head_path)

    def visual_token_ids(self, model: nn.Module) -> list[int]:
        ids = []
        for attr in self.visual_token_attrs:
            value = getattr(model.config, attr, None)
            if value is not None:
                ids.append(int(value))
        return ids

    def visual_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.visual_token_ids(model), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.language_model(model).layers)


FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(
        name="llava",
        model_classes=("LlavaForConditionalGeneration",),
        vision_tower_path="model.vision_tower",
        projector_paths=("model.multi_modal_projector",),
    ),
    FamilyAdapter(
        name="llava-next",
        model_classes=("LlavaNextForConditionalGeneration",),
        vision_tower_path="model.vision_tower",
        # image_newline is a learned row appended per image line: part of the projector stage.
        projector_paths=("model.multi_modal_projector",),
        vision_input_keys=("pixel_values", "image_sizes"),
    ),
    FamilyAdapter(
        name="qwen2-vl",
        model_classes=("Qwen2VLForConditionalGeneration",),
        vision_tower_path="model.visual",
        projector_paths=("model.visual.merger",),
        visual_token_attrs=("image_token_id", "video_token_id"),
        position_rows=3,
        vision_input_keys=("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"),
    ),
    FamilyAdapter(
        name="internvl",
        model_classes=("InternVLForConditionalGeneration",),
        vision_tower_path="model.vision_tower",
        projector_paths=("model.multi_modal_projector",),
    ),
)


def supported_model_classes() -> list[str]:
    return [cls for family in FAMILIES for cls in family.model_classes]


def adapter_for(model: object) -> FamilyAdapter:
    """The adapter of `model`'s family, found by class name along its MRO (so subclasses work)."""
    for klass in type(model).__mro__:
        for family in FAMILIES:
            if klass.__name__ in family.model_classes:
                return family
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported multimodal model: redlens-compile optimizes "
        f"decoder-only image-text-to-text models of the families "
        f"{', '.join(f.name for f in FAMILIES)} ({', '.join(supported_model_classes())}). "
        f"Load one of those classes (e.g. with AutoModelForImageTextToText.from_pretrained)."
    )
