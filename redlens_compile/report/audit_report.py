"""AuditReport: before/after FLOPs per decoder layer, components, passes; saved as JSON/MD/PNG."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.flops import FLOP_CONVENTION, GROUPS, groups_total
from ..files import atomic_write

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def library_versions() -> dict[str, str]:
    import torch
    import transformers
    from importlib.metadata import PackageNotFoundError, version

    def dist_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return {
        "redlens_compile": dist_version("redlens-compile"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fvcore": dist_version("fvcore"),
        "python": platform.python_version(),
    }


def _whole_flops(value: Any, key: str = "") -> Any:
    """FLOPs as integers in the JSON (a visual/text split leaves float noise such as 12264447.99999999);
    ratios and shares stay floats."""
    if key == "settings":  # a reduced layer's ffn_keep / window, not FLOPs
        return value
    if isinstance(value, dict):
        return {k: _whole_flops(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_flops(v, key) for v in value]
    if isinstance(value, float) and "ratio" not in key and "share" not in key:
        return int(round(value))
    return value


@dataclass
class AuditReport:
    """What the decoder costs before and after optimization, and what was done to it."""

    model: dict[str, Any]
    inputs: dict[str, Any]
    layers: list[dict[str, Any]]  # {"layer", "before": {group: {visual, text}}, "after": ..., "reduced"}
    components: dict[str, Any]  # vision_tower, projector, lm_head_before/after, other_before/after
    totals: dict[str, Any]
    config: dict[str, Any] | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    ranking: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    chosen_layers: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pruning: dict[str, Any] | None = None  # method, keep, visual tokens per sample before/after, scoring FLOPs
    versions: dict[str, str] = field(default_factory=library_versions)
    flops_convention: str = FLOP_CONVENTION
    schema_version: int = SCHEMA_VERSION

    @property
    def decoder_flops_before(self) -> float:
        return self.totals["decoder_prefill_before"]

    @property
    def decoder_flops_after(self) -> float:
        return self.totals["decoder_prefill_after"]

    @property
    def flops_ratio(self) -> float:
        return self.totals["decoder_prefill_ratio"]

    @property
    def is_audit(self) -> bool:
        """Nothing was rewritten (rc.audit): one set of numbers, no before/after."""
        return self.config is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "versions": self.versions,
            "flops_convention": self.flops_convention,
            "model": self.model,
            "inputs": self.inputs,
            "config": self.config,
            "totals": _whole_flops(self.totals),
            "components": _whole_flops(self.components),
            "layers": _whole_flops(self.layers),
            "ranking": self.ranking,
            "plan": self.plan,
            "chosen_layers": self.chosen_layers,
            "pruning": self.pruning,
            "passes": self.passes,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditReport":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"report schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}; "
                "re-run the audit with this version of redlens-compile"
            )
        keys = ("model", "inputs", "layers", "components", "totals", "config", "passes", "ranking",
                "plan", "chosen_layers", "pruning", "notes", "versions", "flops_convention")
        return cls(**{k: data[k] for k in keys if k in data})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AuditReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- rendering -------------------------------------------------------------------

    def to_markdown(self) -> str:
        t = self.totals
        lines = [
            f"# redlens-compile audit: {self.model.get('class', '?')} ({self.model.get('family', '?')})",
            "",
            f"{self.flops_convention}",
            "",
            f"- inputs: batch {self.inputs['batch']}, sequence {self.inputs['seq_len']}, "
            f"visual tokens {self.inputs['visual_tokens']}, text tokens {self.inputs['text_tokens']}",
            f"- decoder prefill FLOPs: {t['decoder_prefill_before']:.4g}" if self.is_audit else
            f"- decoder prefill FLOPs: before {t['decoder_prefill_before']:.4g}, after "
            f"{t['decoder_prefill_after']:.4g}, ratio {t['decoder_prefill_ratio']:.4f}",
            f"- cross-check, fvcore on the eager decoder: {t.get('eager_fvcore_decoder', float('nan')):.4g}",
        ]
        comp = self.components
        keys = ("vision_tower", "projector") + (("lm_head_before",) if self.is_audit else ("lm_head_before", "lm_head_after"))
        for key in keys:
            value = comp.get(key)
            name = "lm_head" if self.is_audit and key == "lm_head_before" else key
            lines.append(f"- {name}: {'not counted' if value is None else f'{value:.4g}'}")
        if comp.get("vision_note"):
            lines.append(f"- vision note: {comp['vision_note']}")
        if self.config is not None:
            lines.append(f"- config: `{json.dumps(self.config, sort_keys=True)}`")
        lines.append(f"- reduced layers: {self.chosen_layers if self.chosen_layers else 'none'}")
        if self.pruning:
            p = self.pruning
            lines.append(f"- token pruning: {p['method']} {p['where']}, visual tokens per sample {p['visual_before']} -> "
                         f"{p['visual_after']}, sequence {p['seq_len_before']} -> {p['seq_len_after']}; scoring "
                         f"{p['scoring_flops']:.4g} FLOPs (counted in the decoder prefill after)")
        if self.is_audit:
            lines += ["", "## Decoder layers (FLOPs)", "", "| layer | visual | text | proj | attn core | ffn |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for row in self.layers:
                groups = [groups_total({g: row["before"][g]}) for g in GROUPS]
                lines.append(f"| {row['layer']} | {groups_total(row['before'], 'visual'):.4g} | "
                             f"{groups_total(row['before'], 'text'):.4g} | " + " | ".join(f"{v:.4g}" for v in groups) + " |")
        else:
            lines += self._before_after_tables()
        return self._closing_sections(lines)

    def _before_after_tables(self) -> list[str]:
        lines = ["", "## Decoder layers (FLOPs)", "",
                 "| layer | visual before | text before | visual after | text after | after/before | settings |",
                 "|---:|---:|---:|---:|---:|---:|:---|"]
        for row in self.layers:
            vb, tb = groups_total(row["before"], "visual"), groups_total(row["before"], "text")
            va, ta = groups_total(row["after"], "visual"), groups_total(row["after"], "text")
            ratio = (va + ta) / (vb + tb) if vb + tb else float("nan")
            settings = row.get("settings") or {}
            label = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None) if row.get("reduced") else ""
            lines.append(f"| {row['layer']} | {vb:.4g} | {tb:.4g} | {va:.4g} | {ta:.4g} | {ratio:.3f} | {label} |")
        for phase in ("before", "after"):
            lines += ["", f"## Per group, {phase} (visual / text)", "", "| layer | proj | attn core | ffn |",
                      "|---:|---:|---:|---:|"]
            for row in self.layers:
                cells = [f"{row[phase][g]['visual']:.3g} / {row[phase][g]['text']:.3g}" for g in GROUPS]
                lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
        return lines

    def _closing_sections(self, lines: list[str]) -> str:
        if self.ranking:
            lines += ["", f"## Layer ranking ({self.ranking['metric']}; lower = less critical, reduced first)", "",
                      "| layer | score |", "|---:|---:|"]
            lines += [f"| {i} | {self.ranking['scores'][str(i)]:.4g} |" for i in self.ranking["order"]]
        if self.plan.get("steps"):
            lines += ["", "## Planner steps", ""] + [f"{k + 1}. {step}" for k, step in enumerate(self.plan["steps"])]
        if self.passes:
            lines += ["", "## Passes", "", "| pass | modified | nodes before | nodes after |", "|---|:---:|---:|---:|"]
            for p in self.passes:
                lines.append(f"| {p['name']} | {p['modified']} | {p['nodes_before']} | {p['nodes_after']} |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        v = self.versions
        lines += ["", f"_versions: {', '.join(f'{k} {val}' for k, val in v.items())}_", ""]
        return "\n".join(lines)

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = [row["layer"] for row in self.layers]
        width = 0.4
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(layers) + 3), 4))
        phases = ((0.0, "before", 1.0),) if self.is_audit else ((-width / 2, "before", 1.0), (width / 2, "after", 0.6))
        for offset, phase, alpha in phases:
            xs = [x + offset for x in layers]
            visual = [groups_total(r[phase], "visual") for r in self.layers]
            text = [groups_total(r[phase], "text") for r in self.layers]
            suffix = "" if self.is_audit else f" ({phase})"
            ax.bar(xs, visual, width, label=f"visual{suffix}", color="tab:orange", alpha=alpha)
            ax.bar(xs, text, width, bottom=visual, label=f"text{suffix}", color="tab:blue", alpha=alpha)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("FLOPs (fvcore, multiply-add = 1)")
        ax.set_title(f"{self.model.get('class', '')}: decoder prefill FLOPs per layer")
        ax.set_xticks(layers)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write report.json, report.md and flops.png into `directory`; returns the folder."""
        out = Path(directory)
        payload = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        atomic_write(out / "report.json", lambda p: p.write_text(payload))
        markdown = self.to_markdown()
        atomic_write(out / "report.md", lambda p: p.write_text(markdown))
        atomic_write(out / "flops.png", self._plot)
        logger.info("report written to %s", out)
        return out

    def summary(self) -> str:
        t = self.totals
        if self.is_audit:
            return (f"decoder prefill FLOPs {t['decoder_prefill_before']:.4g}; visual tokens "
                    f"{self.inputs['visual_tokens']} of {self.inputs['seq_len'] * self.inputs['batch']}")
        return (
            f"decoder prefill FLOPs {t['decoder_prefill_before']:.4g} -> {t['decoder_prefill_after']:.4g} "
            f"(ratio {t['decoder_prefill_ratio']:.3f}); visual tokens {self.inputs['visual_tokens']} of "
            f"{self.inputs['seq_len'] * self.inputs['batch']}"
        )
