"""Named configs and the config strings the CLI and the benchmarks take.

`preset(name)` is a RedLensConfig by name (identity, budget-0.5, codebook-0.125, ...);
`parse(spec)` reads a preset name, JSON text or the path of a JSON file. RedLensConfig.preset
and RedLensConfig.parse delegate here, so the config module holds the config alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import UNBOUNDED_WINDOW, RedLensConfig
from .errors import ConfigError
from .models import PROOF_CODEBOOK

# FastV and VTW presets prune after this layer (of the proof model's 4).
PRESET_PRUNE_LAYER = 1


def _presets() -> dict[str, Callable[[], RedLensConfig]]:
    cls = RedLensConfig
    presets: dict[str, Callable[[], RedLensConfig]] = {
        "identity": cls.identity,
        # The FFN keep and the hollow window as separate axes of the planner's ladder: on the proof
        # model the FFN tolerates its floor where a window does not (budget-0.5: 99.7 against 98.3
        # with the two moved together, 300 held-out questions, quality_plan_axes_300.txt).
        "budget-0.75": lambda: cls(flops_budget=0.75, plan_axes="separate"),
        "budget-0.5": lambda: cls(flops_budget=0.5, plan_axes="separate"),
        # One pass alone on every layer, at the default settings.
        "ffn-only": lambda: cls(flops_budget=1.0, layers="all", hollow_window=UNBOUNDED_WINDOW),
        "hollow-only": lambda: cls(flops_budget=1.0, layers="all", ffn_keep=1.0),
    }
    # Token pruning alone (no per-layer reduction); the codebook ones use the proof model's codebook.
    for keep in (0.25, 0.125):
        for method in ("codebook", "fastv", "random"):
            presets[f"{method}-{keep}"] = (
                lambda method=method, keep=keep: cls(flops_budget=1.0, prune=method, prune_keep=keep,
                                                     prune_layer=PRESET_PRUNE_LAYER,
                                                     codebook=str(PROOF_CODEBOOK) if method == "codebook" else None))
        # the baselines users compare against: pooling (its pooled tokens carry no key bias) and DivPrune
        presets[f"downsample-{keep}"] = (
            lambda keep=keep: cls(flops_budget=1.0, prune="downsample", prune_keep=keep, prune_proportional=False))
        presets[f"diverse-{keep}"] = lambda keep=keep: cls(flops_budget=1.0, prune="diverse", prune_keep=keep)
        for method in ("codebook", "random", "diverse"):  # without proportional attention
            presets[f"{method}-{keep}-plain"] = (
                lambda method=method, keep=keep: cls.from_dict(dict(presets[f"{method}-{keep}"]().to_dict(),
                                                                    prune_proportional=False)))
    for layer in (1, 2):
        presets[f"vtw-{layer}"] = lambda layer=layer: cls(flops_budget=1.0, prune="vtw", prune_layer=layer)
    # Decoder FLOPs <= 0.15 on the proof model by pruning alone (0.143; 97.3% on 300 held-out
    # questions against the original's 99.7%, benchmarks/results/quality_target_300.txt).
    presets["codebook-0.09"] = lambda: cls(flops_budget=1.0, prune="codebook", prune_keep=0.09,
                                           codebook=str(PROOF_CODEBOOK))
    # Pruning, then the budget planner on the pruned sequence.
    presets["codebook-0.25+budget-0.2"] = lambda: cls(flops_budget=0.2, prune="codebook", prune_keep=0.25,
                                                      codebook=str(PROOF_CODEBOOK))
    # Decoder FLOPs <= 0.15 with pruning and the per-layer reductions together (1000 held-out questions,
    # benchmarks/results/quality_combined_0.15.txt: 97.5 and 98.6 at 0.149, original 99.4).
    presets["codebook-0.125+budget-0.15"] = lambda: cls(flops_budget=0.15, prune="codebook", prune_keep=0.125,
                                                        codebook=str(PROOF_CODEBOOK))
    presets["diverse-0.125+budget-0.15"] = lambda: cls(flops_budget=0.15, prune="diverse", prune_keep=0.125)
    # The planner chooses the codebook's keep (at most 0.5) and the per-layer settings against 0.15 together.
    presets["codebook-auto+budget-0.15"] = lambda: cls(flops_budget=0.15, prune="codebook", prune_keep=0.5,
                                                       plan_keep=True, codebook=str(PROOF_CODEBOOK))
    return presets


def preset_names() -> list[str]:
    return sorted(_presets())


def preset(name: str) -> RedLensConfig:
    """A named config (benchmarks and the CLI take these names)."""
    presets = _presets()
    if name not in presets:
        raise ConfigError(f"unknown config preset {name!r}; presets: {', '.join(sorted(presets))}")
    return presets[name]()


def parse(spec: str) -> RedLensConfig:
    """A preset name, JSON text, or the path of a JSON file."""
    spec = spec.strip()
    if spec.startswith("{"):
        return RedLensConfig.from_json(spec)
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {spec}: no such file")
        return RedLensConfig.from_json(path.read_text())
    return preset(spec)
