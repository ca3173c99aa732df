"""Family adapters: where the pieces of an image-text-to-text model live, read off the model.

A FamilyAdapter says where the vision tower, projector, decoder and lm_head are, which token ids
mark visual positions, what shape the position ids take, and which masks and layer kinds the
decoder has. `adapter_for` derives it from the model itself (`derive_adapter`: get_decoder(),
get_output_embeddings(), the vision_config, the rope config), so a new family of transformers'
decoder-only image-text-to-text classes needs no entry; FAMILIES holds only the exceptions whose
adapter cannot be derived (none today). Everything else (token merge, M-RoPE, masks) is done by
the family's own transformers code, which the capture stage runs unchanged. `support_row` is what
the compiler serves on a family (the README's family table, scripts/families_table.py).
"""

from __future__ import annotations

import sys
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
            if value is not None and int(value) not in ids:  # image_token_id and image_token_index alias
                ids.append(int(value))
        return ids

    def visual_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.visual_token_ids(model), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.language_model(model).layers)

    def sliding_layer_types(self, model: nn.Module) -> list[str]:
        """The decoder's layer types other than full attention (sliding windows, chunked)."""
        types = getattr(self.language_model(model).config, "layer_types", None) or []
        return sorted({t for t in types if t != "full_attention"})

    def decoder_masks(self, model: nn.Module):
        """The masks the decoder graph builds itself (capture/decoder_module.py DecoderMasks): where the
        family's image tokens attend both ways (its base model hands the decoder a mask mapping,
        Gemma 3) or its config gives layers a sliding window (`layer_types`, `sliding_window`). None
        for plain causal decoders, and for layer kinds the builder does not know (the family's own
        code builds those)."""
        from .decoder_module import FULL, SLIDING, DecoderMasks

        base = model.get_submodule(self.language_model_path.rpartition(".")[0]) if "." in self.language_model_path \
            else model
        family_code = sys.modules.get(type(base).__module__)
        image_blocks = getattr(family_code, "create_masks_for_vision_model", None) is not None
        config = self.language_model(model).config
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if layer_types:
            window = window if SLIDING in layer_types else None
            known = set(layer_types) <= {FULL, SLIDING} and not getattr(config, "use_bidirectional_attention", False)
        else:  # every layer takes the one mask (Mistral: sliding everywhere when a window is set)
            limit = int(getattr(config, "max_position_embeddings", 0) or 0)
            window = window if window and limit and window < limit else None
            known = True
        if image_blocks:
            return DecoderMasks(True, window if known else None, mapping=True)
        if window is None or not known:
            return None
        return DecoderMasks(False, int(window), mapping=bool(layer_types))

    def sliding_layers(self, model: nn.Module) -> list[int]:
        """The decoder layers whose attention sees a sliding window of keys (where it can bind: a
        config without layer types gives every layer the window when it is below the positions)."""
        from .decoder_module import SLIDING

        config = self.language_model(model).config
        window = getattr(config, "sliding_window", None)
        if not window:
            return []
        types = getattr(config, "layer_types", None)
        if types:
            return [i for i, kind in enumerate(types) if kind == SLIDING]
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        return list(range(self.num_layers(model))) if limit and window < limit else []


# Exceptions only: a model class whose adapter cannot be read off the model (derive_adapter).
# Each entry says why it differs. Empty today: the four families of the first release and the
# ones added since are all derived.
FAMILIES: tuple[FamilyAdapter, ...] = ()

# Where transformers' image-text-to-text classes keep their token ids (both spellings exist).
_VISUAL_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
# Inputs that feed a vision path, by the names transformers' processors give them.
_VISION_INPUT_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                      "pixel_attention_mask", "second_per_grid_ts", "video_second_per_grid")
# Submodule names of a projector that lives inside the vision module (Qwen2-VL's merger).
_NESTED_PROJECTORS = ("merger", "projector", "connector")


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _is_encoder_decoder(model: nn.Module) -> bool:
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(_text_config(config), "is_encoder_decoder", False):
        return True
    # BLIP-2 and InstructBLIP name the choice instead
    return getattr(config, "use_decoder_only_language_model", True) is False


def _position_rows(model: nn.Module) -> int:
    """3 for M-RoPE decoders (the rope config carries an `mrope_section`), else 1."""
    text = _text_config(model.config)
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(text, attr, None)
        if isinstance(rope, dict) and rope.get("mrope_section") is not None:
            return 3
    return 1


def _vision_module(base: nn.Module, model: nn.Module, exclude: nn.Module) -> tuple[str, nn.Module] | None:
    """The child of the base model that encodes images: its config is the model's vision_config."""
    vision_config = model.config.vision_config
    for name, child in base.named_children():
        if child is exclude:
            continue
        config = getattr(child, "config", None)
        if config is vision_config or (config is not None and type(config) is type(vision_config)):
            return name, child
    return None


def derive_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter of a decoder-only image-text-to-text model, read off the model itself.

    The decoder is what `get_decoder()` returns (it must hold `.layers`), the lm_head what
    `get_output_embeddings()` returns, the vision tower the base model's child built from the
    vision config, the projector the base model's other children (or a merger inside the vision
    module), the visual token ids the config's image/video token ids, and the position ids take 3
    rows when the rope config has an `mrope_section`. What is missing is named; the capture check
    (graph against eager logits) guards everything else.
    """
    name = type(model).__name__
    missing: list[str] = []
    if getattr(model.config, "vision_config", None) is None:
        raise UnsupportedModelError(f"{name} has no vision_config: not an image-text-to-text model")
    if _is_encoder_decoder(model):
        raise UnsupportedModelError(
            f"{name} generates with an encoder-decoder text model: redlens-compile rewrites decoder-only "
            "(causal) language models, whose prefill holds the visual tokens in its KV cache")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    decoder_path = _path_of(model, decoder) if isinstance(decoder, nn.Module) and decoder is not model else None
    if decoder_path is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        missing.append("a causal text decoder (get_decoder()) with a .layers list")
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head_path = _path_of(model, lm_head) if isinstance(lm_head, nn.Module) else None
    if not lm_head_path:
        missing.append("an lm_head (get_output_embeddings())")
    attrs = tuple(a for a in _VISUAL_TOKEN_ATTRS if isinstance(getattr(model.config, a, None), int))
    if not attrs:
        missing.append(f"an image token id in the config ({' / '.join(_VISUAL_TOKEN_ATTRS[:2])})")
    vision = projectors = None
    if decoder_path is not None:
        base_path = decoder_path.rpartition(".")[0]
        base = model.get_submodule(base_path) if base_path else model
        found = _vision_module(base, model, decoder)
        if found is None:
            missing.append("a vision tower (a submodule built from the vision_config)")
        else:
            prefix = f"{base_path}." if base_path else ""
            vision = prefix + found[0]
            projectors = tuple(prefix + child for child, module in base.named_children()
                               if module is not decoder and module is not found[1]
                               and any(p.requires_grad for p in module.parameters()))
            if not projectors:
                projectors = tuple(f"{vision}.{child}" for child, _ in found[1].named_children()
                                   if child in _NESTED_PROJECTORS)
            if not projectors:
                missing.append("a projector (a base-model child beside the vision tower and the decoder, "
                               "or a merger inside the vision tower)")
    if missing:
        raise UnsupportedModelError(f"{name} cannot be served: missing {'; '.join(missing)}")
    return FamilyAdapter(
        name=getattr(model.config, "model_type", name), model_classes=(name,), vision_tower_path=vision,
        projector_paths=projectors, language_model_path=decoder_path, lm_head_path=lm_head_path,
        visual_token_attrs=attrs, position_rows=_position_rows(model), vision_input_keys=_VISION_INPUT_KEYS)


def support_row(model: nn.Module) -> dict[str, str]:
    """What the code reads off `model`'s family: adapter, position ids, decoder masks. The README's
    family table is this beside what running each capability on a tiny model of the family gave
    (scripts/families_table.py, recorded in benchmarks/results/families.json)."""
    adapter = adapter_for(model)
    builder = adapter.decoder_masks(model)
    masks = "image blocks both ways" if builder is not None and builder.image_blocks else "causal"
    if adapter.sliding_layers(model):
        masks += " + sliding window"
    return {
        "family": adapter.name,
        "class": f"`{type(model).__name__}`",
        "adapter": "table" if any(type(model).__name__ in f.model_classes for f in FAMILIES) else "derived",
        "position ids": "M-RoPE `[3, B, S]`" if adapter.position_rows == 3 else "`[B, S]`",
        "decoder mask": masks,
    }


def supported_model_classes() -> list[str]:
    return [cls for family in FAMILIES for cls in family.model_classes]


def adapter_for(model: object) -> FamilyAdapter:
    """The table's adapter where the model's class (along its MRO) has an entry, else a derived one."""
    for klass in type(model).__mro__:
        for family in FAMILIES:
            if klass.__name__ in family.model_classes:
                return family
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model: pass an image-text-to-text model "
            "(e.g. loaded with AutoModelForImageTextToText.from_pretrained)")
    return derive_adapter(model)
