"""The Ray engine: the codebook's map and the layer ranking's trials on Ray, a local one or a cluster.

Ray is an optional extra (`pip install "redlens-compile[ray]"`); nothing here imports it before
engine="ray" is asked for, and then `resolve_engine` names the extra where it is missing.

- Codebook map (`write_shards_ray`): a Ray Data dataset of image sources, one image per block,
  `map_batches` over `ShardWriter`, an actor holding one model replica (loaded from the model
  directory, in the dtype asked). Each image's shard is named by its content key and written
  through a temporary file and a rename (files.atomic_write), so a retried or duplicated task
  cannot leave a half shard or two different ones; an image whose shard exists is skipped before
  any model work (resume). A worker that dies is restarted and its image retried (Ray's actor
  restarts and task retries); an image that fails for its own reason is returned as failed and
  named in the summary. The merge stays on the driver (codebook.merge_shards), so a Ray build and
  a local build give the same codebook. On a cluster the shard folder must be one every node and
  the driver see (a shared filesystem).
- Ranking (`sensitivity_scores_ray`): an actor pool, each actor capturing the decoder once from
  the model (sent through the object store; the exported graph itself does not serialize); a task
  is one (settings, layer) trial over every calibration input; the driver sums the divergences in
  the local order (ranking.mean_score), so the scores equal the local run's.

Torch threads: Ray sets OMP_NUM_THREADS to a task's CPU count (1 when fractional), and each actor
sets torch's own thread count from its CPU share in `__init__`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm import tqdm

from ..errors import CodebookError, ConfigError, EngineUnavailableError

logger = logging.getLogger(__name__)

RAY_EXTRA = 'pip install "redlens-compile[ray]"'


@dataclass(frozen=True)
class RayEngine:
    """Where and how wide the work runs. address None: a local Ray started (and stopped) for the call;
    "auto" or HOST:PORT: a running cluster (`ray start --head`). workers None: as many as the
    cluster's CPUs (GPUs when gpus_per_worker > 0) hold."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 3  # a task whose worker died is retried this many times on a restarted actor

    def __post_init__(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"workers={self.workers!r}: must be an int >= 1 (or None: as the cluster holds)")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker!r}: must be > 0")
        if not self.gpus_per_worker >= 0:
            raise ConfigError(f"gpus_per_worker={self.gpus_per_worker!r}: must be >= 0")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries={self.max_retries!r}: must be an int >= 0")

    @property
    def threads(self) -> int:
        """torch threads of one worker: its whole CPUs (1 for a fractional share)."""
        return max(1, int(self.cpus_per_worker))

    def actor_options(self) -> dict[str, Any]:
        return {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker}


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailableError(f"engine='ray' (--engine ray) needs Ray, an optional extra: {RAY_EXTRA} "
                                     f"(or leave the engine at 'local'); importing it failed: {exc}") from exc


def resolve_engine(engine: Any) -> RayEngine | None:
    """None for the local engine; a RayEngine for "ray" or a RayEngine (Ray's import checked now)."""
    if engine is None or engine == "local":
        return None
    if engine == "ray":
        engine = RayEngine()
    if not isinstance(engine, RayEngine):
        raise ConfigError(f"engine={engine!r}: must be 'local', 'ray' or a RayEngine(address=..., workers=...)")
    require_ray()
    return engine


@contextlib.contextmanager
def ray_session(engine: RayEngine) -> Iterator[None]:
    """Ray for the call: one already initialized (a notebook, a test) is used and left running;
    otherwise a local Ray of workers x cpus_per_worker CPUs, or the cluster at `address`,
    connected now and shut down (a local one stopped) at the end."""
    import ray

    if ray.is_initialized():
        yield
        return
    if engine.address is None:
        cpus = math.ceil(engine.workers * engine.cpus_per_worker) if engine.workers else os.cpu_count()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        try:
            ray.init(address=engine.address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise EngineUnavailableError(f"--address {engine.address}: no Ray cluster there ({exc}); start one with "
                                         "`ray start --head` on the head node") from exc
    try:
        yield
    finally:
        ray.shutdown()


def pool_size(engine: RayEngine) -> int:
    """Workers: as asked, else as many as the cluster's CPUs (GPUs) hold."""
    import ray

    resources = ray.cluster_resources()
    if engine.gpus_per_worker > 0 and resources.get("GPU", 0) < engine.gpus_per_worker:
        raise EngineUnavailableError(f"gpus_per_worker={engine.gpus_per_worker}: the Ray cluster has "
                                     f"{resources.get('GPU', 0)} GPUs; connect to a cluster with GPUs (--address) "
                                     "or pass --gpus-per-worker 0")
    if engine.workers is not None:
        return engine.workers
    fits = resources.get("CPU", 1) // engine.cpus_per_worker
    if engine.gpus_per_worker > 0:
        fits = min(fits, resources["GPU"] // engine.gpus_per_worker)
    return max(1, int(fits))


def _actor_device() -> torch.device:
    import ray

    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


# ---- the codebook map ------------------------------------------------------------------------


def image_sources(spec: str | os.PathLike) -> list[str]:
    """A folder (its images, each decoded now as the local build does) or a list file: one path or
    URI a line ('#' comments), relative paths against the list file's folder. List entries are
    read by the workers (a cluster's driver may not see them); an unreadable one is a failed image."""
    from .codebook import list_images

    path = Path(spec)
    if path.is_dir():
        return [str(p) for p in list_images(path)]
    if not path.is_file():
        raise CodebookError(f"--images {spec}: neither a folder of images nor a list file of image paths")
    sources = []
    for line in path.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry and not Path(entry).is_absolute():
            entry = str(path.parent / entry)
        sources.append(entry)
    if not sources:
        raise CodebookError(f"--images {spec}: the list file names no image; one path or URI a line")
    return list(dict.fromkeys(sources))


def read_source(source: str) -> bytes:
    """An image file's bytes: a path, or a URI through pyarrow's filesystems (s3://, gs://, ...)."""
    if "://" in source and not source.startswith("file://"):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(source)
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    return Path(source.removeprefix("file://")).read_bytes()


MakeShard = Callable[..., Any]  # (model, processor, key, image, settings) -> ImageShard


class ShardWriter:
    """A Ray Data actor: one model replica; per image one shard, named by content, or a failure row."""

    def __init__(self, model_dir: str, shard_dir: str, settings: Any, dtype: str | None, threads: int,
                 make_shard: MakeShard | None = None) -> None:
        # Ray sets OMP_NUM_THREADS from the CPU share; torch's intra-op pool is set here to match it.
        torch.set_num_threads(threads)
        from ..loading import load_model_dir
        from .codebook import image_shard

        model, self.processor = load_model_dir(model_dir)
        self.model = model.to(device=_actor_device(), dtype=getattr(torch, dtype) if dtype else None).eval()
        self.folder = Path(shard_dir)
        self.settings = settings
        self.make_shard = make_shard or image_shard

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        rows: dict[str, list] = {"source": [], "key": [], "status": [], "error": [], "seconds": []}
        for source in batch["source"]:
            start = time.perf_counter()
            key, status, error = self.one(str(source))
            for name, value in (("source", str(source)), ("key", key), ("status", status), ("error", error),
                                ("seconds", time.perf_counter() - start)):
                rows[name].append(value)
        return rows

    def one(self, source: str) -> tuple[str, str, str]:
        from PIL import Image

        from .codebook import content_key, shard_path

        try:
            data = read_source(source)
        except Exception as exc:  # gone or unreadable since the listing: this image fails, the build goes on
            return "", "failed", f"unreadable ({type(exc).__name__}: {exc})"
        key = content_key(data)
        if shard_path(self.folder, key).exists():
            return key, "reused", ""
        try:
            with Image.open(io.BytesIO(data)) as img:
                image = img.convert("RGB")
            self.make_shard(self.model, self.processor, key, image, self.settings).save(self.folder)
        except Exception as exc:  # a processor or model error of this image
            logger.warning("codebook: %s failed: %s: %s", source, type(exc).__name__, exc)
            return key, "failed", f"{type(exc).__name__}: {exc}"
        return key, "made", ""


def remove_partial_shards(folder: Path) -> int:
    """Temporary files of writes whose worker died before the rename (files.atomic_write's names)."""
    partial = list(folder.glob(".*.safetensors.*.tmp"))
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def write_shards_ray(model_dir: str | os.PathLike, sources: Sequence[str], shard_dir: str | os.PathLike,
                     settings: Any, engine: RayEngine, dtype: torch.dtype | None = None,
                     make_shard: MakeShard | None = None, progress: bool = True,
                     timings: list[float] | None = None) -> Any:
    """The codebook's map on Ray; returns the BuildSummary. `make_shard` replaces codebook.image_shard
    (a picklable callable); `timings`, when given, receives each made shard's seconds on its worker."""
    import ray
    import ray.data

    from .codebook import BuildSummary, ImageShard, check_shard_settings

    folder = Path(shard_dir).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.safetensors"))
    if existing:  # shards of other settings: refused before anything starts
        check_shard_settings(ImageShard.load(existing[0]), folder, settings)
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else None
    start = time.perf_counter()
    results: dict[str, dict] = {}
    with ray_session(engine):
        context = ray.data.DataContext.get_current()
        saved = context.max_errored_blocks, context.enable_progress_bars, context.print_on_execution_start
        # A block (one image) whose worker died past its retries is ignored here and named below as failed.
        context.max_errored_blocks = -1
        context.enable_progress_bars = context.print_on_execution_start = False  # the bar below counts images
        try:
            dataset = ray.data.from_items([{"source": s} for s in sources], override_num_blocks=len(sources))
            dataset = dataset.map_batches(
                ShardWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=pool_size(engine)),
                fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "shard_dir": str(folder),
                                       "settings": settings, "dtype": dtype_name, "threads": engine.threads,
                                       "make_shard": make_shard},
                # a dead actor is always restarted; its task retried max_retries times, not forever
                ray_remote_args_fn=functools.partial(dict, max_restarts=-1, max_task_retries=engine.max_retries),
                num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker)
            with tqdm(total=len(sources), desc="codebook: ablating images (ray)", unit="image",
                      disable=not progress) as bar:
                for row in dataset.iter_rows():
                    results[str(row["source"])] = row
                    bar.update(1)
        finally:
            context.max_errored_blocks, context.enable_progress_bars, context.print_on_execution_start = saved
    removed = remove_partial_shards(folder)
    if removed:
        logger.info("codebook: removed %d partial shard file(s) of workers that died mid-write", removed)
    failed = {}
    for source in sources:
        row = results.get(source)
        if row is None:
            failed[source] = f"its worker died {engine.max_retries + 1} times"
        elif row["status"] == "failed":
            failed[source] = str(row["error"])
    statuses = [str(r["status"]) for r in results.values()]
    if timings is not None:
        timings.extend(float(r["seconds"]) for r in results.values() if r["status"] == "made")
    return BuildSummary(images=len(sources), made=statuses.count("made"), reused=statuses.count("reused"),
                        failed=failed, wall_s=time.perf_counter() - start, engine="ray")


# ---- the layer ranking --------------------------------------------------------------------------


def model_parts(model: torch.nn.Module) -> tuple[type, Any, dict[str, torch.Tensor]]:
    """What rebuilds `model` in a worker: its class, config and weights. The module itself does not
    serialize once it has run (transformers' output-capture hooks hold context variables)."""
    return type(model), model.config, dict(model.state_dict())


def rebuild_model(parts: tuple[type, Any, dict[str, torch.Tensor]]) -> torch.nn.Module:
    cls, config, state = parts
    dtype = next(iter(state.values())).dtype
    model = cls(config).to(dtype)
    model.load_state_dict(state)
    return model.eval()


class TrialWorker:
    """A ranking actor: its own capture of the decoder; runs one layer's trial over every calibration input."""

    def __init__(self, parts: tuple, example_inputs: Mapping[str, Any], calibration: list,
                 reference: list[torch.Tensor], probe_tokens: int | float, key_bias: bool, metric: str,
                 threads: int, reduce: Callable) -> None:
        torch.set_num_threads(threads)
        from ..capture.pipeline import capture

        model = rebuild_model(parts).to(_actor_device())
        example_inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}
        self.graph_module = capture(model, example_inputs).graph_module
        device = model.device
        self.calibration = [type(x)(**{f.name: getattr(x, f.name) if getattr(x, f.name) is None
                                       else getattr(x, f.name).to(device) for f in dataclasses.fields(x)})
                            for x in calibration]
        self.reference = [r.to(device) for r in reference]
        self.probe_tokens, self.key_bias, self.metric = probe_tokens, key_bias, metric
        self.reduce = reduce

    def divergences(self, job: int, settings: Any, layer: int) -> tuple[int, list[float]]:
        from .budget import ReductionPlan
        from .ranking import trial_divergences

        trial = self.reduce(self.graph_module, ReductionPlan(settings={layer: settings}), self.probe_tokens,
                            copy=True, key_bias=self.key_bias).graph_module
        return job, trial_divergences(trial, self.reference, self.calibration, self.metric)


def sensitivity_scores_ray(engine: RayEngine, model: torch.nn.Module, example_inputs: Mapping[str, Any],
                           reference_graph: Any, calibration: Sequence[Any], layers: Sequence[int],
                           levels: Sequence[Any], probe_tokens: int | float, key_bias: bool,
                           metric: str, reduce: Callable) -> list[dict[int, float]]:
    """ranking.sensitivity_scores at each settings level in `levels`, the trials spread over Ray actors.

    reduce: passes.pipeline.apply_plan (given by the caller: analysis sits below passes), run by
    each actor as apply_plan(graph, plan, probe_tokens, copy=True, key_bias=...)."""
    import ray
    from ray.util import ActorPool

    from .ranking import mean_score, next_token_log_probs

    reference = [next_token_log_probs(reference_graph, x) for x in calibration]
    jobs = [(level, layer) for level in range(len(levels)) for layer in layers]
    found: dict[int, list[float]] = {}
    with ray_session(engine):
        size = min(pool_size(engine), len(jobs))
        worker = ray.remote(max_restarts=-1, max_task_retries=engine.max_retries, **engine.actor_options())(TrialWorker)
        shared = [ray.put(x) for x in (model_parts(model), dict(example_inputs), list(calibration), reference)]
        actors = [worker.remote(*shared, probe_tokens, key_bias, metric, engine.threads, reduce) for _ in range(size)]
        try:
            pool = ActorPool(actors)
            calls = pool.map_unordered(lambda a, j: a.divergences.remote(j, levels[jobs[j][0]], jobs[j][1]),
                                       range(len(jobs)))
            with tqdm(total=len(jobs), desc=f"ranking layers ({metric}, ray)", leave=False, disable=None) as bar:
                for job, values in calls:
                    found[job] = values
                    bar.update(1)
        finally:
            for actor in actors:
                ray.kill(actor)
    scores: list[dict[int, float]] = [{} for _ in levels]
    for job, (level, layer) in enumerate(jobs):
        scores[level][layer] = mean_score(found[job])
    return scores
