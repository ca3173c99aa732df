"""Writing files whole or not at all: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
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


# The list of what a command wrote into its output folder: a later run of the same command
# replaces exactly these, and a folder holding anything else is refused before any work.
OUTPUTS_MANIFEST = "redlens-outputs.json"
_WRITER = "redlens-compile"


def _listing(folder: Path) -> list[str]:
    """Every file and folder under `folder`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def written_by(folder: Path) -> dict | None:
    """The outputs manifest of `folder` (command, files), or None where redlens-compile wrote none."""
    try:
        manifest = json.loads((folder / OUTPUTS_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != _WRITER:
        return None
    return manifest


def _foreign(folder: Path, command: str) -> str | None:
    """Why `folder` (an existing directory) cannot take `command`'s outputs, or None when it can:
    it is empty, or holds only what an earlier run of the same command wrote."""
    names = _listing(folder)
    if not names:
        return None
    manifest = written_by(folder)
    if manifest is None:
        return f"already holds files redlens-compile did not write ({', '.join(names[:5])})"
    if manifest.get("command") != command:
        return (f"already holds files of `redlens-compile {manifest.get('command')}` (its {OUTPUTS_MANIFEST}), "
                f"not of `{command}`")
    others = sorted(set(names) - set(manifest.get("files", ())) - {OUTPUTS_MANIFEST})
    if others:
        return f"already holds files the earlier `{command}` run did not write ({', '.join(others[:5])})"
    return None


def check_output_folder(target: Path, command: str, flag: str = "--out", error: type = OSError) -> Path:
    """Before any work: `target` is new, empty or an earlier output of `command` (replaced whole),
    and a folder can be made beside it (tried, not guessed from permission bits: root passes
    os.access everywhere, /proc and /sys included). Raises `error` naming `target`."""
    target = Path(target)
    name = f"{flag} {target}" if flag else str(target)
    if target.exists() and not target.is_dir():
        raise error(f"{name}: a file, not a folder; choose a folder for the outputs")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise error(f"{name}: {existing} is a file, so the folder cannot be made")
    if target.is_dir():
        why = _foreign(target, command)
        if why is not None:
            raise error(f"{name} {why}: the outputs would mix with them; choose a new folder or empty it")
    _probe_writable(existing, name, error)
    return target


def check_output_file(target: Path, flag: str = "--out", error: type = OSError) -> Path:
    """Before any work: the file `target` does not exist yet, its folder does and takes a new file
    (tried, as check_output_folder does). The file itself is written with atomic_write."""
    target = Path(target)
    if target.exists():
        raise error(f"{target} already exists: choose another {flag + ' ' if flag else ''}path or remove the file")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"{target}: the folder {parent} does not exist")
    _probe_writable(parent, str(target), error, what=f"the folder {parent}")
    return target


def _probe_writable(folder: Path, name: str, error: type, what: str | None = None) -> None:
    """A folder can be made in `folder`: tried, not guessed from permission bits (root passes
    os.access everywhere, /proc and /sys included)."""
    try:
        Path(tempfile.mkdtemp(prefix=".redlens-probe-", dir=folder)).rmdir()
    except OSError as exc:
        raise error(f"{name}: {what or folder} is not writable ({exc.strerror or exc})") from None


@contextlib.contextmanager
def staged_folder(target: Path, command: str | None = None, error: type = OSError) -> Iterator[Path]:
    """A scratch folder beside `target`, renamed to `target` when the block succeeds and deleted
    when it fails: a folder whole or not at all.

    With `command`, the folder gets an outputs manifest (OUTPUTS_MANIFEST) listing what it holds,
    and an existing `target` is replaced only when it is empty or an earlier output of the same
    command (check_output_folder, checked again here so nothing else is ever deleted). Without
    it an existing `target` is replaced whatever it holds (the caller owns it)."""
    target = Path(target).resolve()  # a symlinked folder: the folder it names is replaced, beside itself
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if command is not None:
            manifest = {"written_by": _WRITER, "command": command, "files": _listing(staging)}
            (staging / OUTPUTS_MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir gives
        if target.exists():
            if command is not None:
                check_output_folder(target, command, flag="", error=error)
            # the earlier folder aside, the new one in, then the earlier one deleted: never a mix
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], key: str, metadata: dict[str, Any]) -> Path:
    """Tensors (as contiguous float32) and JSON metadata under one header key, written atomically."""
    import torch
    from safetensors.torch import save_file

    data = {name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata={key: json.dumps(metadata, sort_keys=True)}))
    return path


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None: the 8-byte header length, the JSON header
    and the data size it declares against the file's size (no tensor is read, torch not needed)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            length = int.from_bytes(head, "little")
            if 8 + length > size:
                return f"its header declares {length} bytes of JSON but the file holds {size} bytes (truncated)"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"not readable ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not JSON (not a safetensors file, or corrupt)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (not a safetensors file, or corrupt)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        return "its header has a tensor entry without data_offsets (corrupt)"
    if 8 + length + end != size:
        return (f"its header declares {end} bytes of tensor data but the file holds {size - 8 - length} "
                f"({'truncated' if 8 + length + end > size else 'trailing bytes'})")
    return None
