"""The default model of the demo: a small LlavaForConditionalGeneration with its processor.

The trained proof model ships inside the package (`proof_llava/`, written by
scripts/train_proof_model.py). `build_llava` is its architecture; `build_demo_model` saves the
same architecture with random weights (tests use it: random weights prove exactness and FLOPs,
never accuracy). Models are saved with a word-level tokenizer and a LlavaProcessor, so that
`from_pretrained` and `AutoProcessor` load them from a directory like any hub checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..files import staged_folder
from . import PROOF_MODEL_DIR
from .shapes_task import CELL as PATCH_SIZE
from .shapes_task import IMAGE_SIZE

logger = logging.getLogger(__name__)

DEMO_MODEL_VERSION = "random-llava-v2"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
SHIPPED_MODEL_DIR = PROOF_MODEL_DIR  # the trained proof model (weights, tokenizer, processor)
# The bundled models by name. `proof_llava` (4 decoder layers) is the default: CI runs on it.
# `proof_llava_12` is the same task, tokenizer and vision tower with a 12-layer decoder, grown from
# it (scripts/train_proof_model.py --grow-from): the per-layer ranking needs depth to choose from.
BUNDLED_MODELS = {
    "proof_llava": SHIPPED_MODEL_DIR,
    "proof_llava_12": Path(__file__).parent / "proof_llava_12",
}


def bundled_model_dir(name: str) -> Path:
    """The folder of the bundled model `name` (a key of BUNDLED_MODELS)."""
    from ..errors import ConfigError, ModelFilesError

    if name not in BUNDLED_MODELS:
        raise ConfigError(f"no bundled model {name!r}; bundled models: {', '.join(BUNDLED_MODELS)} "
                          "(or give the path of a model folder)")
    directory = BUNDLED_MODELS[name]
    if not (directory / "model.safetensors").is_file():
        raise ModelFilesError(f"bundled model {name!r}: {directory / 'model.safetensors'} is missing; reinstall the "
                              "package or retrain it (scripts/train_proof_model.py)")
    return directory


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    """A bundled model's name or a model folder's path; None: the default model."""
    if spec is None:
        return ensure_default_model()
    if str(spec) in BUNDLED_MODELS:
        return bundled_model_dir(str(spec))
    return Path(spec)


def default_model_dir() -> Path:
    root = Path(os.environ.get("REDLENS_CACHE", Path.home() / ".cache" / "redlens-compile"))
    return root / DEMO_MODEL_VERSION


def make_tokenizer(words: list[str]):
    """A word-level tokenizer over `words`: every prompt word and answer is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [w for w in dict.fromkeys(words) if w not in SPECIAL])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def build_llava(tokenizer, seed: int = 0, image_size: int = IMAGE_SIZE):
    """The proof model's architecture: a CLIP-style vision tower (128x128 images, 8x8 patches:
    256 visual tokens) and a 4-layer Llama decoder; random weights from `seed`. A smaller
    `image_size` gives fewer visual tokens (tests)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=PATCH_SIZE, projection_dim=64,
        ),
        text_config=LlamaConfig(
            hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )
    return model, processor


def save_model_dir(model, processor, directory: str | os.PathLike, meta: dict) -> Path:
    """save_pretrained model + processor into `directory` atomically (temp folder, then rename)."""
    target = Path(directory)
    with staged_folder(target) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "redlens_model.json").write_text(json.dumps(meta, indent=2))
    logger.info("model written to %s", target)
    return target


def build_demo_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """The proof model's architecture with random weights, saved with its processor."""
    from .shapes_task import vocabulary

    model, processor = build_llava(make_tokenizer(vocabulary()), seed)
    meta = {"version": DEMO_MODEL_VERSION, "seed": seed, "weights": "random"}
    return save_model_dir(model.eval(), processor, directory, meta)


def ensure_default_model() -> Path:
    """The shipped trained model if present, else a random-weight one built on first use."""
    if (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        return SHIPPED_MODEL_DIR
    directory = default_model_dir()
    if not (directory / "redlens_model.json").exists():
        build_demo_model(directory)
    return directory


def demo_image(seed: int = 0):
    """A deterministic held-out picture of the proof task."""
    from .shapes_task import sample

    item, image_seed = sample("test", seed)
    return item.image(image_seed)
