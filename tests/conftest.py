import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_families import FIRST_FAMILIES, build_and_reload, make_inputs  # noqa: E402

import redlens_compile as rc  # noqa: E402

# Two threads per process; under pytest-xdist (`make test` runs a worker per core) the cores are
# shared out among the workers instead of every worker oversubscribing them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
torch.set_num_threads(max(1, min(2, _CORES // _WORKERS)))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family name -> model built from a tiny config, saved and loaded back (built once)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_and_reload(name, tmp_path_factory.mktemp(name.replace("-", "_")))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def identity_optimized(family_models):
    """family name -> (model, example inputs, OptimizedModel under RedLensConfig.identity())."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = family_models(name)
            example = make_inputs(name, model)
            cache[name] = (model, example, rc.optimize(model, example, config=rc.RedLensConfig.identity()))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def captured_family(family_models):
    """family name -> (model, example inputs, CapturedDecoder) (captured once; passes run on clones)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = family_models(name)
            example = make_inputs(name, model)
            cache[name] = (model, example, rc.capture_decoder(model, example))
        return cache[name]

    return get


ALL_FAMILIES = list(FIRST_FAMILIES)  # the derived-adapter families have their own tests (capture/test_families.py)
