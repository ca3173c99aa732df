"""The report's figure (flops.png, flops.svg): per-layer decoder FLOPs before/after split visual /
text with each reduced layer's settings under its bars, the decoder total against the budget,
the visual tokens pruning kept, and a panel of what the run measured (prefill latency, accuracy)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from ..analysis.flops import groups_total
from .reading import fmt, layer_settings_text, percent

if TYPE_CHECKING:
    from .audit_report import AuditReport

VISUAL, TEXT = "tab:orange", "tab:blue"
BEFORE, AFTER = "0.55", "tab:green"  # the measured panel: original grey, optimized green


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(report: "AuditReport"):
    """The figure of `report` (a matplotlib Figure; save() writes it, close() frees it)."""
    plt = _pyplot()
    measured = report.measurements.get("prefill_latency_s") or report.measurements.get("accuracy")
    width = max(7.0, 0.9 * len(report.layers) + 4.5) + (4.5 if measured else 0.0)
    fig = plt.figure(figsize=(width, 6.2), layout="constrained")
    grid = fig.add_gridspec(1, 2 if measured else 1, width_ratios=[3, 1.6] if measured else [1])
    if report.is_audit:
        _layers(report, fig.add_subplot(grid[0]))
    else:
        left = grid[0].subgridspec(2, 1, height_ratios=[1, 5.5])
        _total(report, fig.add_subplot(left[0]))
        _layers(report, fig.add_subplot(left[1]))
    if measured:
        _measured(report, fig, grid[1])
    title = f"{report.model.get('class', '?')} ({report.model.get('family', '?')}): decoder prefill FLOPs"
    if not report.is_audit:
        title += ", before and after"
    fig.suptitle(textwrap.fill(title, 100, break_on_hyphens=False), fontsize=12)
    return fig


def _total(report: "AuditReport", ax) -> None:
    """The decoder total after/before as one bar against the budget."""
    t = report.totals
    ratio = t["decoder_prefill_ratio"]
    budget = (report.config or {}).get("flops_budget")
    ax.barh([0], [1.0], color="0.85", height=0.6)
    ax.barh([0], [ratio], color=AFTER, height=0.6)
    ax.text(min(ratio, 0.97) + 0.01, 0, f"after/before {fmt(ratio)}  ({fmt(t['decoder_prefill_before'])} -> "
            f"{fmt(t['decoder_prefill_after'])} FLOPs)", va="center", fontsize=9)
    if budget is not None:
        ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1.5)
        ax.text(budget, 0.45, f"flops_budget {fmt(budget)}", color="tab:red", ha="center" if budget < 0.9 else "right",
                va="bottom", fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.5, 0.9)
    ax.set_yticks([])
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(labelsize=8)
    ax.set_title("decoder total (the layers; what flops_budget bounds)", fontsize=9, loc="left")


def _tick_label(report: "AuditReport", row: dict) -> str:
    label = f"layer {row['layer']}"
    if report.is_audit:
        return label
    return label + "\n" + (layer_settings_text(row.get("settings"), sep="\n") if row.get("reduced") else "unreduced")


def _layers(report: "AuditReport", ax) -> None:
    rows = report.layers
    xs = list(range(len(rows)))
    width = 0.38
    phases = [("before", 0.0, 1.0)] if report.is_audit else [("before", -width / 2, 0.45), ("after", width / 2, 1.0)]
    for phase, offset, alpha in phases:
        visual = [groups_total(r[phase], "visual") for r in rows]
        text = [groups_total(r[phase], "text") for r in rows]
        at = [x + offset for x in xs]
        suffix = "" if report.is_audit else f", {phase}"
        ax.bar(at, visual, width, color=VISUAL, alpha=alpha, label=f"visual rows{suffix}")
        ax.bar(at, text, width, bottom=visual, color=TEXT, alpha=alpha, label=f"text rows{suffix}")
        if not report.is_audit:
            for x, v, tx in zip(at, visual, text):
                ax.text(x, v + tx, phase, ha="center", va="bottom", fontsize=7, color="0.3")
    top = max(groups_total(r["before"]) for r in rows) if rows else 1.0
    ax.set_ylim(0, top * 1.45)  # room for the legend and the pruning note above the bars
    ax.set_xticks(xs, [_tick_label(report, r) for r in rows], fontsize=8)
    ax.set_ylabel("FLOPs per layer (fvcore, multiply-add = 1)")
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    p = report.pruning
    if p:
        before, after = ", ".join(map(str, p["visual_before"])), ", ".join(map(str, p["visual_after"]))
        ax.text(0.99, 0.97, f"token pruning: {p['method']} {p['where']}\nvisual tokens kept per sample: {before} -> "
                f"{after}" + (f"\nscoring {fmt(p['scoring_flops'])} FLOPs (in the total)" if p.get("scoring_flops") else ""),
                transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "0.6", "boxstyle": "round"})
    ax.set_title("per decoder layer (settings of each reduced layer under its bars)" if not report.is_audit
                 else "per decoder layer", fontsize=9, loc="left")


def _measured(report: "AuditReport", fig, cell) -> None:
    m = report.measurements
    latency, accuracy = m.get("prefill_latency_s"), m.get("accuracy")
    panels = [p for p in (latency and "latency", accuracy and "accuracy") if p]
    grid = cell.subgridspec(len(panels), 1)
    notes = []
    logits, gen = m.get("logits"), m.get("generate")
    if logits:
        notes.append(f"last-position logits max abs diff {fmt(logits['last_position_max_abs_diff'])}")
    if gen:
        notes.append(f"greedy tokens the same: {gen['tokens_matching']} of {gen['tokens_compared']}")
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(grid[k])
        if panel == "latency":
            values = [latency["before"] * 1e3, latency["after"] * 1e3]
            bars = ax.bar(["original", "optimized"], values, color=[BEFORE, AFTER], width=0.6)
            ax.bar_label(bars, [f"{fmt(v)} ms" for v in values], fontsize=9)
            ax.set_ylabel("ms")
            how = textwrap.fill(f"({latency.get('how', 'measured')})", 48, break_on_hyphens=False)
            ax.set_title(f"measured prefill latency: ratio {fmt(latency['ratio'])}\n{how}", fontsize=9)
            ax.set_ylim(0, max(values) * 1.25)
        else:
            values = [100 * accuracy["before"]["overall"], 100 * accuracy["after"]["overall"]]
            bars = ax.bar(["original", "optimized"], values, color=[BEFORE, AFTER], width=0.6)
            ax.bar_label(bars, [percent(v / 100) for v in values], fontsize=9)
            ax.set_ylim(0, 118)
            ax.set_ylabel("% correct")
            ax.set_title(f"accuracy on {accuracy['questions']} held-out questions", fontsize=9)
        if k == len(panels) - 1 and notes:
            ax.set_xlabel("\n".join(notes), fontsize=9)
        ax.tick_params(labelsize=9)


def save(fig, path: Path, kind: str) -> None:
    import matplotlib

    # SVG: text kept as text (searchable, smaller) and no date (the same report gives the same file)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "redlens"}):
        fig.savefig(path, format=kind, dpi=100, metadata={"Date": None} if kind == "svg" else None)


def close(fig) -> None:
    _pyplot().close(fig)
