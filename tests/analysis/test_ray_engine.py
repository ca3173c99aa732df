"""The Ray engine: the codebook map on a local Ray of 2 CPUs equals the local build, survives a worker
killed mid-write, names an image that always fails, resumes; the ranking on Ray equals the local one."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import redlens_compile as rc
from redlens_compile.analysis.codebook import (
    BuildSummary, CodebookSettings, build_codebook, content_key, image_shard, merge_shards, shard_path,
)
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.analysis.ray_engine import RayEngine, write_shards_ray
from redlens_compile.cli import main as cli_main
from redlens_compile.files import atomic_write
from redlens_compile.models.demo import SHIPPED_MODEL_DIR, build_llava, make_tokenizer, save_model_dir
from redlens_compile.models.evaluate import encode_questions
from redlens_compile.models.shapes_task import heldout_questions, sample, vocabulary

# As tests/analysis/test_codebook.py: loose thresholds, so every token is a candidate and the
# clustering and merge are exercised on a random-weight model of 16 visual tokens.
SETTINGS = CodebookSettings(prompt="USER: what colour is the object ?\n{image}\nASSISTANT:", top1_threshold=1.0,
                            jsd_threshold=10.0, clusters_per_image=3, min_cluster_size=2, global_clusters=4,
                            min_image_share=0.5, batch_size=32)
SETTING_FLAGS = ["--prompt", SETTINGS.prompt, "--top1-threshold", "1.0", "--jsd-threshold", "10",
                 "--clusters-per-image", "3", "--min-cluster-size", "2", "--global-clusters", "4",
                 "--min-image-share", "0.5", "--batch-size", "32"]
IMAGES = 8
TWO_WORKERS = RayEngine(workers=2)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 CPUs for the module (startup costs seconds); the engine uses it and leaves it running."""
    ray = pytest.importorskip("ray", reason="the ray extra: pip install -e '.[test,ray]' (make setup installs it)")
    # The fault-injecting shard function below travels to the workers by value (they cannot import this file).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ray_model")
    model, processor = build_llava(make_tokenizer(vocabulary()), seed=3, image_size=32)
    return save_model_dir(model.eval(), processor, directory / "model", {"weights": "random"})


def write_images(folder: Path, indices) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        item, seed = sample("train", i)
        item.image(seed).resize((32, 32)).save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def builds(local_ray, small_model, tmp_path_factory):
    """The local build and the Ray build (2 workers) of the same 8 images, each made once."""
    root = tmp_path_factory.mktemp("ray_builds")
    images = write_images(root / "images", range(IMAGES))
    local_summaries, ray_summaries = [], []
    local = build_codebook(small_model, None, images, root / "local_shards", SETTINGS, progress=False,
                           on_summary=local_summaries.append)
    on_ray = build_codebook(small_model, None, images, root / "ray_shards", SETTINGS, progress=False,
                            engine=TWO_WORKERS, on_summary=ray_summaries.append)
    return {"root": root, "images": images, "local": local, "ray": on_ray, "local_summary": local_summaries[0],
            "ray_summary": ray_summaries[0]}


def assert_same_codebook(got: Codebook, want: Codebook) -> None:
    assert got.prototypes.shape == want.prototypes.shape
    assert float((got.prototypes - want.prototypes).abs().max()) <= 1e-6
    saved = {"format", "prototypes"}  # what Codebook.save adds to the header
    assert {k: v for k, v in got.metadata.items() if k not in saved} == want.metadata


def test_ray_with_two_workers_builds_the_local_codebook(builds):
    assert_same_codebook(builds["ray"], builds["local"])
    meta = builds["ray"].metadata
    assert meta["images"] == IMAGES and meta["visual_tokens"] == IMAGES * 16 and meta["candidates"] == IMAGES * 16
    ray_summary: BuildSummary = builds["ray_summary"]
    assert (ray_summary.images, ray_summary.made, ray_summary.reused, ray_summary.failed) == (IMAGES, IMAGES, 0, {})
    assert ray_summary.engine == "ray" and "shards made 8 / reused 0 / failed 0" in ray_summary.line()
    local_keys = sorted(p.name for p in (builds["root"] / "local_shards").iterdir())
    ray_keys = sorted(p.name for p in (builds["root"] / "ray_shards").iterdir())
    assert ray_keys == local_keys and len(ray_keys) == IMAGES  # content-named shards, nothing else in the folder


class DieOnceMidWrite:
    """The map step, except that for `victim` the first call kills its worker process while the shard's
    temporary file is half written (the real files.atomic_write, interrupted before its rename)."""

    def __init__(self, marker: str, victim: str) -> None:
        self.marker, self.victim = marker, victim

    def __call__(self, model, processor, key, image, settings):
        shard = image_shard(model, processor, key, image, settings)
        if key != self.victim or os.path.exists(self.marker):
            return shard
        Path(self.marker).write_text(str(os.getpid()))
        return _DiesWhileWriting(shard)


class _DiesWhileWriting:
    def __init__(self, shard) -> None:
        self.shard = shard

    def save(self, folder: Path) -> None:
        def half_then_die(tmp: Path) -> None:
            tmp.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"cen")  # a safetensors header cut short
            os._exit(1)

        atomic_write(shard_path(folder, self.shard.key), half_then_die)


def test_a_worker_killed_mid_write_is_retried_and_leaves_no_partial_shard(builds, small_model, tmp_path):
    images = sorted(builds["images"].iterdir())
    marker = tmp_path / "died"
    victim = content_key(images[3].read_bytes())
    shards = tmp_path / "shards"
    summary = write_shards_ray(small_model, [str(p) for p in images], shards, SETTINGS, TWO_WORKERS,
                               make_shard=DieOnceMidWrite(str(marker), victim), progress=False)
    assert marker.exists()  # the worker did die, inside the victim's write
    assert (summary.made, summary.reused, summary.failed) == (IMAGES, 0, {})  # retried on a restarted actor
    assert sorted(os.listdir(shards)) == sorted(f"{content_key(p.read_bytes())}.safetensors" for p in images)
    assert_same_codebook(merge_shards([shards], SETTINGS), builds["local"])


def test_an_image_that_always_fails_is_named_and_no_codebook_is_written(builds, small_model, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes((builds["images"] / "img000.png").read_bytes()[:60])  # a PNG cut off after its header
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join([str(broken)] + [str(p) for p in sorted(builds["images"].iterdir())]) + "\n")
    out = tmp_path / "cb.safetensors"
    command = ["codebook", str(small_model), "--images", str(listing), "--out", str(out), *SETTING_FLAGS,
               "--engine", "ray", "--workers", "2"]
    assert cli_main(command) == 2
    captured = capsys.readouterr()
    assert "failed 1" in captured.out and "broken.png" in captured.out  # the summary names it
    assert "broken.png" in captured.err and "--allow-missing 1" in captured.err
    assert not out.exists()
    assert len(list(out.with_name(out.name + ".shards").glob("*.safetensors"))) == IMAGES  # the others are kept

    assert cli_main([*command, "--allow-missing", "1"]) == 0
    captured = capsys.readouterr()
    assert "shards made 0 / reused 8 / failed 1" in captured.out
    assert_same_codebook(Codebook.load(out), builds["local"])


def test_a_stopped_ray_build_resumes_from_its_shards(builds, small_model, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(builds["root"] / "ray_shards", shards)
    for path in sorted(shards.glob("*.safetensors"))[:3]:  # as if stopped after 5 of the 8 images
        path.unlink()
    summaries = []
    resumed = build_codebook(small_model, None, builds["images"], shards, SETTINGS, progress=False,
                             engine=TWO_WORKERS, on_summary=summaries.append)
    assert (summaries[0].made, summaries[0].reused, summaries[0].failed) == (3, 5, {})
    assert_same_codebook(resumed, builds["local"])


@pytest.mark.parametrize("plan_axes", ["together", "separate"])
def test_ranking_on_ray_gives_the_local_layer_scores(local_ray, plan_axes):
    from redlens_compile.loading import load_model_dir

    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    items = heldout_questions(9, split="train")
    example = encode_questions(processor, [items[0][0]], [items[0][1].question])
    calibration = [encode_questions(processor, [image], [qa.question]) for image, qa in items[1:]]
    # settings at the floors: one trial per (layer, input), no floor rung (the same function scores both)
    # (separate: each axis alone at its floor, two trials per (layer, input))
    config = rc.RedLensConfig(flops_budget=0.5, ffn_keep=0.0625, hollow_window=8, plan_axes=plan_axes)
    local = rc.optimize(model, example, config=config, calibration=calibration).report
    on_ray = rc.optimize(model, example, config=config, calibration=calibration, engine=TWO_WORKERS).report
    want, got = local.ranking, on_ray.ranking
    assert len(calibration) == 8 and sorted(got["scores"]) == ["0", "1", "2", "3"]
    assert max(abs(got["scores"][k] - want["scores"][k]) for k in want["scores"]) <= 1e-6
    assert got["order"] == want["order"] and on_ray.plan == local.plan
    assert max(want["scores"].values()) > 0  # the trials did reduce something
    if plan_axes == "separate":
        assert sorted(got["axes"]) == ["ffn", "hollow"]
        assert max(abs(got["axes"][a]["scores"][k] - want["axes"][a]["scores"][k])
                   for a in want["axes"] for k in want["scores"]) <= 1e-6


def test_engine_ray_without_ray_is_an_error_naming_the_extra(small_model, tmp_path):
    images = write_images(tmp_path / "images", range(2))
    script = f"""
import sys
sys.modules["ray"] = None  # Ray not installed
from redlens_compile.cli import main
from redlens_compile.errors import EngineUnavailableError
from redlens_compile.analysis.codebook import build_codebook
import redlens_compile as rc
code = main(["codebook", {str(small_model)!r}, "--images", {str(images)!r}, "--out", {str(tmp_path / 'cb.st')!r},
             "--engine", "ray"])
assert code == 2, code
for call in (lambda: build_codebook({str(small_model)!r}, None, {str(images)!r}, "shards", engine="ray"),
             lambda: rc.optimize(None, {{}}, engine="ray")):
    try:
        call()
    except EngineUnavailableError as exc:
        assert "redlens-compile[ray]" in str(exc), exc
    else:
        raise AssertionError("no error")
assert main(["codebook", {str(small_model)!r}, "--images", {str(images)!r}, "--out", {str(tmp_path / 'cb.st')!r},
             "--workers", "2"]) == 2
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr
    assert "redlens-compile[ray]" in run.stderr and "--workers: only with --engine ray" in run.stderr
    assert not (tmp_path / "cb.st").exists() and not (tmp_path / "shards").exists()
