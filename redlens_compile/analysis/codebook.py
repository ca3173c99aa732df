"""Build a redundancy codebook from calibration images (identify-then-probe, the "identify" half).

A map over images, then a merge:
- map (`write_shards`): per image, every visual token is tested.
  (1) single-token input: the token repeated as the whole visual input, with a describe-in-one-
      word prompt; a token the model cannot name (top-1 probability over the head top-k below
      `top1_threshold`) carries little on its own;
  (2) leave-one-out: region level (the token's (2r+1)^2 neighbourhood alone, the rest replaced
      by the pad embedding, with and without the token) and global level (the whole image with
      and without that neighbourhood), each the JSD of the next-token distribution over the
      reference's top-k; JSD_region + lambda * JSD_global below `jsd_threshold` means removing
      it barely moves the output.
  Tokens meeting both are candidates; they are clustered (DPC-kNN) and the centres of clusters
  of at least `min_cluster_size` tokens are written, with the counts, as one shard per image
  (safetensors, written through a temporary file). A build that is interrupted resumes: images
  whose shard exists are skipped.
- merge (`merge_shards`): every shard's centres are clustered across images; a cluster that at
  least `min_image_share` of the images contribute to is a redundancy that recurs, and its
  centres become the codebook's prototypes. Shards are read in the order of their image keys,
  so shards made in other processes or machines merge into the codebook one build makes.

`build_codebook(..., engine="ray")` runs the map on Ray (analysis/ray_engine.py: one model
replica per actor, a local Ray or a cluster by address); the merge is this one, on the driver.

The ablations run batched (`batch_size` sequences per decoder call) on the eager language model.
Defaults follow the paper's public code (LLaVA-1.5): top-1 0.15 over the top-50, JSD 2e-3,
region radius 1, 8 clusters per image with clusters under 8 tokens dropped, 64 clusters across
images, and a prototype when 64 of its 500 images contribute (`min_image_share` = 64/500,
the count scaled to the calibration set). Small or task-specific models need their own
thresholds: the build reports the statistics to choose them from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from ..capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from ..capture.families import FamilyAdapter, adapter_for
from ..errors import CodebookError
from ..files import save_safetensors
from .codebook_file import Codebook
from .divergence import js_divergence, log_probs

logger = logging.getLogger(__name__)

SHARD_FORMAT = "redlens-codebook-shard/1"
SHARD_KEY = "redlens_shard"


@dataclass(frozen=True)
class CodebookSettings:
    prompt: str = "{image}\nDescribe the image in one word."
    top_k: int = 50
    top1_threshold: float = 0.15
    jsd_threshold: float = 2e-3
    global_weight: float = 1.0
    region_radius: int = 1
    clusters_per_image: int = 8
    min_cluster_size: int = 8
    global_clusters: int = 64
    min_image_share: float = 64 / 500
    knn: int = 5
    batch_size: int = 64

    def __post_init__(self) -> None:
        if "{image}" not in self.prompt:
            raise CodebookError(f"prompt {self.prompt!r} has no '{{image}}' placeholder for the image")
        for name in ("top_k", "clusters_per_image", "min_cluster_size", "global_clusters", "knn", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CodebookError(f"{name}={getattr(self, name)!r}: must be an int >= 1")
        if not isinstance(self.region_radius, int) or self.region_radius < 0:
            raise CodebookError(f"region_radius={self.region_radius!r}: must be an int >= 0")
        if not 0.0 < self.top1_threshold <= 1.0:
            raise CodebookError(f"top1_threshold={self.top1_threshold!r}: must lie in (0, 1]")
        if not self.jsd_threshold > 0.0 or not self.global_weight >= 0.0:
            raise CodebookError("jsd_threshold must be > 0 and global_weight >= 0")
        if not 0.0 < self.min_image_share <= 1.0:
            raise CodebookError(f"min_image_share={self.min_image_share!r}: must lie in (0, 1]")

    def map_fingerprint(self) -> str:
        """What a shard depends on: shards of other settings must not be merged together."""
        keys = ("prompt", "top_k", "top1_threshold", "jsd_threshold", "global_weight", "region_radius",
                "clusters_per_image", "min_cluster_size", "knn")
        return json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)


# ---- images ----------------------------------------------------------------------------


def content_key(data: bytes) -> str:
    """A shard's name: the content hash of the image file's bytes (renames and copies map to one shard)."""
    return hashlib.sha256(data).hexdigest()[:20]


def image_key(path: Path) -> str:
    return content_key(path.read_bytes())


def shard_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.safetensors"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of `folder`, sorted; each is opened and decoded now, so a bad file fails before any work."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CodebookError(f"--images {folder}: not a folder (a list file of paths is read by --engine ray)")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise CodebookError(f"--images {folder}: the folder is empty; put calibration images (png/jpg) in it")
    unreadable = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.convert("RGB").load()
        except Exception as exc:  # PIL raises many types for bad files
            unreadable.append(f"{path.name} ({type(exc).__name__})")
    if unreadable:
        raise CodebookError(f"--images {folder}: {len(unreadable)} file(s) are not readable images: "
                            f"{', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}; remove them")
    return paths


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


# ---- the model runs ----------------------------------------------------------------------


@dataclass
class ProbeContext:
    """One image's decoder inputs and what the ablations need from the model."""

    inputs: DecoderInputs  # batch 1
    visual_positions: torch.Tensor  # [N] sequence positions of the visual rows
    grid: tuple[int, int]  # (rows, cols) of the visual tokens
    pad_embedding: torch.Tensor  # [D]
    language_model: nn.Module
    lm_head: nn.Module


def token_grid(model: nn.Module, inputs: Mapping[str, Any], count: int) -> tuple[int, int]:
    """The 2-D layout of an image's visual tokens (the region test needs neighbours)."""
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        merge = int(getattr(model.config.vision_config, "spatial_merge_size", 1))
        t, h, w = (int(v) for v in thw[0])
        if t * (h // merge) * (w // merge) == count and t == 1:
            return h // merge, w // merge
    side = math.isqrt(count)
    if side * side == count:
        return side, side
    raise CodebookError(f"cannot lay the {count} visual tokens of an image out on a grid (not square, no "
                        "image_grid_thw): give one image per prompt at a fixed resolution")


def pad_embedding(model: nn.Module, adapter: FamilyAdapter) -> torch.Tensor:
    text = adapter.language_model(model).config
    pad = getattr(model.config, "pad_token_id", None)
    pad = getattr(text, "pad_token_id", None) if pad is None else pad
    embed = model.get_input_embeddings()
    if pad is None:
        logger.warning("the model has no pad token id: ablated tokens are replaced by zeros")
        return embed.weight.new_zeros(embed.weight.shape[1])
    with torch.no_grad():
        return embed(torch.tensor([pad], device=embed.weight.device))[0]


def last_logits(ctx: ProbeContext, embeds: torch.Tensor) -> torch.Tensor:
    """[n, V] next-token logits for n variants of the image's embeddings [n, S, D]."""
    n = embeds.shape[0]
    inputs = ctx.inputs
    pos_dim = inputs.position_ids.dim() - 2
    positions = torch.cat([inputs.position_ids] * n, dim=pos_dim)
    with torch.no_grad():
        hidden = ctx.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask.expand(n, -1),
                                    position_ids=positions, use_cache=False).last_hidden_state
        return ctx.lm_head(hidden[:, -1]).float()


def top1_probability(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[n] the largest probability of the softmax over each row's own top-k logits."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values
    return top.softmax(dim=-1)[:, 0]


def restricted_jsd(reference: torch.Tensor, other: torch.Tensor, k: int) -> torch.Tensor:
    """[n] JSD between each reference row and other row, over the reference row's top-k tokens."""
    index = reference.topk(min(k, reference.shape[-1]), dim=-1).indices
    return js_divergence(log_probs(reference.gather(-1, index)), log_probs(other.gather(-1, index)))


def neighbourhoods(grid: tuple[int, int], radius: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """For each token (row-major), the indices of the tokens within `radius` (Chebyshev) of it."""
    rows, cols = grid
    out = []
    for r in range(rows):
        for c in range(cols):
            rr = torch.arange(max(0, r - radius), min(rows, r + radius + 1), device=device)
            cc = torch.arange(max(0, c - radius), min(cols, c + radius + 1), device=device)
            out.append((rr[:, None] * cols + cc[None, :]).flatten())
    return out


def _batched(ctx: ProbeContext, variants: Callable[[int], torch.Tensor], count: int, batch: int) -> torch.Tensor:
    """Logits of `count` variants of the embeddings, made and run `batch` at a time."""
    outs = [last_logits(ctx, torch.stack([variants(i) for i in range(s, min(count, s + batch))]))
            for s in range(0, count, batch)]
    return torch.cat(outs)


def token_statistics(ctx: ProbeContext, settings: CodebookSettings) -> dict[str, torch.Tensor]:
    """Per visual token: top-1 probability alone, region-level and global-level leave-one-out JSD."""
    base = ctx.inputs.inputs_embeds[0]
    vis = ctx.visual_positions
    tokens = base[vis]  # [N, D]
    n = tokens.shape[0]
    pad = ctx.pad_embedding.to(base.dtype)
    regions = neighbourhoods(ctx.grid, settings.region_radius, vis.device)
    batch = settings.batch_size

    def alone(i: int) -> torch.Tensor:
        x = base.clone()
        x[vis] = tokens[i]
        return x

    def region(i: int, without: bool) -> torch.Tensor:
        x = base.clone()
        x[vis] = pad
        keep = regions[i] if not without else regions[i][regions[i] != i]
        x[vis[keep]] = tokens[keep]
        return x

    def image_without_region(i: int) -> torch.Tensor:
        x = base.clone()
        x[vis[regions[i]]] = pad
        return x

    top1 = top1_probability(_batched(ctx, alone, n, batch), settings.top_k)
    region_with = _batched(ctx, lambda i: region(i, False), n, batch)
    region_without = _batched(ctx, lambda i: region(i, True), n, batch)
    full = last_logits(ctx, base[None]).expand(n, -1)
    without_region = _batched(ctx, image_without_region, n, batch)
    return {
        "top1": top1,
        "jsd_region": restricted_jsd(region_with, region_without, settings.top_k),
        "jsd_global": restricted_jsd(full, without_region, settings.top_k),
    }


# ---- clustering ------------------------------------------------------------------------------


def dpc_knn(points: torch.Tensor, clusters: int, knn: int) -> torch.Tensor:
    """Density-peaks clustering with kNN density; returns a cluster label per point. Deterministic.

    Density: exp(-mean squared distance to the k nearest neighbours). Centres: the points of
    largest density * distance to any denser point; every point joins its nearest centre.
    """
    n = points.shape[0]
    if n <= clusters:
        return torch.arange(n, device=points.device)
    dist = torch.cdist(points.double(), points.double())
    k = min(knn, n - 1)
    near = dist.topk(k + 1, dim=1, largest=False).values[:, 1:]
    # A tiny index-ordered tie-break keeps equal densities from depending on sort internals.
    density = torch.exp(-(near ** 2).mean(dim=1)) - torch.arange(n, dtype=torch.float64, device=dist.device) * 1e-12
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
    top = int(density.argmax())
    delta[top] = dist[top].max()
    centres = torch.sort((density * delta), descending=True, stable=True).indices[:clusters]
    return dist[:, centres].argmin(dim=1)


def cluster_centres(embeddings: torch.Tensor, clusters: int, min_size: int, knn: int) -> torch.Tensor:
    """Centres (member means) of the DPC-kNN clusters of `embeddings` that hold >= min_size members."""
    if embeddings.shape[0] < min_size:
        return embeddings.new_zeros(0, embeddings.shape[1])
    labels = dpc_knn(F.normalize(embeddings, dim=-1), clusters, knn)
    centres = [embeddings[labels == c].mean(dim=0) for c in range(int(labels.max()) + 1)
               if int((labels == c).sum()) >= min_size]
    return torch.stack(centres) if centres else embeddings.new_zeros(0, embeddings.shape[1])


# ---- shards -----------------------------------------------------------------------------


@dataclass
class ImageShard:
    key: str
    centres: torch.Tensor  # [C, D]
    metadata: dict[str, Any]

    def save(self, folder: Path) -> Path:
        return save_safetensors(folder / f"{self.key}.safetensors", {"centres": self.centres}, SHARD_KEY, self.metadata)

    @classmethod
    def load(cls, path: Path) -> "ImageShard":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = json.loads((f.metadata() or {})[SHARD_KEY])
                centres = f.get_tensor("centres")
        except Exception as exc:
            raise CodebookError(f"shard {path} is not a readable codebook shard: {exc}") from exc
        if metadata.get("format") != SHARD_FORMAT:
            raise CodebookError(f"shard {path}: format {metadata.get('format')!r}, expected {SHARD_FORMAT!r}")
        return cls(key=path.stem, centres=centres, metadata=metadata)


def probe_context(model: nn.Module, processor: Any, image: Image.Image, settings: CodebookSettings) -> ProbeContext:
    adapter = adapter_for(model)
    image_token = getattr(processor, "image_token", "<image>")
    inputs = dict(processor(images=[image], text=[settings.prompt.format(image=image_token)], return_tensors="pt"))
    # the processor's tensors are on the host, in float32: onto the model's device, pixels in its dtype
    weight = model.get_input_embeddings().weight
    inputs = {k: (v.to(weight.device, weight.dtype) if v.is_floating_point() else v.to(weight.device))
              if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    decoder_inputs = capture_decoder_inputs(model, adapter, inputs)
    positions = decoder_inputs.visual_mask[0].nonzero().flatten()
    return ProbeContext(
        inputs=decoder_inputs, visual_positions=positions, grid=token_grid(model, inputs, positions.numel()),
        pad_embedding=pad_embedding(model, adapter), language_model=adapter.language_model(model),
        lm_head=adapter.lm_head(model),
    )


def image_shard(model: nn.Module, processor: Any, key: str, image: Image.Image,
                settings: CodebookSettings) -> ImageShard:
    """The map step for one image: its candidates' cluster centres and the counts."""
    ctx = probe_context(model, processor, image, settings)
    stats = {k: v.cpu() for k, v in token_statistics(ctx, settings).items()}  # clustering and shards on the CPU
    score = stats["jsd_region"] + settings.global_weight * stats["jsd_global"]
    candidate = (stats["top1"] < settings.top1_threshold) & (score < settings.jsd_threshold)
    # clustering and the shard run on the host (float64 distances; some accelerators lack float64)
    tokens = ctx.inputs.inputs_embeds[0][ctx.visual_positions].float().cpu()
    candidate, score, stats = candidate.cpu(), score.cpu(), {k: v.cpu() for k, v in stats.items()}
    centres = cluster_centres(tokens[candidate], settings.clusters_per_image, settings.min_cluster_size, settings.knn)
    quantiles = lambda t: [round(float(v), 6) for v in torch.quantile(t.double(), t.new_tensor([0.1, 0.5, 0.9], dtype=torch.float64))]  # noqa: E731,E501
    metadata = {
        "format": SHARD_FORMAT,
        "model_type": model.config.model_type,
        "hidden_size": int(tokens.shape[1]),
        "settings": settings.map_fingerprint(),
        "visual_tokens": int(tokens.shape[0]),
        "candidates": int(candidate.sum()),
        "clusters": int(centres.shape[0]),
        # quantiles (10/50/90%) to choose thresholds from
        "top1_quantiles": quantiles(stats["top1"]),
        "jsd_quantiles": quantiles(score),
    }
    return ImageShard(key=key, centres=centres, metadata=metadata)


ImageDone = Callable[[str], None]


def write_shards(model: nn.Module, processor: Any, images: Sequence[Path], shard_dir: str | os.PathLike,
                 settings: CodebookSettings, on_image_done: ImageDone | None = None, progress: bool = True) -> int:
    """The map: one shard per image into `shard_dir`, skipping images whose shard exists. Returns the count made."""
    folder = Path(shard_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    made = 0
    for path in tqdm(images, desc="codebook: ablating images", unit="image", disable=not progress):
        key = image_key(path)
        target = shard_path(folder, key)
        if target.exists():
            check_shard_settings(ImageShard.load(target), folder, settings)
            continue
        image_shard(model, processor, key, load_image(path), settings).save(folder)
        made += 1
        if on_image_done is not None:
            on_image_done(key)
    return made


def check_shard_settings(shard: ImageShard, folder: Path, settings: CodebookSettings) -> None:
    if shard.metadata.get("settings") != settings.map_fingerprint():
        raise CodebookError(f"shard folder {folder} holds shards of other settings; use a new --shards folder")


@dataclass
class BuildSummary:
    """What a build's map did: images listed, shards made now / found from an earlier run / failed."""

    images: int
    made: int
    reused: int
    failed: dict[str, str] = field(default_factory=dict)  # image -> why it has no shard
    wall_s: float = 0.0
    engine: str = "local"

    def line(self) -> str:
        text = (f"{self.images} images, shards made {self.made} / reused {self.reused} / failed {len(self.failed)}, "
                f"wall {self.wall_s:.1f} s ({self.engine})")
        if self.failed:
            named = "; ".join(f"{name}: {why}" for name, why in list(self.failed.items())[:10])
            text += f"; failed: {named}{' ...' if len(self.failed) > 10 else ''}"
        return text


def read_shards(folders: Iterable[str | os.PathLike]) -> list[ImageShard]:
    shards: dict[str, ImageShard] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.safetensors")):
            shards.setdefault(path.stem, ImageShard.load(path))
    if not shards:
        raise CodebookError(f"no codebook shards in {', '.join(map(str, folders))}")
    return [shards[k] for k in sorted(shards)]


def merge_shards(folders: Iterable[str | os.PathLike], settings: CodebookSettings) -> Codebook:
    """The merge: cluster every image's centres across images; recurring clusters become prototypes."""
    folders = list(folders)
    shards = read_shards(folders)
    first = shards[0].metadata
    for shard in shards:
        meta = shard.metadata
        if (meta["model_type"], meta["hidden_size"], meta["settings"]) != \
                (first["model_type"], first["hidden_size"], first["settings"]):
            raise CodebookError(f"shard {shard.key} was made for another model or other settings than shard "
                                f"{shards[0].key}: merge only shards of one build configuration")
    centres = [s.centres for s in shards]
    owners = torch.cat([torch.full((c.shape[0],), i, device=c.device) for i, c in enumerate(centres)])
    points = torch.cat(centres)
    images = len(shards)
    min_images = max(1, math.ceil(settings.min_image_share * images))
    candidates = sum(s.metadata["candidates"] for s in shards)
    if points.shape[0] == 0:
        raise CodebookError(f"no image of {images} gave a cluster of >= {settings.min_cluster_size} redundant "
                            f"candidates ({candidates} candidates in all): raise top1_threshold or jsd_threshold "
                            "(the shards hold the quantiles to choose from)")
    labels = dpc_knn(F.normalize(points, dim=-1), settings.global_clusters, settings.knn)
    recurring = [c for c in range(int(labels.max()) + 1) if owners[labels == c].unique().numel() >= min_images]
    keep = torch.isin(labels, torch.tensor(recurring, dtype=labels.dtype, device=labels.device))
    if not bool(keep.any()):
        raise CodebookError(f"no cluster recurs in >= {min_images} of the {images} images (min_image_share "
                            f"{settings.min_image_share:.3f}): lower min_image_share or give more images")
    metadata = {
        "model_type": first["model_type"],
        "hidden_size": first["hidden_size"],
        "settings": dataclasses.asdict(settings),
        "images": images,
        "visual_tokens": sum(s.metadata["visual_tokens"] for s in shards),
        "candidates": candidates,
        "image_clusters": int(points.shape[0]),
        "recurring_clusters": len(recurring),
        "min_images": min_images,
    }
    logger.info("codebook: %d images, %d candidates, %d prototypes", images, candidates, int(keep.sum()))
    return Codebook(prototypes=points[keep].contiguous(), metadata=metadata)


def build_codebook(model: nn.Module | str | os.PathLike, processor: Any, image_folder: str | os.PathLike,
                   shard_dir: str | os.PathLike, settings: CodebookSettings | None = None,
                   extra_shards: Sequence[str | os.PathLike] = (), on_image_done: ImageDone | None = None,
                   progress: bool = True, engine: Any = "local", allow_missing: int = 0,
                   dtype: torch.dtype | None = None, on_summary: Callable[[BuildSummary], None] | None = None
                   ) -> Codebook:
    """Map over the images of `image_folder` (resuming from `shard_dir`), then merge with any `extra_shards`.

    engine: "local" (this process), "ray" or a ray_engine.RayEngine; Ray loads the model on each
    worker, so `model` is then its directory (and `processor` None), and `image_folder` may be a
    list file of paths or URIs the workers read. An image whose map fails on Ray is named in the
    summary; the codebook is merged only when at most `allow_missing` images have no shard.
    """
    settings = settings or CodebookSettings()
    from .ray_engine import resolve_engine

    ray_engine = resolve_engine(engine)  # a missing extra fails before any work
    if ray_engine is not None:
        from .ray_engine import image_sources, write_shards_ray

        if isinstance(model, nn.Module):
            raise CodebookError("engine='ray' loads the model on every worker from its directory: pass the model "
                                "directory (a save_pretrained folder) as `model`, not a loaded model")
        summary = write_shards_ray(model, image_sources(image_folder), shard_dir, settings, ray_engine, dtype=dtype,
                                   progress=progress)
    else:
        if not isinstance(model, nn.Module):
            from ..loading import load_model_dir

            model, processor = load_model_dir(model)
            model = model.to(dtype) if dtype is not None else model
        images = list_images(image_folder)
        start = time.perf_counter()
        made = write_shards(model, processor, images, shard_dir, settings, on_image_done, progress)
        summary = BuildSummary(len(images), made, len(images) - made, wall_s=time.perf_counter() - start)
    logger.info("codebook map: %s", summary.line())
    if on_summary is not None:
        on_summary(summary)
    if len(summary.failed) > allow_missing:
        names = ", ".join(list(summary.failed)[:10]) + (" ..." if len(summary.failed) > 10 else "")
        raise CodebookError(f"{len(summary.failed)} image(s) have no shard ({names}); the codebook is not written. "
                            "Fix or remove them and rerun (the other shards are kept and reused), or pass "
                            f"--allow-missing {len(summary.failed)} to build it without them")
    return merge_shards([shard_dir, *extra_shards], settings)
