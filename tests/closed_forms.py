"""FLOPs written out from the configs alone (one multiply-add = 1 FLOP), for the tests to compare
the counts with: a decoder layer by token kind, and each first family's vision tower and projector.

fvcore's conventions, as analysis/flops.py uses them: linears and the attention core are counted
(the vision towers' attention is not causal: every query sees every key of its image, QK^T and
A.V each N*N*width), a convolution is one multiply-add per kernel element and output channel at
every output position, and aten::layer_norm is 5 per element of its input; activations,
softmax, RoPE and position embeddings count 0.
"""

from __future__ import annotations

import torch


def closed_form_per_layer(cfg, visual_mask: torch.Tensor) -> dict[str, dict[str, float]]:
    """Multiply-adds of one decoder layer for one sequence, by token kind and group."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    out = {}
    for kind, rows in (("visual", visual_mask), ("text", ~visual_mask)):
        n = int(rows.sum())
        positions = torch.nonzero(rows).flatten()
        keys_seen = int((positions + 1).sum())  # a query at position i sees keys 0..i
        out[kind] = {
            "proj": n * d * (2 * q_dim + 2 * kv_dim),
            "attn": 2 * q_dim * keys_seen,
            "ffn": 3 * n * d * f,
        }
    return out


def _vit_layer(n: int, width: int, inner: int) -> int:
    """One pre-norm ViT block on n rows: q/k/v/o, attention both ways, a two-linear MLP, two norms."""
    return 4 * n * width * width + 2 * n * n * width + 2 * n * width * inner + 2 * 5 * n * width


def _clip_tower(vc, images: int) -> int:
    """CLIP: the patch conv, the pre-norm, the blocks and the post-norm of the pooled CLS row, on
    `images` images of (size/patch)^2 patches + CLS."""
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    conv = (n - 1) * vc.num_channels * vc.patch_size**2 * vc.hidden_size
    norms = 5 * n * vc.hidden_size + 5 * vc.hidden_size
    return images * (conv + norms + vc.num_hidden_layers * _vit_layer(n, vc.hidden_size, vc.intermediate_size))


def vision_closed_form(model, inputs: dict) -> tuple[int, int]:
    """(vision tower, projector) FLOPs of one forward on `inputs`, from the config and the input shapes."""
    cfg = model.config
    vc, d = cfg.vision_config, cfg.text_config.hidden_size
    kind = cfg.model_type
    if kind in ("llava", "llava_next"):
        pixels = inputs["pixel_values"]
        images = pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1)  # anyres: every tile
        assert cfg.vision_feature_select_strategy == "default" and cfg.vision_feature_layer == -1
        tokens = images * (vc.image_size // vc.patch_size) ** 2  # "default" drops CLS before the projector
        return _clip_tower(vc, images), tokens * (vc.hidden_size * d + d * d)
    if kind == "qwen2_vl":
        grids = inputs["image_grid_thw"].tolist()
        n = sum(t * h * w for t, h, w in grids)
        width, merge = vc.embed_dim, vc.spatial_merge_size**2
        conv = n * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * width
        # attention within each image only (cu_seqlens): sum of N_i^2, not N^2
        square = sum((t * h * w) ** 2 for t, h, w in grids)
        block = 4 * n * width * width + 2 * square * width + 2 * n * width * vc.mlp_ratio * width + 2 * 5 * n * width
        merged = n // merge
        merger = 5 * n * width + merged * ((width * merge) ** 2 + width * merge * vc.hidden_size)
        return conv + vc.depth * block, merger
    if kind == "internvl":
        images = inputs["pixel_values"].shape[0]
        patches = (vc.image_size[0] // vc.patch_size[0]) * (vc.image_size[1] // vc.patch_size[1])
        n = patches + 1  # + CLS
        conv = patches * vc.num_channels * vc.patch_size[0] * vc.patch_size[1] * vc.hidden_size
        assert vc.use_mean_pooling  # no final norm on the last hidden state
        tower = images * (conv + vc.num_hidden_layers * _vit_layer(n, vc.hidden_size, vc.intermediate_size))
        # pixel shuffle: (ratio^2) x fewer rows, each 1/ratio^2 wider; a norm then two linears
        rows = images * int(patches * cfg.downsample_ratio**2)
        width = int(vc.hidden_size / cfg.downsample_ratio**2)
        return tower, 5 * rows * width + rows * (width * d + d * d)
    raise KeyError(f"no closed form written for {kind}")
