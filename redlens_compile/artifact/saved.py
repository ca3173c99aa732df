"""Optimize once, deploy many times: an OptimizedModel saved as a folder and loaded without recalibrating.

`optimize` ranks the layers on the calibration inputs and plans to the budget (hundreds of
decoder forwards on a 30-layer model); what it decides is a handful of numbers per layer. The
folder keeps those numbers as an explicit RedLensConfig, so loading captures the decoder and
applies them through `optimize`'s own path with no ranking and no planning:

    plan.json             the RedLensConfig that reproduces the model: `layers` as per-layer
                          settings {index: {ffn_keep, hollow_window}}, the pruning fields, and
                          `codebook` relative to the folder
    redlens_config.json   the config `optimize` was given (layers "auto", the budget, ...)
    report.json           the audit report of the saved object
    example.safetensors   the example inputs the decoder is captured and checked on (the
                          processor's tensors, dtypes kept), so loading needs no user data
    codebook.safetensors  the pruning codebook, copied in (prune="codebook" only)
    manifest.json         format, library versions, the files, and the model's fingerprint

JSON and safetensors only, written into a scratch folder that is renamed into place whole.
Loading checks the folder (plan.json through RedLensConfig's validation) and the model's
fingerprint before any capture, so a different model or a hand-edited value fails in
milliseconds with an error naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..config import RedLensConfig
from ..errors import ConfigError, SavedModelError
from ..fingerprint import fingerprint_differences, model_fingerprint

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch loads inside the functions that need it: reading and checking a folder (the CLI's --from)
# stays well under a second.

logger = logging.getLogger(__name__)

FORMAT = "redlens-optimized/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
ORIGINAL_CONFIG = "redlens_config.json"
REPORT = "report.json"
EXAMPLE = "example.safetensors"
CODEBOOK = "codebook.safetensors"
EXAMPLE_KEY = "redlens_example"


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def check_library_versions(saved: Mapping[str, str], current: Mapping[str, str]) -> None:
    """transformers' modeling code decides the graph a plan's layers and channels were measured on:
    another major.minor release is an error; any other difference is logged."""
    if _major_minor(saved.get("transformers", "?")) != _major_minor(current["transformers"]):
        raise SavedModelError(
            f"transformers version: saved with {saved.get('transformers')}, this process has "
            f"{current['transformers']}; the family's modeling code (and so the graph the plan was measured on) can "
            "change between releases: re-run optimize and save again, or pass check_versions=False to load anyway")
    for name in ("transformers", "torch", "redlens_compile"):
        if saved.get(name) != current.get(name):
            logger.warning("%s version: saved with %s, this process has %s", name, saved.get(name), current.get(name))


# ---- writing ------------------------------------------------------------------------------------

def plan_config(opt) -> RedLensConfig:
    """The explicit config that reproduces `opt`: its report's per-layer settings as `layers`."""
    settings = opt.report.plan.get("settings", {})
    layers = {int(i): {"ffn_keep": s["ffn_keep"], "hollow_window": s["window"]} for i, s in settings.items()}
    data = dict(opt.config.to_dict(), layers=layers)
    if data.get("plan_keep"):  # the keep the planner chose, as an explicit one
        data.update(prune_keep=opt.report.plan["prune_keep"], plan_keep=False)
    if opt.config.prune == "codebook":
        data["codebook"] = CODEBOOK  # relative to the folder: the copy saved beside plan.json
    return RedLensConfig.from_dict(data)


def _check_target(path: Path) -> None:
    """A new or empty folder, or an earlier save (replaced whole): never someone else's folder."""
    if path.exists() and not path.is_dir():
        raise SavedModelError(f"{path}: a file, not a folder; save_pretrained writes a folder")
    if path.is_dir() and any(path.iterdir()):
        try:
            ours = json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
        except (OSError, json.JSONDecodeError, AttributeError):
            ours = False
        if not ours:
            raise SavedModelError(f"{path} exists and is not a saved optimized model: choose a new or empty folder")


def _save_example(path: Path, example: Mapping[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    from ..files import atomic_write

    tensors, other = {}, {}
    for name, value in example.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous().clone()
        else:
            try:
                other[name] = json.loads(json.dumps(value))
            except TypeError as exc:
                raise SavedModelError(f"example input {name!r} is a {type(value).__name__}: save_pretrained stores "
                                      "tensors (safetensors) and JSON values only") from exc
    metadata = {EXAMPLE_KEY: json.dumps({"order": list(example), "other": other})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _write_json(path: Path, data: Any) -> None:
    from ..files import atomic_write

    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_optimized(opt, directory: str | os.PathLike) -> Path:
    """Write `opt` as a loadable folder (see the module docstring); returns the folder."""
    from ..files import staged_folder
    from ..report.audit_report import library_versions

    target = Path(directory)
    _check_target(target)
    if opt.example_inputs is None:
        raise SavedModelError("this OptimizedModel holds no example inputs (optimize sets them): set "
                              "opt.example_inputs to the processor's output for one prompt before save_pretrained")
    plan = plan_config(opt)
    original = getattr(opt, "original_config", None) or opt.config
    manifest = {"format": FORMAT, "versions": library_versions(), "fingerprint": model_fingerprint(opt.model),
                "files": [PLAN, ORIGINAL_CONFIG, REPORT, EXAMPLE]}
    with staged_folder(target) as staging:
        if opt.config.prune == "codebook":
            shutil.copyfile(opt.config.codebook, staging / CODEBOOK)
            manifest["files"].append(CODEBOOK)
            manifest["codebook"] = {"copied_from": str(opt.config.codebook),
                                    "sha256": _file_sha256(staging / CODEBOOK)}
        _write_json(staging / PLAN, plan.to_dict())
        _write_json(staging / ORIGINAL_CONFIG, original.to_dict())
        _write_json(staging / REPORT, opt.report.to_dict())
        _save_example(staging / EXAMPLE, opt.example_inputs)
        _write_json(staging / MANIFEST, manifest)  # last: a folder with a manifest is whole
    logger.info("saved the optimized model to %s (layers %s)", target, sorted(plan.layers))
    return target


# ---- reading ------------------------------------------------------------------------------------

@dataclass
class SavedOptimized:
    """A saved folder, read and validated; nothing here needs the model."""

    directory: Path
    manifest: dict[str, Any]
    config: RedLensConfig  # plan.json, its codebook resolved to the folder's copy
    original_config: RedLensConfig
    _example: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def example(self) -> dict[str, Any]:
        """The saved example inputs (read on first use: the file's tensors need torch)."""
        if self._example is None:
            self._example = _load_example(self.directory / EXAMPLE)
        return self._example


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise SavedModelError(f"{path}: missing; the folder is not a whole save_pretrained output (save again)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SavedModelError(f"{path}: not readable JSON ({exc}); save the optimized model again") from exc


def _read_config(path: Path, directory: Path) -> RedLensConfig:
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("codebook"), str) and not Path(data["codebook"]).is_absolute():
        data = dict(data, codebook=str(directory / data["codebook"]))
    try:
        return RedLensConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _load_example(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.is_file():
        raise SavedModelError(f"{path}: missing; the folder is not a whole save_pretrained output (save again)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[EXAMPLE_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:
        raise SavedModelError(f"{path}: not a readable example file ({exc}); save the optimized model again") from exc
    values = dict(tensors, **meta["other"])
    return {name: values[name] for name in meta["order"]}


def read_saved(directory: str | os.PathLike) -> SavedOptimized:
    """Read and validate a saved folder (format, plan.json, the codebook copy, the example)."""
    path = Path(directory)
    if path.is_file() and path.name == PLAN:
        path = path.parent  # the folder's plan.json names the folder
    if not path.is_dir():
        raise SavedModelError(f"{directory}: no such folder; pass a folder written by save_pretrained")
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise SavedModelError(f"{path / MANIFEST}: format {found!r}, expected {FORMAT!r}; not a saved optimized "
                              "model of this version of redlens-compile")
    config = _read_config(path / PLAN, path)
    if not isinstance(config.layers, dict):
        raise ConfigError(f"{path / PLAN}: layers={config.layers!r}; a saved plan gives per-layer settings "
                          "{index: {ffn_keep, hollow_window}} (auto would rank and plan again)")
    if config.prune == "codebook" and not Path(config.codebook).is_file():
        raise SavedModelError(f"{path}: plan.json prunes with codebook {config.codebook}, which is missing")
    original = _read_config(path / ORIGINAL_CONFIG, path)
    if not (path / EXAMPLE).is_file():
        raise SavedModelError(f"{path / EXAMPLE}: missing; the folder is not a whole save_pretrained output (save again)")
    return SavedOptimized(path, manifest, config, original)


def _to_model_device(example: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    import torch

    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}


def check_saved(directory: str | os.PathLike, model: nn.Module, example_inputs: Mapping[str, Any] | None = None,
                check_versions: bool = True) -> tuple[SavedOptimized, dict[str, Any]]:
    """The saved folder read and checked against `model` (fingerprint, library versions) before any
    capture, and the example to capture on (`example_inputs`, default the folder's own). api.load
    then re-optimizes with the saved plan (the artifact does not import api: it sits below it)."""
    from ..report.audit_report import library_versions

    saved = read_saved(directory)
    differences = fingerprint_differences(saved.manifest["fingerprint"], model_fingerprint(model))
    if differences:
        raise SavedModelError(f"{saved.directory} was saved for another model: " + "; ".join(differences)
                              + ". Load it with the model it was optimized from, or optimize this model")
    if check_versions:
        check_library_versions(saved.manifest.get("versions", {}), library_versions())
    example = dict(example_inputs) if example_inputs is not None else _to_model_device(saved.example, model)
    return saved, example


def mark_loaded(opt, saved: SavedOptimized):
    """`opt` (optimized with the saved plan) marked as loaded from `saved`: its original config and a report note."""
    opt.original_config = saved.original_config
    opt.loaded_from = saved.directory
    opt.report.notes.append(f"plan loaded from {saved.directory} (made by optimize with "
                            f"{json.dumps(saved.original_config.to_dict(), sort_keys=True)})")
    return opt
