"""Decoder geometries to time the reductions at (benchmarks/prefill.py, the CLI summary's speed line).

A LlavaForConditionalGeneration whose decoder has a real VLM's geometry, random weights: the
speed of a rewritten graph depends on its shapes, not on what the weights learned. "2b" is
Qwen2-VL-2B's decoder (hidden 1536, FFN 8960, 12 heads, 2 KV heads), "smolvlm" SmolVLM-256M's
(hidden 576, FFN 1536, 9 heads, 3 KV heads), "bundled" the bundled proof model's own decoder
(read from its config; benchmarks/prefill.py loads it with its trained weights). The vision tower is a
one-layer CLIP whose image of `image_size` pixels gives (image_size / 2)^2 visual tokens (64: 1024).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import PROOF_MODEL_DIR

IMAGE_TOKEN = 1000
VOCAB = 1024  # small: the lm_head of one position is negligible either way, and init stays fast
PATCH = 2
GEOMETRY_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")

GEOMETRIES = {"2b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2),
              "smolvlm": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)}


def bundled_geometry() -> dict:
    """The bundled proof model's decoder geometry (its config.json's text_config)."""
    text = json.loads((PROOF_MODEL_DIR / "config.json").read_text())["text_config"]
    return {k: text[k] for k in GEOMETRY_KEYS}


def geometry(name: str) -> dict:
    """The decoder geometry `name` ("2b", "smolvlm", "bundled")."""
    from ..errors import ConfigError

    if name == "bundled":
        return bundled_geometry()
    if name not in GEOMETRIES:
        raise ConfigError(f"no decoder geometry {name!r}; geometries: {', '.join([*GEOMETRIES, 'bundled'])}")
    return dict(GEOMETRIES[name])


def build_model(layers: int, directory: str | os.PathLike | None = None, name: str = "2b", image_size: int = 64,
                overrides: dict | None = None, seed: int = 0):
    """A random-weight LLaVA with decoder geometry `name` (`overrides` replace its fields: tests use
    a tiny one) and `layers` decoder layers, in eval mode, sdpa attention. With `directory`, saved
    there and loaded back (as a user's checkpoint is)."""
    import torch
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(**{**geometry(name), **(overrides or {})}, num_hidden_layers=layers, vocab_size=VOCAB,
                       max_position_embeddings=8192)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")  # drop CLS
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    if directory is None:
        return model.eval()
    model.save_pretrained(directory)
    return AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="sdpa").eval()


def make_inputs(images: int, text: int, image_size: int = 64, device="cpu") -> dict:
    """input_ids with `images` images of (image_size / 2)^2 tokens among `text` text tokens, and pixels,
    on `device` (drawn on the CPU generator, so every device gets the same numbers)."""
    import torch

    g = torch.Generator().manual_seed(images)
    words = lambda n: torch.randint(3, 900, (n,), generator=g)  # noqa: E731
    tokens = (image_size // PATCH) ** 2
    parts = [words(text // 2)]
    for i in range(images):
        parts.append(torch.full((tokens,), IMAGE_TOKEN))
        if i < images - 1:
            parts.append(words(4))
    parts.append(words(text - text // 2))
    ids = torch.cat(parts)[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(images, 3, image_size, image_size, generator=g)}
    return {name: value.to(device) for name, value in inputs.items()}


def bundled_inputs(processor, images: int, question: str = "what colour is the circle ?") -> dict:
    """The proof task's prompt with `images` of its held-out pictures (the CLI's example when 1)."""
    from .demo import demo_image
    from .shapes_task import prompt

    token = getattr(processor, "image_token", "<image>")
    text = prompt(question, "\n".join([token] * images))
    return dict(processor(images=[demo_image(seed) for seed in range(images)], text=text, return_tensors="pt"))


def eager_prefill(model, adapter):
    """The original eager decoder's prefill as generate runs it: the language model, lm_head on the
    last position."""
    language_model, lm_head = adapter.language_model(model), adapter.lm_head(model)

    def run(inputs):
        out = language_model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                             position_ids=inputs.position_ids, use_cache=True)
        return lm_head(out.last_hidden_state[:, -1:])

    return run
