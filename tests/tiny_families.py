"""Tiny random models of the four supported families and inputs for them.

Each model is built from a small config, saved with save_pretrained and loaded back with
from_pretrained, so the tests go through the real loading path. Inputs are made by hand
(input ids with the right number of image placeholders, pixel values, and the extras each
family needs), with optional left padding to test batches of mixed lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    InternVLConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    Qwen2VLConfig,
)

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 100, 101, 102, 103

TEXT = dict(
    hidden_size=64,
    intermediate_size=192,  # 3x hidden, as real models have: a budget of 0.5 is reachable
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)


def llava_config() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=4, projection_dim=32,
    )
    return LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=PAD,
    )


def llava_next_config() -> LlavaNextConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=16, patch_size=4, projection_dim=32,
    )
    return LlavaNextConfig(
        vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=PAD,
    )


def qwen2_vl_config() -> Qwen2VLConfig:
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=2)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )


def internvl_config() -> InternVLConfig:
    text = dict(TEXT, model_type="qwen2")
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[64, 64], patch_size=[4, 4])
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, downsample_ratio=0.5)


@dataclass
class Family:
    name: str
    make_config: Callable
    image_tokens: Callable  # model, batch -> (vision kwargs, tokens per image)


def _llava_vision(model, batch: int, generator: torch.Generator):
    size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return {"pixel_values": pixels}, (size // patch) ** 2


def _llava_next_vision(model, batch: int, generator: torch.Generator):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    image_size = [32, 16]  # (height, width): best fit [32, 16] -> 2 tiles + the base view
    patches = image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    pixels = torch.randn(batch, patches, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=generator)
    sizes = torch.tensor([image_size] * batch)
    with torch.no_grad():
        feats = model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output
    return {"pixel_values": pixels, "image_sizes": sizes}, feats[0].shape[0]


def _qwen2_vl_vision(model, batch: int, generator: torch.Generator):
    vc = model.config.vision_config
    grid = (1, 16, 16)  # 64 visual tokens, as many as the llava config's
    per_image = grid[0] * grid[1] * grid[2]
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(batch * per_image, dim, generator=generator)
    thw = torch.tensor([grid] * batch)
    return {"pixel_values": pixels, "image_grid_thw": thw}, per_image // vc.spatial_merge_size**2


def _internvl_vision(model, batch: int, generator: torch.Generator):
    vc = model.config.vision_config
    size = vc.image_size[0]
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    tokens = int(((size // vc.patch_size[0]) ** 2) * model.config.downsample_ratio**2)
    return {"pixel_values": pixels}, tokens


FAMILIES = {
    "llava": Family("llava", llava_config, _llava_vision),
    "llava-next": Family("llava-next", llava_next_config, _llava_next_vision),
    "qwen2-vl": Family("qwen2-vl", qwen2_vl_config, _qwen2_vl_vision),
    "internvl": Family("internvl", internvl_config, _internvl_vision),
}


# Families served by the derived adapter (capture/families.py's derive_adapter): no table entry.
def _siglip(**extra) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, **extra)


def llava_onevision_config():
    import transformers
    return transformers.LlavaOnevisionConfig(
        vision_config=_siglip(image_size=16, patch_size=4), text_config=dict(TEXT, model_type="qwen2"),
        image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], vision_feature_layer=-1)


def qwen2_5_vl_config():
    import transformers
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=TEXT["hidden_size"], window_size=16,
                  fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                         video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                                         vision_end_token_id=VISION_END)


def mistral3_config():
    import transformers
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=4, head_dim=16)
    return transformers.Mistral3Config(vision_config=vision, text_config=dict(TEXT, model_type="mistral", head_dim=16),
                                       image_token_index=IMAGE_TOKEN, spatial_merge_size=2)


def idefics3_config():
    import transformers
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=4)
    return transformers.Idefics3Config(vision_config=vision, text_config=dict(TEXT, model_type="llama"),
                                       image_token_id=IMAGE_TOKEN, scale_factor=2)


def smolvlm_config():
    import transformers
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=4)
    return transformers.SmolVLMConfig(vision_config=vision, text_config=dict(TEXT, model_type="llama"),
                                      image_token_id=IMAGE_TOKEN, scale_factor=2)


def gemma3_config():
    import transformers
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=4)
    text = dict(TEXT, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention", "full_attention"])
    return transformers.Gemma3Config(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                     mm_tokens_per_image=64, boi_token_index=VISION_START, eoi_token_index=VISION_END)


def aya_vision_config():
    import transformers
    text = dict(TEXT, model_type="cohere2", layer_types=["sliding_attention", "full_attention", "full_attention"],
                sliding_window=16)
    return transformers.AyaVisionConfig(vision_config=_siglip(image_size=64, patch_size=4), text_config=text,
                                        image_token_index=IMAGE_TOKEN, downsample_factor=2)


def glm4v_config():
    """GLM-4V: M-RoPE (partial rotary) and an FFN of one fused gate_up_proj linear whose output is chunked."""
    import transformers
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                                       "partial_rotary_factor": 0.5})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=TEXT["hidden_size"], image_size=64)
    return transformers.Glm4vConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                    video_token_id=VIDEO_TOKEN, image_start_token_id=VISION_START,
                                    image_end_token_id=VISION_END)


def _pixels(model, batch: int, generator: torch.Generator, tiles: int | None = None) -> torch.Tensor:
    size = model.config.vision_config.image_size
    shape = (batch, 3, size, size) if tiles is None else (batch, tiles, 3, size, size)
    return torch.randn(*shape, generator=generator)


def _count_features(model, vision: dict, batch: int) -> int:
    """Visual rows per sample, as the family's own get_image_features makes them."""
    with torch.no_grad():
        out = model.model.get_image_features(**vision, return_dict=True).pooler_output
    parts = out if isinstance(out, (list, tuple)) else [out]
    return sum(p.reshape(-1, p.shape[-1]).shape[0] for p in parts) // batch


def _generic_vision(kind: str):
    def make(model, batch: int, generator: torch.Generator):
        if kind == "anyres":  # tiles of the best-fit grid + the base view, with each image's size
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
            size = [32, 16]
            tiles = image_size_to_num_patches(size, model.config.image_grid_pinpoints,
                                              model.config.vision_config.image_size)
            vision = {"pixel_values": _pixels(model, batch, generator, tiles), "image_sizes": torch.tensor([size] * batch)}
        elif kind == "grid":  # flattened patches with a (t, h, w) grid per image
            vc = model.config.vision_config
            dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            vision = {"pixel_values": torch.randn(batch * 256, dim, generator=generator),
                      "image_grid_thw": torch.tensor([(1, 16, 16)] * batch)}
        elif kind == "sized":  # one image with its size
            size = model.config.vision_config.image_size
            vision = {"pixel_values": _pixels(model, batch, generator), "image_sizes": torch.tensor([[size, size]] * batch)}
        elif kind == "tiled":  # [B, images, 3, H, W]
            vision = {"pixel_values": _pixels(model, batch, generator, 1)}
        else:
            vision = {"pixel_values": _pixels(model, batch, generator)}
        return vision, _count_features(model, vision, batch)
    return make


GENERIC_FAMILIES = {
    "llava-onevision": Family("llava-onevision", llava_onevision_config, _generic_vision("anyres")),
    "qwen2.5-vl": Family("qwen2.5-vl", qwen2_5_vl_config, _generic_vision("grid")),
    "mistral3": Family("mistral3", mistral3_config, _generic_vision("sized")),
    "idefics3": Family("idefics3", idefics3_config, _generic_vision("tiled")),
    "smolvlm": Family("smolvlm", smolvlm_config, _generic_vision("tiled")),
    "gemma3": Family("gemma3", gemma3_config, _generic_vision("plain")),
    "aya-vision": Family("aya-vision", aya_vision_config, _generic_vision("plain")),
    "glm4v": Family("glm4v", glm4v_config, _generic_vision("grid")),
}
FAMILIES.update(GENERIC_FAMILIES)
FIRST_FAMILIES = ("llava", "llava-next", "qwen2-vl", "internvl")
M_ROPE_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "glm4v")


def build_and_reload(family: str, directory: Path, seed: int = 0):
    """Random weights from the family's tiny config, saved and loaded back from `directory`."""
    torch.manual_seed(seed)
    config = FAMILIES[family].make_config()
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(directory)
    loaded = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="sdpa")
    return loaded.eval()


def make_inputs(family: str, model, text_before: int = 3, text_after: int = 4, batch: int = 1,
                pad_left: tuple[int, ...] = (), seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids = [BOS, text..., (VISION_START), image tokens, (VISION_END), text...].

    Row i is `pad_left[i]` tokens shorter than the longest row and is left-padded with PAD
    (attention mask 0 there).
    """
    generator = torch.Generator().manual_seed(seed)
    vision, n_image = FAMILIES[family].image_tokens(model, batch, generator)
    qwen = family in M_ROPE_FAMILIES
    pads = list(pad_left) + [0] * (batch - len(pad_left))
    rows = []
    for b in range(batch):
        before = torch.randint(3, 90, (text_before + max(pads) - pads[b],), generator=generator)
        after = torch.randint(3, 90, (text_after,), generator=generator)
        image = torch.full((n_image,), IMAGE_TOKEN)
        parts = [torch.tensor([BOS]), before]
        parts += [torch.tensor([VISION_START]), image, torch.tensor([VISION_END])] if qwen else [image]
        parts.append(after)
        rows.append(torch.cat(parts))
    length = max(len(r) for r in rows)
    input_ids = torch.full((batch, length), PAD)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(rows):
        start = length - len(row)
        input_ids[b, start:] = row
        attention_mask[b, start:] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **vision}
    if qwen:
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).to(torch.int)
    if family == "gemma3":  # image tokens attend to each other both ways where token_type_ids marks them
        inputs["token_type_ids"] = (input_ids == IMAGE_TOKEN).to(torch.long)
    return inputs


# The family's own processor, built offline: a word-level tokenizer whose special tokens sit at the
# ids the tiny configs use, and the family's image processor sized for the tiny vision tower.
_SPECIAL_NAMES = {
    "llava": {IMAGE_TOKEN: "<image>"},
    "llava-next": {IMAGE_TOKEN: "<image>"},
    "qwen2-vl": {IMAGE_TOKEN: "<|image_pad|>", VIDEO_TOKEN: "<|video_pad|>", VISION_START: "<|vision_start|>",
                 VISION_END: "<|vision_end|>"},
    "internvl": {IMAGE_TOKEN: "<IMG_CONTEXT>", VIDEO_TOKEN: "<video>", VISION_START: "<img>", VISION_END: "</img>"},
    "gemma3": {IMAGE_TOKEN: "<image_soft_token>", VISION_START: "<start_of_image>", VISION_END: "<end_of_image>"},
    "aya-vision": {IMAGE_TOKEN: "<|IMG_PATCH|>", VIDEO_TOKEN: "TILE_GLOBAL", VISION_START: "<|START_OF_IMG|>",
                   VISION_END: "<|END_OF_IMG|>"},
}
_SPECIAL_NAMES["qwen2.5-vl"] = _SPECIAL_NAMES["qwen2-vl"]
_EXTRA_SPECIAL = {
    "llava": {"image_token": "<image>"},
    "llava-next": {"image_token": "<image>"},
    "qwen2-vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    "internvl": {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>",
                 "video_token": "<video>"},
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    "aya-vision": {"image_token": "<|IMG_PATCH|>", "tile_global_token": "TILE_GLOBAL", "boi_token": "<|START_OF_IMG|>",
                   "eoi_token": "<|END_OF_IMG|>"},
}
_EXTRA_SPECIAL["qwen2.5-vl"] = _EXTRA_SPECIAL["qwen2-vl"]


def make_tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", **_SPECIAL_NAMES[family]}
    vocab = {names.get(i, f"w{i}"): i for i in range(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="w3", extra_special_tokens=_EXTRA_SPECIAL[family], padding_side="left")


def make_processor(family: str, model):
    """The family's processor class (its video part left out: torchvision is not installed)."""
    import transformers

    from redlens_compile.loading import image_only_processor_class

    tokenizer = make_tokenizer(family)
    vc = model.config.vision_config
    if family == "llava":
        image = transformers.CLIPImageProcessorPil(size={"shortest_edge": vc.image_size},
                                                   crop_size={"height": vc.image_size, "width": vc.image_size})
        return transformers.LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=vc.patch_size,
                                           vision_feature_select_strategy="default", image_token="<image>",
                                           num_additional_image_tokens=1)
    if family == "llava-next":
        image = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size},
            image_grid_pinpoints=model.config.image_grid_pinpoints)
        return transformers.LlavaNextProcessor(image_processor=image, tokenizer=tokenizer, patch_size=vc.patch_size,
                                               vision_feature_select_strategy="default", image_token="<image>",
                                               num_additional_image_tokens=1)
    if family in ("qwen2-vl", "qwen2.5-vl"):
        side = 16 * vc.patch_size  # a 16x16 patch grid: 64 visual tokens after the 2x2 merge
        image = transformers.Qwen2VLImageProcessorPil(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                                      temporal_patch_size=vc.temporal_patch_size,
                                                      size={"shortest_edge": side * side, "longest_edge": side * side})
        processor_cls = transformers.Qwen2VLProcessor if family == "qwen2-vl" else transformers.Qwen2_5_VLProcessor
        return image_only_processor_class(processor_cls)(image_processor=image, tokenizer=tokenizer)
    if family == "gemma3":
        side = vc.image_size
        image = transformers.Gemma3ImageProcessorPil(size={"height": side, "width": side})
        return transformers.Gemma3Processor(image_processor=image, tokenizer=tokenizer,
                                            image_seq_length=model.config.mm_tokens_per_image)
    if family == "aya-vision":  # one global tile: (64 / (4 * 2))^2 = 64 patch tokens between BOI and EOI
        side = vc.image_size
        image = transformers.GotOcr2ImageProcessorPil(size={"height": side, "width": side}, max_patches=1)
        return transformers.AyaVisionProcessor(image_processor=image, tokenizer=tokenizer, patch_size=vc.patch_size,
                                               img_size=side, downsample_factor=model.config.downsample_factor)
    if family == "internvl":
        side = vc.image_size[0]
        image = transformers.GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=False)
        tokens = int((side // vc.patch_size[0]) ** 2 * model.config.downsample_ratio**2)
        return image_only_processor_class(transformers.InternVLProcessor)(image_processor=image, tokenizer=tokenizer,
                                                                          image_seq_length=tokens)
    raise KeyError(family)


def ffn_output(graph_module, entry, out_node, x, args):
    """The rewritten graph run with `x` fed in at the FFN's entry node: the value `out_node` takes
    (the FFN's output, text and visual rows put back together)."""
    seen = {}

    class FFNOnly(torch.fx.Interpreter):
        def run_node(self, n):
            out = x if n is entry else super().run_node(n)
            if n is out_node:
                seen["out"] = out
            return out

    with torch.no_grad():
        FFNOnly(graph_module).run(*args)
    return seen["out"]
