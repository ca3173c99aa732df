"""Codebook build, local vs Ray, on the bundled proof model; prints JSON and writes it to --out.

    python benchmarks/codebook_build.py [--images 32] [--workers 2] [--out benchmarks/results/codebook_build.json]

The same training-split scenes (those scripts/build_proof_codebook.py calibrates on, with its
settings) are built twice into fresh shard folders: locally with 2 torch threads, and on a local
Ray of `--workers` CPUs with `--workers` workers of 1 CPU (1 torch thread) each. Wall times
cover the map and the merge; the Ray run's start (ray.init) is timed apart. Also: the forwards
one image costs (decoder sequences 4N + 1 for N visual tokens: N alone, N region with and N
without the token, N whole image without the region, 1 reference; in decoder calls of
`batch_size` sequences) and the images/s of one Ray worker (from its per-image seconds). Both
codebooks are compared (max abs prototype difference, metadata equal).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redlens_compile.analysis.codebook import CodebookSettings, build_codebook, merge_shards  # noqa: E402
from redlens_compile.files import atomic_write  # noqa: E402
from redlens_compile.loading import load_model_dir  # noqa: E402
from redlens_compile.models.demo import SHIPPED_MODEL_DIR  # noqa: E402
from redlens_compile.models.shapes_task import prompt, write_codebook_scenes  # noqa: E402

# scripts/build_proof_codebook.py's settings (why they differ from the paper's: its docstring)
SETTINGS = CodebookSettings(prompt=prompt("what colour is the object ?", "{image}"), top1_threshold=1.0,
                            jsd_threshold=1e-3, top_k=10)


def forwards_per_image(visual_tokens: int, batch_size: int) -> dict:
    return {"visual_tokens": visual_tokens, "decoder_sequences": 4 * visual_tokens + 1,
            "decoder_calls": 4 * math.ceil(visual_tokens / batch_size) + 1, "batch_size": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="training-split scenes")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, 1 CPU and 1 torch thread each")
    parser.add_argument("--local-threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "codebook_build.json"))
    args = parser.parse_args()

    import ray

    from redlens_compile.analysis.ray_engine import RayEngine, write_shards_ray

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_codebook_scenes(folder, args.images)

        torch.set_num_threads(args.local_threads)
        model, processor = load_model_dir(SHIPPED_MODEL_DIR)
        start = time.perf_counter()
        local = build_codebook(model, processor, folder, Path(tmp) / "local", SETTINGS, progress=False)
        local_s = time.perf_counter() - start

        engine = RayEngine(workers=args.workers, cpus_per_worker=1)
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        ray_start_s = time.perf_counter() - start
        try:
            timings: list[float] = []
            start = time.perf_counter()
            summary = write_shards_ray(SHIPPED_MODEL_DIR, [str(p) for p in sorted(folder.iterdir())],
                                       Path(tmp) / "ray", SETTINGS, engine, progress=False, timings=timings)
            on_ray = merge_shards([Path(tmp) / "ray"], SETTINGS)
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()

    visual = local.metadata["visual_tokens"] // local.metadata["images"]
    worker_s = statistics.median(timings)
    result = {
        "model": str(SHIPPED_MODEL_DIR.name), "images": args.images, "settings": local.metadata["settings"],
        "forwards_per_image": forwards_per_image(visual, SETTINGS.batch_size),
        "local": {"threads": args.local_threads, "wall_s": round(local_s, 2),
                  "images_per_s": round(args.images / local_s, 3)},
        "ray": {"workers": args.workers, "cpus_per_worker": 1, "threads_per_worker": engine.threads,
                "wall_s": round(ray_s, 2), "ray_start_s": round(ray_start_s, 2),
                "images_per_s": round(args.images / ray_s, 3), "summary": summary.line(),
                "one_worker_s_per_image_median": round(worker_s, 3),
                "one_worker_images_per_s": round(1 / worker_s, 3)},
        "local_over_ray_wall": round(local_s / ray_s, 3),
        "codebooks_equal": {"prototypes": [int(local.prototypes.shape[0]), int(on_ray.prototypes.shape[0])],
                            "max_abs_diff": float((local.prototypes - on_ray.prototypes).abs().max())
                            if local.prototypes.shape == on_ray.prototypes.shape else None,
                            "metadata_equal": local.metadata == on_ray.metadata},
        "torch": torch.__version__, "ray_version": ray.__version__,
    }
    text = json.dumps(result, indent=2)
    atomic_write(Path(args.out), lambda tmp_path: tmp_path.write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
