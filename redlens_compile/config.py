"""RedLensConfig: every knob of the compiler, validated at construction, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .ops.dynamic_ffn import DEFAULT_PROBE_RULE, PROBE_RULES  # noqa: F401  (the rules live with the op)

RANKING_METRICS = ("jsd", "kl", "activation", "variance", "gradient")
PRUNE_METHODS = ("codebook", "fastv", "vtw", "random", "downsample", "diverse")
# The keeps `plan_keep` chooses among (those <= prune_keep), largest first (analysis/budget.py).
PLAN_KEEPS = (0.5, 0.35, 0.25, 0.18, 0.125, 0.09)
# How the budget planner's ladder moves the two per-layer reductions (analysis/budget.py):
# "together" (one rung tightens ffn_keep and the hollow window at once) or "separate" (each
# reduction its own rungs, ranked and moved alone per layer).
PLAN_AXES = ("together", "separate")
# How the dynamic FFN picks each sample's probe rows (ops/dynamic_ffn.py): "stride" (evenly spaced),
# "norm" (largest rows), "outlier" (farthest from the image's mean row); "+route" also gives the
# probe rows the full FFN's output. Measured on the proof task: benchmarks/probe_rules.py.
# A hollow window this wide is larger than any visual span a model can hold.
UNBOUNDED_WINDOW = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _count_or_fraction(name: str, value: Any) -> None:
    """A field that is either a positive count (int) or a fraction in (0, 1] (float)."""
    if _is_int(value):
        if value < 1:
            raise ConfigError(f"{name}={value!r}: a count must be >= 1 (or give a fraction in (0, 1] as a float)")
        return
    if isinstance(value, float) and math.isfinite(value):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{name}={value!r}: a fraction must lie in (0, 1] (or give a count as an int >= 1)")
        return
    raise ConfigError(f"{name}={value!r}: expected an int count >= 1 or a float fraction in (0, 1]")


@dataclass
class RedLensConfig:
    """What to reduce and how much.

    flops_budget: decoder prefill FLOPs after/before, 0 < b <= 1.
    ffn_keep: fraction of FFN channels kept for visual tokens in reduced layers.
    probe_tokens: M probe rows of the dynamic FFN (int, or fraction of the visual tokens).
    probe_rule: how each sample's probe rows are chosen, one of PROBE_RULES.
    hollow_window: w, the visual-to-visual attention window of reduced layers.
    layers: "auto" (ranking + budget), "all", explicit layer indices ([] reduces none), or explicit
        per-layer settings {index: {"ffn_keep": f, "hollow_window": w}} (w None: hollow attention
        off; a missing key takes the config's own value): what a saved plan holds (plan.json, see
        artifact/saved.py), applied with no ranking and no planning. JSON keys are strings; they
        are read back as ints.
    ranking: the layer-ranking metric, one of RANKING_METRICS.
    prune: None or one of PRUNE_METHODS (token pruning before/within the decoder).
    prune_keep: visual tokens kept by pruning (int count or float fraction). For `downsample` the
        fraction picks the pool side round(keep ** -0.5): 0.25 -> 2x2 pools, 0.125 or 0.111 -> 3x3.
    prune_layer: K, the layer after which `fastv` and `vtw` prune.
    codebook: path of a redundancy codebook (safetensors), required by prune="codebook".
    prune_seed: the seed of prune="random" (the same input keeps the same rows).
    prune_proportional: pruning before the first layer gives each kept visual token the attention
        mass of the dropped tokens most like it (a log-count bias on its attention scores).
    plan_keep: the planner chooses prune_keep too: among PLAN_KEEPS no larger than prune_keep (a
        float: the most it may keep), the keep and the per-layer settings with the least total
        estimated damage under flops_budget (analysis/budget.py plan_keep_and_layers). Needs a
        pruning method before the first layer, layers="auto", flops_budget < 1 and ranking
        "jsd" or "kl" (a keep's damage is the same divergence as a layer's score).
    plan_axes: how layers="auto" moves the two reductions, one of PLAN_AXES. "together": each
        rung of a layer's ladder sets ffn_keep and the window at once, ranked at the config's
        settings and at the floors. "separate": the dynamic FFN and hollow attention are two axes
        with their own rungs (the same values), each ranked alone per layer (at its base and its
        floor) and moved alone, so a layer can take FFN floors without the window it cannot bear.
    """

    flops_budget: float = 0.5
    ffn_keep: float = 0.5
    probe_tokens: int | float = 0.1
    probe_rule: str = DEFAULT_PROBE_RULE
    hollow_window: int = 64
    layers: str | list[int] | dict[int, dict[str, Any]] = "auto"
    ranking: str = "jsd"
    prune: str | None = None
    prune_keep: int | float = 0.25
    prune_layer: int = 2
    codebook: str | None = None
    prune_seed: int = 0
    prune_proportional: bool = True
    plan_keep: bool = False
    plan_axes: str = "together"

    def __post_init__(self) -> None:
        if not _is_number(self.flops_budget) or not 0.0 < self.flops_budget <= 1.0:
            raise ConfigError(f"flops_budget={self.flops_budget!r}: must be a number with 0 < flops_budget <= 1")
        if not _is_number(self.ffn_keep) or not 0.0 < self.ffn_keep <= 1.0:
            raise ConfigError(f"ffn_keep={self.ffn_keep!r}: must be a fraction with 0 < ffn_keep <= 1")
        _count_or_fraction("probe_tokens", self.probe_tokens)
        if self.probe_rule not in PROBE_RULES:
            raise ConfigError(f"probe_rule={self.probe_rule!r}: must be one of {', '.join(PROBE_RULES)} "
                              "(how the dynamic FFN picks each sample's probe rows)")
        if not _is_int(self.hollow_window) or self.hollow_window < 1:
            raise ConfigError(f"hollow_window={self.hollow_window!r}: must be an int >= 1")
        self._validate_layers()
        if self.ranking not in RANKING_METRICS:
            raise ConfigError(f"ranking={self.ranking!r}: must be one of {', '.join(RANKING_METRICS)}")
        if self.prune is not None and self.prune not in PRUNE_METHODS:
            raise ConfigError(f"prune={self.prune!r}: must be None or one of {', '.join(PRUNE_METHODS)}")
        _count_or_fraction("prune_keep", self.prune_keep)
        if not _is_int(self.prune_layer) or self.prune_layer < 0:
            raise ConfigError(f"prune_layer={self.prune_layer!r}: must be an int >= 0")
        if not isinstance(self.prune_proportional, bool):
            raise ConfigError(f"prune_proportional={self.prune_proportional!r}: must be true or false")
        if not _is_int(self.prune_seed):
            raise ConfigError(f"prune_seed={self.prune_seed!r}: must be an int")
        if self.codebook is not None and not isinstance(self.codebook, (str, Path)):
            raise ConfigError(f"codebook={self.codebook!r}: must be a path (str) or None")
        if self.codebook is not None:
            self.codebook = str(self.codebook)
        if self.prune == "downsample" and not (isinstance(self.prune_keep, float) and self.prune_keep <= 0.3):
            raise ConfigError(f"prune='downsample' with prune_keep={self.prune_keep!r}: the kept fraction picks the pool "
                              "(0.25: 2x2, 0.125 or 0.111: 3x3); give a float <= 0.3")
        if self.prune == "codebook" and self.codebook is None:
            raise ConfigError("prune='codebook' needs codebook=PATH (a redundancy codebook .safetensors)")
        self._validate_plan_keep()
        if self.plan_axes not in PLAN_AXES:
            raise ConfigError(f"plan_axes={self.plan_axes!r}: must be one of {', '.join(PLAN_AXES)} (whether the "
                              "planner moves ffn_keep and the hollow window together or as separate axes)")

    def _validate_plan_keep(self) -> None:
        if not isinstance(self.plan_keep, bool):
            raise ConfigError(f"plan_keep={self.plan_keep!r}: must be true or false")
        if not self.plan_keep:
            return
        if self.prune not in ("codebook", "random", "downsample", "diverse"):
            raise ConfigError(f"plan_keep=True with prune={self.prune!r}: the planner chooses the keep of a pruning "
                              "method before the first layer; set prune to codebook, random, downsample or diverse")
        if not isinstance(self.prune_keep, float) or self.prune_keep < min(PLAN_KEEPS):
            raise ConfigError(f"plan_keep=True with prune_keep={self.prune_keep!r}: prune_keep is the most the planner "
                              f"may keep, a fraction >= {min(PLAN_KEEPS)} (candidates {list(PLAN_KEEPS)})")
        if self.layers != "auto" or self.flops_budget >= 1.0:
            raise ConfigError(f"plan_keep=True with layers={self.layers!r}, flops_budget={self.flops_budget}: the keep "
                              "is planned against the budget; use layers='auto' and flops_budget < 1")
        if self.ranking not in ("jsd", "kl"):
            raise ConfigError(f"plan_keep=True with ranking={self.ranking!r}: a keep's damage and a layer's score must "
                              "be the same divergence; use ranking='jsd' or 'kl'")

    def _validate_layers(self) -> None:
        if isinstance(self.layers, str):
            if self.layers not in ("auto", "all"):
                raise ConfigError(f"layers={self.layers!r}: must be 'auto', 'all', a list of layer indices or "
                                  "per-layer settings {index: {ffn_keep, hollow_window}}")
            return
        if isinstance(self.layers, dict):
            self.layers = self._validated_layer_settings(self.layers)
            return
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if not isinstance(self.layers, list) or not all(_is_int(i) and i >= 0 for i in self.layers):
            raise ConfigError(f"layers={self.layers!r}: a list of layer indices must hold ints >= 0")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers={self.layers!r}: layer indices must be unique")

    def _validated_layer_settings(self, layers: dict) -> dict[int, dict[str, Any]]:
        """{index: {"ffn_keep", "hollow_window"}} with int keys (JSON gives strings) and both fields filled."""
        settings: dict[int, dict[str, Any]] = {}
        for key, value in layers.items():
            index = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if not _is_int(index) or index < 0:
                raise ConfigError(f"layers: key {key!r} is not a layer index; per-layer settings are keyed by "
                                  "ints >= 0 (strings of digits in JSON)")
            if index in settings:
                raise ConfigError(f"layers: layer {index} is given twice")
            if not isinstance(value, dict):
                raise ConfigError(f"layers[{index}]={value!r}: must be an object with ffn_keep and/or hollow_window")
            unknown = sorted(set(value) - {"ffn_keep", "hollow_window"})
            if unknown:
                raise ConfigError(f"layers[{index}]: unknown field(s) {unknown}; a layer's settings are ffn_keep and "
                                  "hollow_window")
            keep = value.get("ffn_keep", self.ffn_keep)
            if not _is_number(keep) or not 0.0 < keep <= 1.0:
                raise ConfigError(f"layers[{index}].ffn_keep={keep!r}: must be a fraction with 0 < ffn_keep <= 1")
            window = value.get("hollow_window", self.hollow_window)
            if window is not None and (not _is_int(window) or window < 1):
                raise ConfigError(f"layers[{index}].hollow_window={window!r}: must be an int >= 1, or null for no "
                                  "hollow attention in that layer")
            if window is not None and window >= UNBOUNDED_WINDOW:
                window = None  # wider than any visual span: the same as off
            settings[index] = {"ffn_keep": float(keep), "hollow_window": window}
        return dict(sorted(settings.items()))

    @classmethod
    def identity(cls) -> "RedLensConfig":
        """Every pass runs on every layer, and every reduction is set so that no number changes."""
        return cls(
            flops_budget=1.0,
            ffn_keep=1.0,
            probe_tokens=1.0,
            hollow_window=UNBOUNDED_WINDOW,
            layers="all",
            prune=None,
            prune_keep=1.0,
        )

    @property
    def is_identity(self) -> bool:
        return self.ffn_keep == 1.0 and self.hollow_window == UNBOUNDED_WINDOW and self.prune is None

    @classmethod
    def preset(cls, name: str) -> "RedLensConfig":
        """A named config (benchmarks and the CLI take these names): presets.preset."""
        from .presets import preset

        return preset(name)

    @classmethod
    def parse(cls, spec: str) -> "RedLensConfig":
        """A preset name, JSON text, or the path of a JSON file: presets.parse."""
        from .presets import parse

        return parse(spec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RedLensConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RedLensConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
