"""Accuracy against decoder FLOPs on the proof task, for the original model and any configs.

    python benchmarks/quality.py [--configs identity '{"flops_budget": 0.5}' codebook-0.125 ...] [--questions 1000]

For each row: held-out accuracy (overall and per question type) with greedy generate, and
the decoder prefill FLOPs ratio from the audit (after/before, fvcore). Layers are ranked on
--calibration training-split questions (one batch), never on the held-out ones. Also the image-blind
baseline (the original model with a blank image). Prints JSON, then a markdown table, and
draws accuracy against decoder FLOPs for every method into one plot (--plot FILE; none without it, so
a run of a few configs leaves the recorded plot alone): each method's rows joined by a line in FLOPs order, and
the frontier (the best accuracy reachable at or below each FLOPs ratio) as a step line. `--model`
is a model directory or the name of one under redlens_compile/models/ (default: the bundled 4-layer
proof model); `--replot RUN.txt` redraws the plot of a saved run (this script's output). Configs are preset names (RedLensConfig.preset, among
them the token-pruning rows: `codebook-0.125`, `fastv-0.25`, `random-0.125`, `vtw-1`,
`codebook-0.25+budget-0.2`, ... with the codebook shipped beside the proof model), JSON text or
JSON files. With --onnx each config is also exported and answered by onnxruntime
(`OnnxRunner.generate`): its row says how many answers equal the torch module's.
`--dtype bfloat16|float16` loads the model in that dtype (every row, the original's included,
runs in it) to compare the accuracy with float32's; `--onnx-dtype` is what the ONNX files hold
(default: the model's; float32 for bfloat16, which onnxruntime's CPU provider cannot run).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redlens_compile as rc  # noqa: E402
from redlens_compile.models import PROOF_CODEBOOK  # noqa: E402
from redlens_compile.models.demo import resolve_model_dir  # noqa: E402
from redlens_compile.models.evaluate import (  # noqa: E402
    accuracy_by_type, answer_questions, blank_like, encode_questions,
)
from redlens_compile.models.shapes_task import QUESTION_TYPES, heldout_questions  # noqa: E402


def onnx_generate(runner):
    """OnnxRunner.generate with the calling convention answer_questions uses."""
    def generate(max_new_tokens: int, do_sample: bool = False, **inputs):
        return runner.generate(inputs, max_new_tokens=max_new_tokens)
    return generate


def row_name(spec: str, config: rc.RedLensConfig) -> str:
    """Preset names and file paths name themselves; JSON text is named by the fields that differ
    from identity, on one line (a table cell and a plot legend hold no newlines)."""
    if not spec.strip().startswith("{"):
        return spec
    identity = rc.RedLensConfig.identity().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if v != identity[k]}
    return "json: " + (", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "identity")


def unreachable_cell(message: str) -> str:
    """The planner's own words, short enough for a table cell: the lowest ratio it can reach."""
    lowest = re.search(r"lowest reachable decoder FLOPs ratio is ([0-9.]+[0-9])", message)
    return f"unreachable (lowest reachable ratio {lowest.group(1)})" if lowest else "unreachable"


def markdown(rows: list[dict]) -> str:
    head = "| method | decoder FLOPs ratio | overall | " + " | ".join(QUESTION_TYPES) + " |"
    sep = "|---|---:|---:|" + "---:|" * len(QUESTION_TYPES)
    lines = [head, sep]
    for r in rows:
        acc = r["accuracy"]
        if acc is None:  # a budget the planner cannot reach: the row says so instead of a number
            lines.append(f"| {r['name']} | {r['error']} |" + " |" * (len(QUESTION_TYPES) + 1))
            continue
        ratio = "n/a" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f}"
        cells = " | ".join(f"{100 * acc[t]:.1f}" for t in QUESTION_TYPES)
        lines.append(f"| {r['name']} | {ratio} | {100 * acc['overall']:.1f} | {cells} |")
    return "\n".join(lines)


def method_of(name: str) -> str:
    """The method a row belongs to (its points share a line): the preset's name up to its setting."""
    if name.startswith("json: ") or name in ("original", "identity"):
        return name
    if "+" in name:
        return "pruning + budget"
    head = name.removesuffix(" (onnxruntime)").split("-")[0]
    return head + (" plain" if name.endswith("-plain") else "")


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower FLOPs and higher accuracy), by FLOPs."""
    best, out = -1.0, []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["accuracy"] is None:
            continue
        if r["flops_ratio"] is None:
            ax.axhline(100 * r["accuracy"]["overall"], linestyle="--", color="gray", label=r["name"])
        else:
            methods.setdefault(method_of(r["name"]), []).append((r["flops_ratio"], 100 * r["accuracy"]["overall"]))
    for method, points in methods.items():
        points.sort()
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
    best = frontier([p for points in methods.values() for p in points])
    if best:
        xs = [x for x, _ in best] + [1.0]
        ys = [y for _, y in best] + [best[-1][1]]
        ax.step(xs, ys, where="post", color="black", linewidth=0.8, alpha=0.6, label="frontier")
    ax.set_xlabel("decoder prefill FLOPs, after / before (fvcore)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def saved_run(path: Path) -> dict:
    """The JSON object at the head of a saved run (the markdown table follows it)."""
    return json.JSONDecoder().raw_decode(path.read_text())[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="*", default=["identity"])
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--model", "--model-dir", dest="model", default=None,
                        help="a bundled model's name (proof_llava, proof_llava_12) or a model folder; default: the "
                        "bundled 4-layer proof model. The codebook presets use the codebook beside it when it has one")
    parser.add_argument("--plot", default=None,
                        help="draw the frontier plot here (a run draws none without it: a run of a few configs "
                             "would replace the recorded plot of every method; --replot's default: "
                             "benchmarks/results/quality_<model>.png)")
    parser.add_argument("--replot", default=None, help="redraw the plot of a saved run (this script's stdout) and stop")
    parser.add_argument("--onnx", action="store_true", help="also answer with the ONNX export of each config")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the dtype the model is loaded in (every row runs in it)")
    parser.add_argument("--onnx-dtype", choices=["float32", "float16"], default=None,
                        help="what the ONNX files hold (default: the model's dtype; float32 for bfloat16)")
    parser.add_argument("--calibration", type=int, default=10,
                        help="training-split questions (balanced over types, one batch) the layer ranking runs on; "
                             "0: the example alone")
    args = parser.parse_args()
    if args.replot:
        run = saved_run(Path(args.replot))
        name = Path(run["model_dir"]).name
        plot(run["rows"], Path(args.plot or f"benchmarks/results/quality_{name}.png"),
             f"{name}, {run['questions']} held-out questions")
        return
    torch.manual_seed(0)
    model_dir = resolve_model_dir(args.model)
    own_codebook = model_dir / "codebook.safetensors"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    items = heldout_questions(args.questions)
    example = encode_questions(processor, [items[0][0]], [items[0][1].question])
    calibration = None
    if args.calibration:
        calib = heldout_questions(args.calibration, split="train")
        calibration = [encode_questions(processor, [img for img, _ in calib], [qa.question for _, qa in calib])]

    rows = []
    start = time.time()
    rows.append({"name": "original", "flops_ratio": 1.0,
                 "accuracy": accuracy_by_type(items, answer_questions(model.generate, processor, items))})
    rows.append({"name": "image-blind (blank image)", "flops_ratio": None,
                 "accuracy": accuracy_by_type(items, answer_questions(model.generate, processor, blank_like(items)))})
    for spec in args.configs:
        config = rc.RedLensConfig.parse(spec)
        if config.codebook == str(PROOF_CODEBOOK) and own_codebook.is_file():
            # a preset names the default model's codebook; another model is scored by its own
            config = rc.RedLensConfig.from_dict(dict(config.to_dict(), codebook=str(own_codebook)))
        try:
            opt = rc.optimize(model, example, config=config, calibration=calibration)
        except rc.BudgetUnreachableError as error:  # one unreachable budget does not lose the other rows
            print(f"{row_name(spec, config)}: {error}", file=sys.stderr)
            rows.append({"name": row_name(spec, config), "config": config.to_dict(), "flops_ratio": None,
                         "accuracy": None, "error": unreachable_cell(str(error))})
            continue
        answers = answer_questions(opt.generate, processor, items)
        rows.append({"name": row_name(spec, config), "config": config.to_dict(),
                     "flops_ratio": opt.report.flops_ratio, "accuracy": accuracy_by_type(items, answers),
                     # what the planner chose and why: per-layer settings, the keep where it plans it, the scores
                     "plan_settings": opt.report.plan.get("settings"), "planned_keep": opt.report.plan.get("prune_keep"),
                     "ranking": opt.report.ranking or None})
        if args.onnx:
            import tempfile

            from redlens_compile.exporters.ort_runner import OnnxRunner

            with tempfile.TemporaryDirectory() as tmp:
                # the model serves only what the files run in torch (the proof model: nothing)
                runner = OnnxRunner(opt.export_onnx(Path(tmp) / "onnx", dtype=args.onnx_dtype), model)
                ort_answers = answer_questions(onnx_generate(runner), processor, items)
            rows.append({"name": f"{row_name(spec, config)} (onnxruntime)", "config": config.to_dict(),
                         "flops_ratio": opt.report.flops_ratio, "accuracy": accuracy_by_type(items, ort_answers),
                         "answers_equal_to_torch": sum(a == b for a, b in zip(answers, ort_answers))})
    result = {"model_dir": str(model_dir), "dtype": args.dtype, "questions": len(items),
              "calibration_questions": args.calibration,
              "seconds": time.time() - start, "rows": rows}
    if args.plot:
        plot(rows, Path(args.plot), f"{model_dir.name}, {len(items)} held-out questions")
    print(json.dumps(result, indent=2))
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
