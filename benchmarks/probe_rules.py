"""Which probe rule keeps the dynamic FFN's accuracy: each rule on the same configs, and per layer.

    python benchmarks/probe_rules.py [--rules stride outlier+route ...] [--configs budget-0.5 budget-0.75]
        [--per-layer 0.5] [--questions 1000] [--out benchmarks/results/probe_rules.json]

For every probe rule (RedLensConfig.probe_rule) and every config (preset name or JSON, as
benchmarks/quality.py takes them) the config runs with that rule: held-out accuracy (overall and
per question type), the decoder FLOPs ratio from the audit and the planner's per-layer settings.
`--per-layer KEEP` adds, per rule, one row per decoder layer with the dynamic FFN at KEEP on that
layer alone (no hollow attention): where each rule loses accuracy. Layers are ranked on
--calibration training-split questions, never on the held-out ones. Writes JSON to --out and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redlens_compile as rc  # noqa: E402
from redlens_compile.config import PROBE_RULES  # noqa: E402
from redlens_compile.files import atomic_write  # noqa: E402
from redlens_compile.models.demo import ensure_default_model  # noqa: E402
from redlens_compile.models.evaluate import accuracy_by_type, answer_questions, encode_questions  # noqa: E402
from redlens_compile.models.shapes_task import QUESTION_TYPES, heldout_questions  # noqa: E402


def with_rule(spec: str, rule: str) -> rc.RedLensConfig:
    return rc.RedLensConfig.from_dict(dict(rc.RedLensConfig.parse(spec).to_dict(), probe_rule=rule))


def layers_name(config: rc.RedLensConfig) -> str:
    """A JSON config's row name: its explicit per-layer settings ('layer 2 ffn_keep 0.0667, window 8')."""
    from redlens_compile.report.reading import layer_settings_text

    if not isinstance(config.layers, dict):
        return config.to_json()
    parts = [f"layer {i} " + layer_settings_text({"ffn_keep": s["ffn_keep"], "window": s["hollow_window"]})
             for i, s in config.layers.items()]
    return ("; ".join(parts) + (" alone" if len(parts) == 1 else "")) or "no layer"


def markdown(rows: list[dict]) -> str:
    head = "| rule | config | decoder FLOPs ratio | overall | " + " | ".join(QUESTION_TYPES) + " | plan |"
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(QUESTION_TYPES) + "---|"]
    for r in rows:
        acc = r["accuracy"]
        cells = " | ".join(f"{100 * acc[t]:.1f}" for t in QUESTION_TYPES)
        plan = "; ".join(f"{i}: keep {s['ffn_keep']:.3g}" + (f" w {s['window']}" if s.get("window") else "")
                         for i, s in sorted(r["plan"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['rule']} | {r['name']} | {r['flops_ratio']:.3f} | {100 * acc['overall']:.1f} | {cells} "
                     f"| {plan} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", nargs="*", default=list(PROBE_RULES), choices=PROBE_RULES)
    parser.add_argument("--configs", nargs="*", default=["budget-0.5", "budget-0.75"])
    parser.add_argument("--per-layer", type=float, default=None, metavar="KEEP",
                        help="also each decoder layer alone with the dynamic FFN at this keep (no hollow attention)")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=10)
    parser.add_argument("--model-dir", default=None, help="default: the bundled proof model")
    parser.add_argument("--out", default="benchmarks/results/probe_rules.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = Path(args.model_dir) if args.model_dir else ensure_default_model()
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    items = heldout_questions(args.questions)
    example = encode_questions(processor, [items[0][0]], [items[0][1].question])
    calib = heldout_questions(args.calibration, split="train") if args.calibration else None
    calibration = [encode_questions(processor, [i for i, _ in calib], [qa.question for _, qa in calib])] if calib else None

    start = time.time()
    original = accuracy_by_type(items, answer_questions(model.generate, processor, items))
    specs = list(args.configs)
    if args.per_layer is not None:
        layers = model.config.text_config.num_hidden_layers
        specs += [json.dumps({"flops_budget": 1.0, "layers": {str(i): {"ffn_keep": args.per_layer,
                                                                        "hollow_window": None}}})
                  for i in range(layers)]
    rows = []
    for rule in args.rules:
        for spec in specs:
            config = with_rule(spec, rule)
            opt = rc.optimize(model, example, config=config, calibration=calibration)
            acc = accuracy_by_type(items, answer_questions(opt.generate, processor, items))
            name = spec if not spec.startswith("{") else layers_name(config)
            rows.append({"rule": rule, "name": name, "config": config.to_dict(), "flops_ratio": opt.report.flops_ratio,
                         "plan": opt.report.plan.get("settings", {}), "accuracy": acc,
                         "share_of_original": acc["overall"] / original["overall"]})
            print(f"{rule:>14} {name:>28}: {100 * acc['overall']:.1f} at {opt.report.flops_ratio:.3f}", flush=True)
    result = {"model_dir": str(model_dir), "questions": len(items), "calibration_questions": args.calibration,
              "original": original, "seconds": time.time() - start, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out, lambda tmp: tmp.write_text(text))
    print(f"original: {100 * original['overall']:.1f}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
