"""What report.md and flops.png show of the report's data: numbers rounded for reading, the
config as its changes from identity, the planner's steps per layer. report.json keeps the data
at full precision; these only format it."""

from __future__ import annotations

from typing import Any, Mapping

from ..config import UNBOUNDED_WINDOW, RedLensConfig

# Significant digits of every number a reader sees (report.json keeps full precision).
DIGITS = 3


def fmt(value: Any) -> str:
    """A number for reading: 3 significant digits; None is 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and abs(value) < 10**DIGITS:
        return str(value)
    rounded = float(f"{value:.{DIGITS}g}")
    if 10**DIGITS <= abs(rounded) < 1e6:  # 1450 rather than 1.45e+03
        return f"{rounded:.0f}"
    return f"{value:.{DIGITS}g}"


def percent(fraction: float) -> str:
    return f"{fmt(100 * fraction)}%"


def layer_settings_text(settings: Mapping[str, Any] | None, sep: str = ", ") -> str:
    """'ffn_keep 0.119, window 15' for a reduced layer's settings; 'unreduced' for none."""
    if not settings:
        return "unreduced"
    parts = []
    if settings.get("ffn_keep") is not None and settings["ffn_keep"] < 1.0:
        parts.append(f"ffn_keep {fmt(settings['ffn_keep'])}")
    if settings.get("window") is not None:
        parts.append(f"window {settings['window']}")
    return sep.join(parts) if parts else "unreduced"


def _relevant(config: Mapping[str, Any]) -> set[str]:
    """The fields that act under this config: the pruning knobs only with the method that reads them."""
    fields = set(config) - {"prune_keep", "prune_layer", "codebook", "prune_seed", "prune_proportional"}
    if config.get("layers") == [] or (config.get("layers") == "auto" and config.get("flops_budget", 1.0) >= 1.0):
        # no layer is reduced: the per-layer settings do not act
        fields -= {"ffn_keep", "hollow_window", "probe_tokens", "probe_rule", "ranking"}
    method = config.get("prune")
    if method is None:
        return fields
    if method != "vtw":
        fields.add("prune_keep")  # vtw drops every visual token
    if method in ("fastv", "vtw"):
        fields.add("prune_layer")
    else:  # before the first layer
        fields.add("prune_proportional")
    if method == "codebook":
        fields.add("codebook")
    if method == "random":
        fields.add("prune_seed")
    return fields


def config_changes(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's fields that differ from RedLensConfig.identity() and act under it."""
    identity = RedLensConfig.identity().to_dict()
    relevant = _relevant(config)
    return {k: v for k, v in config.items() if k in relevant and v != identity.get(k)}


def config_text(config: Mapping[str, Any]) -> str:
    changes = config_changes(config)
    if not changes:
        return "RedLensConfig.identity() (no field changed)"

    def value(key: str, v: Any) -> str:
        if key == "hollow_window" and v == UNBOUNDED_WINDOW:
            return "unbounded"
        return fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    return ", ".join(f"{k} {value(k, v)}" for k, v in sorted(changes.items())) + " (the other fields as identity)"


def planner_steps_by_layer(plan: Mapping[str, Any]) -> list[str]:
    """One line per layer the planner touched, in the order it first touched them:
    'layer 3: unreduced -> ffn_keep 0.0625, window 8, via 11 steps (11 tighter)'."""
    moves = plan.get("moves")
    if not moves:  # a plan without search (layers given) or a report of schema 1: its steps as they are
        return list(plan.get("steps") or [])
    per_layer: dict[int, list[Mapping[str, Any]]] = {}
    lines = []
    for move in moves:
        if move["action"] == "prune":  # plan_keep: the keep the planner chose, before any layer
            lines.append(f"token pruning: keep {fmt(move['keep'])} chosen by the planner among "
                         f"{[c['keep'] for c in plan.get('keep_candidates') or []]} (damage {fmt(move['damage'])}); "
                         f"ratio with pruning alone {fmt(move['ratio'])}")
            continue
        per_layer.setdefault(int(move["layer"]), []).append(move)
    for layer, steps in per_layer.items():
        counts = {action: sum(1 for m in steps if m["action"] == action)
                  for action in ("reduce", "tighten", "relax", "take off")}
        detail = ", ".join(f"{n} {word}" for word, n in (("tighter", counts["reduce"] + counts["tighten"]),
                                                         ("relaxed", counts["relax"]),
                                                         ("taken off: saved no FLOPs", counts["take off"])) if n)
        final = steps[-1]["to"]
        lines.append(f"layer {layer}: unreduced -> {layer_settings_text(final)}, via {len(steps)} "
                     f"step{'s' if len(steps) != 1 else ''} ({detail}); ratio after its last step "
                     f"{fmt(steps[-1]['ratio'])}")
    return lines
