"""The default model of the demo: a small LlavaForConditionalGeneration with its processor.

Until the trained proof model ships (its weights go into the package), the default model is
built deterministically from a fixed seed with random weights and saved, with a real
word-level tokenizer and a LlavaProcessor, so that `from_pretrained` and `AutoProcessor`
load it from a directory like any hub checkpoint. Random weights prove exactness and
FLOPs, never accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEMO_MODEL_VERSION = "random-llava-v1"
IMAGE_SIZE = 64
PATCH_SIZE = 4  # (64 / 4)^2 = 256 visual tokens per image

WORDS = (
    "USER: ASSISTANT: what is the colour shape of in on image picture left right above below how many "
    "are there a an and or yes no red green blue yellow purple orange white black gray circle square "
    "triangle star cross one two three four five six shapes object objects describe word answer with "
    "? . , :"
).split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def default_model_dir() -> Path:
    root = Path(os.environ.get("REDLENS_CACHE", Path.home() / ".cache" / "redlens-compile"))
    return root / DEMO_MODEL_VERSION


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(dict.fromkeys(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def build_demo_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the demo model + processor into `directory` (atomically: temp folder, then rename)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    target = Path(directory)
    tokenizer = _tokenizer()
    vocab_size = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
        ),
        text_config=LlamaConfig(
            hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "redlens_demo.json").write_text(
            json.dumps({"version": DEMO_MODEL_VERSION, "seed": seed, "weights": "random"}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("demo model written to %s", target)
    return target


def ensure_default_model() -> Path:
    """The default model's directory, built on first use."""
    directory = default_model_dir()
    if not (directory / "redlens_demo.json").exists():
        build_demo_model(directory)
    return directory


def demo_image(seed: int = 0):
    """A deterministic test picture: coloured shapes on a textured background."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    background = (rng.integers(90, 140, (IMAGE_SIZE, IMAGE_SIZE, 3))).astype("uint8")
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    colours = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40)]
    for i in range(3):
        x, y = (int(v) for v in rng.integers(4, IMAGE_SIZE - 16, 2))
        box = (x, y, x + 10, y + 10)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colours[i % len(colours)])
    return image
