"""Writing files whole or not at all: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's is 0600)."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A scratch folder beside `target`, renamed to `target` when the block succeeds (an existing
    `target` is replaced) and deleted when it fails: a folder whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir gives
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], key: str, metadata: dict[str, Any]) -> Path:
    """Tensors (as contiguous float32) and JSON metadata under one header key, written atomically."""
    from safetensors.torch import save_file

    data = {name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata={key: json.dumps(metadata, sort_keys=True)}))
    return path
