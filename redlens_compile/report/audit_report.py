"""AuditReport: before/after FLOPs per decoder layer, components, passes, what a run measured;
saved as report.json, report.md and the figure flops.png / flops.svg."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.flops import FLOP_CONVENTION, GROUPS, groups_total
from ..errors import ReportError
from ..files import atomic_write
from . import figure
from .reading import config_text, fmt, layer_settings_text, percent, planner_steps_by_layer

logger = logging.getLogger(__name__)

# 2 adds `measurements` (AuditReport.add_measurements) and `plan.moves`; every field of 1 is kept
# as it was, so what reads 1 reads 2 (and load() takes both).
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
# What a run may measure and put into the report (AuditReport.add_measurements).
MEASUREMENT_GROUPS = ("prefill_latency_s", "logits", "generate", "accuracy", "onnx")


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
    """What the decoder costs before and after optimization, what was done to it, and what the run
    that made it measured (add_measurements)."""

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
    # latency, logit differences, generated tokens, accuracy, ONNX check: put in by whoever measured them
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)

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

    def add_measurements(self, **groups: dict[str, Any] | None) -> "AuditReport":
        """Put what a run measured into the report (saved in report.json `measurements`, shown in
        report.md's summary and in the figure). Groups (each a dict; None is skipped; a second call
        adds to a group):
        - prefill_latency_s: {"before", "after" (seconds), "repeats", "how"}; the ratio is added here.
        - logits: {"last_position_max_abs_diff", "all_rows_max_abs_diff" (None where pruning drops rows),
          "greedy_next_token_agreement" (fraction of rows whose last-position argmax is the same)}.
        - generate: {"max_new_tokens", "tokens_equal", "tokens_compared", "tokens_matching", "before", "after"}.
        - accuracy: {"questions", "before", "after"} (fractions, "overall" and per question type).
        - onnx: the ONNX check (provider, last-position logit difference, tokens equal).
        """
        unknown = sorted(set(groups) - set(MEASUREMENT_GROUPS))
        if unknown:
            raise ReportError(f"add_measurements: unknown group(s) {unknown}; the groups are "
                              f"{', '.join(MEASUREMENT_GROUPS)}")
        for name, values in groups.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ReportError(f"add_measurements: {name} must be a dict of values, not {type(values).__name__}")
            group = self.measurements.setdefault(name, {})
            group.update(values)
            if name == "prefill_latency_s" and group.get("before") and group.get("after") is not None:
                group["ratio"] = group["after"] / group["before"]
            if name == "generate" and group.get("tokens_compared"):
                group["token_agreement"] = group["tokens_matching"] / group["tokens_compared"]
        return self

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
            "measurements": self.measurements,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditReport":
        if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise ReportError(
                f"report schema_version {data.get('schema_version')!r} is not one of {READABLE_SCHEMA_VERSIONS}; "
                "re-run the audit with this version of redlens-compile"
            )
        keys = ("model", "inputs", "layers", "components", "totals", "config", "passes", "ranking",
                "plan", "chosen_layers", "pruning", "notes", "versions", "flops_convention", "schema_version",
                "measurements")
        return cls(**{k: data[k] for k in keys if k in data})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AuditReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- rendering -------------------------------------------------------------------

    def summary_lines(self) -> list[str]:
        """The summary block of report.md: what was done, what it saved, what it cost (3 digits)."""
        t, m = self.totals, self.measurements
        lines = []
        if self.is_audit:
            lines.append(f"decoder prefill FLOPs: {fmt(t['decoder_prefill_before'])} (nothing rewritten: an audit)")
        else:
            reduced = [row for row in self.layers if row.get("reduced")]
            lines.append("reduced: " + ("no decoder layer" if not reduced else
                         f"{len(reduced)} of {len(self.layers)} decoder layers: " + "; ".join(
                             f"layer {row['layer']} {layer_settings_text(row.get('settings'))}" for row in reduced)))
            p = self.pruning
            lines.append("pruned: nothing (no token pruning)" if not p else
                         f"pruned: {p['method']} {p['where']}"
                         f"{', keep ' + fmt(p['keep']) + ' (chosen by the planner)' if p.get('keep_planned') else ''}"
                         ": visual tokens per sample "
                         f"{', '.join(map(str, p['visual_before']))} -> {', '.join(map(str, p['visual_after']))} "
                         f"(sequence {p['seq_len_before']} -> {p['seq_len_after']})")
            budget = (self.config or {}).get("flops_budget")
            lines.append(f"decoder prefill FLOPs: {fmt(t['decoder_prefill_before'])} -> "
                         f"{fmt(t['decoder_prefill_after'])}, ratio {fmt(t['decoder_prefill_ratio'])} "
                         f"(flops_budget {fmt(budget)})")
        latency = m.get("prefill_latency_s")
        lines.append("prefill latency: not measured" if not latency else
                     f"prefill latency: {fmt(latency['before'] * 1e3)} ms -> {fmt(latency['after'] * 1e3)} ms, "
                     f"ratio {fmt(latency['ratio'])} ({latency.get('how', 'measured')})")
        logits = m.get("logits")
        if logits:
            rows = logits.get("all_rows_max_abs_diff")
            lines.append(f"logits at the last position (what generate reads): max abs diff "
                         f"{fmt(logits['last_position_max_abs_diff'])}; greedy next token the same in "
                         f"{percent(logits['greedy_next_token_agreement'])} of rows"
                         + (f" (every row, visual rows included: {fmt(rows)}, measurements.logits."
                            "all_rows_max_abs_diff)" if rows is not None else ""))
        gen = m.get("generate")
        if gen:
            lines.append(f"greedy generate: {gen['tokens_matching']} of {gen['tokens_compared']} tokens the same "
                         f"({percent(gen['token_agreement'])}); {gen.get('after', '')!r}"
                         + ("" if gen.get("tokens_equal") else f" against {gen.get('before', '')!r}"))
        acc = m.get("accuracy")
        lines.append("accuracy: not measured" if not acc else
                     f"accuracy: {percent(acc['before']['overall'])} -> {percent(acc['after']['overall'])} on "
                     f"{acc['questions']} held-out questions")
        onnx = m.get("onnx")
        if onnx:
            lines.append(f"onnxruntime ({onnx.get('onnx_provider')}): last-position logits max abs diff "
                         f"{fmt(onnx.get('onnx_max_abs_logit_diff'))} vs torch, "
                         f"{'same tokens' if onnx.get('onnx_generated_tokens_equal') else 'tokens differ'}")
        return lines

    def to_markdown(self) -> str:
        t = self.totals
        lines = [
            f"# redlens-compile audit: {self.model.get('class', '?')} ({self.model.get('family', '?')})",
            "",
            "## Summary",
            "",
            *[f"- {line}" for line in self.summary_lines()],
            "",
            "Numbers here are rounded to 3 significant digits; report.json holds them in full.",
            "",
            "## Details",
            "",
            f"{self.flops_convention}",
            "",
            f"- inputs: batch {self.inputs['batch']}, sequence {self.inputs['seq_len']}, "
            f"visual tokens {self.inputs['visual_tokens']}, text tokens {self.inputs['text_tokens']}",
            f"- decoder prefill FLOPs (the decoder layers, what flops_budget bounds): {fmt(t['decoder_prefill_before'])}"
            if self.is_audit else
            f"- decoder prefill FLOPs (the decoder layers, what flops_budget bounds): before "
            f"{fmt(t['decoder_prefill_before'])}, after {fmt(t['decoder_prefill_after'])}, ratio "
            f"{fmt(t['decoder_prefill_ratio'])}",
            self._cross_check_line(),
        ]
        comp = self.components
        keys = ("vision_tower", "projector") + (("lm_head_before",) if self.is_audit else ("lm_head_before", "lm_head_after"))
        for key in keys:
            value = comp.get(key)
            name = "lm_head" if self.is_audit and key == "lm_head_before" else key
            lines.append(f"- {name}: {'not counted' if value is None else fmt(value)}")
        if comp.get("vision_note"):
            lines.append(f"- vision note: {comp['vision_note']}")
        if self.config is not None:
            lines.append(f"- config: {config_text(self.config)}")
        lines.append(f"- reduced layers: {self.chosen_layers if self.chosen_layers else 'none'}")
        if self.pruning:
            p = self.pruning
            chosen = " (chosen by the planner: plan_keep)" if p.get("keep_planned") else ""
            lines.append(f"- token pruning: {p['method']} {p['where']}, keep {fmt(p['keep'])}{chosen}, visual tokens "
                         f"per sample {p['visual_before']} -> "
                         f"{p['visual_after']}, sequence {p['seq_len_before']} -> {p['seq_len_after']}; scoring "
                         f"{fmt(p['scoring_flops'])} FLOPs (counted in the decoder prefill after)")
        if self.is_audit:
            lines += ["", "## Decoder layers (FLOPs)", "", "| layer | visual | text | proj | attn core | ffn |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for row in self.layers:
                groups = [groups_total({g: row["before"][g]}) for g in GROUPS]
                lines.append(f"| {row['layer']} | {fmt(groups_total(row['before'], 'visual'))} | "
                             f"{fmt(groups_total(row['before'], 'text'))} | " + " | ".join(fmt(v) for v in groups) + " |")
        else:
            lines += self._before_after_tables()
        lines += self._accuracy_table()
        return self._closing_sections(lines)

    def _cross_check_line(self) -> str:
        """fvcore on the eager decoder counts what the graph holds (layers, lm_head, the rest): compared so."""
        t, comp = self.totals, self.components
        eager, graph = t.get("eager_fvcore_decoder"), t.get("graph_total_before")
        if eager is None or graph is None:
            return "- cross-check against fvcore on the eager decoder: not run"
        verdict = "equal" if abs(eager - graph) <= 1e-6 * max(1.0, eager) else f"differ by {fmt(eager - graph)}"
        return (f"- cross-check, the whole decoder before (layers {fmt(t['decoder_prefill_before'])} + lm_head "
                f"{fmt(comp.get('lm_head_before'))} + the rest {fmt(comp.get('other_before') or 0)}): graph count "
                f"{fmt(graph)}, fvcore on the eager decoder {fmt(eager)}: {verdict}")

    def _before_after_tables(self) -> list[str]:
        lines = ["", "## Decoder layers (FLOPs)", "",
                 "| layer | visual before | text before | visual after | text after | after/before | settings |",
                 "|---:|---:|---:|---:|---:|---:|:---|"]
        for row in self.layers:
            vb, tb = groups_total(row["before"], "visual"), groups_total(row["before"], "text")
            va, ta = groups_total(row["after"], "visual"), groups_total(row["after"], "text")
            ratio = (va + ta) / (vb + tb) if vb + tb else float("nan")
            label = layer_settings_text(row.get("settings")) if row.get("reduced") else ""
            lines.append(f"| {row['layer']} | {fmt(vb)} | {fmt(tb)} | {fmt(va)} | {fmt(ta)} | {fmt(ratio)} | {label} |")
        for phase in ("before", "after"):
            lines += ["", f"## Per group, {phase} (visual / text)", "", "| layer | proj | attn core | ffn |",
                      "|---:|---:|---:|---:|"]
            for row in self.layers:
                cells = [f"{fmt(row[phase][g]['visual'])} / {fmt(row[phase][g]['text'])}" for g in GROUPS]
                lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
        return lines

    def _accuracy_table(self) -> list[str]:
        acc = self.measurements.get("accuracy")
        if not acc:
            return []
        lines = ["", f"## Accuracy on {acc['questions']} held-out questions", "", "| questions | before | after |",
                 "|:---|---:|---:|"]
        for kind in [k for k in acc["before"] if k != "overall"] + ["overall"]:
            lines.append(f"| {kind} | {percent(acc['before'][kind])} | {percent(acc['after'].get(kind, float('nan')))} |")
        return lines

    def _closing_sections(self, lines: list[str]) -> str:
        if self.ranking:
            lines += ["", f"## Layer ranking ({self.ranking['metric']}; lower = less critical, reduced first)", "",
                      "| layer | score |", "|---:|---:|"]
            lines += [f"| {i} | {fmt(self.ranking['scores'][str(i)])} |" for i in self.ranking["order"]]
        if self.plan.get("steps"):
            grouped = planner_steps_by_layer(self.plan)
            moves = len(self.plan.get("moves") or [])
            title = f"## Planner steps ({moves} steps, per layer in the order first touched)" if moves else \
                "## Planner steps"
            lines += ["", title, ""] + [f"- {line}" for line in grouped]
            if self.plan.get("predicted_ratio") is not None:
                lines.append(f"- predicted decoder FLOPs ratio {fmt(self.plan['predicted_ratio'])} "
                             "(every step in report.json plan.steps)")
        if self.passes:
            lines += ["", "## Passes", "", "| pass | modified | nodes before | nodes after |", "|---|:---:|---:|---:|"]
            for p in self.passes:
                lines.append(f"| {p['name']} | {p['modified']} | {p['nodes_before']} | {p['nodes_after']} |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        v = self.versions
        lines += ["", f"_versions: {', '.join(f'{k} {val}' for k, val in v.items())}_", ""]
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write report.json, report.md, flops.png and flops.svg into `directory`; returns the folder."""
        out = Path(directory)
        payload = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        atomic_write(out / "report.json", lambda p: p.write_text(payload))
        markdown = self.to_markdown()
        atomic_write(out / "report.md", lambda p: p.write_text(markdown))
        fig = figure.draw(self)
        try:
            atomic_write(out / "flops.png", lambda p: figure.save(fig, p, "png"))
            atomic_write(out / "flops.svg", lambda p: figure.save(fig, p, "svg"))
        finally:
            figure.close(fig)
        logger.info("report written to %s", out)
        return out

    def summary(self) -> str:
        t = self.totals
        if self.is_audit:
            return (f"decoder prefill FLOPs {fmt(t['decoder_prefill_before'])}; visual tokens "
                    f"{self.inputs['visual_tokens']} of {self.inputs['seq_len'] * self.inputs['batch']}")
        return (
            f"decoder prefill FLOPs {fmt(t['decoder_prefill_before'])} -> {fmt(t['decoder_prefill_after'])} "
            f"(ratio {fmt(t['decoder_prefill_ratio'])}); visual tokens {self.inputs['visual_tokens']} of "
            f"{self.inputs['seq_len'] * self.inputs['batch']}"
        )
