"""Which decoder layers the ranking lets the planner reduce: scores and the chosen layers, as JSON.

    python benchmarks/layer_ranking.py [--model proof_llava_12] [--budget 0.5] [--ranking jsd] [--out PATH]

Runs `optimize` with `{"flops_budget": B, "ranking": METRIC}` (layers "auto": ranking, then the
budget planner), calibrated as benchmarks/quality.py is (--calibration training-split questions,
one batch, never the held-out ones), and writes the ranking's per-layer scores (the divergence of
the output when that layer alone is reduced; lower = less critical, reduced first), its order,
the layers the planner reduced with their settings, and the decoder FLOPs ratio. Each layer also
gets its relative depth (index / layers), so that a deeper and a shallower model's findings
compare. Deterministic (no timing). Default --out: benchmarks/results/layer_ranking_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redlens_compile as rc  # noqa: E402
from redlens_compile.config import RANKING_METRICS  # noqa: E402
from redlens_compile.files import atomic_write  # noqa: E402
from redlens_compile.models.demo import resolve_model_dir  # noqa: E402
from redlens_compile.models.evaluate import encode_questions  # noqa: E402
from redlens_compile.models.shapes_task import heldout_questions  # noqa: E402


def ranking_result(model, processor, budget: float, metric: str, calibration_questions: int) -> dict:
    items = heldout_questions(1)  # the example input: the first held-out question, as quality.py
    example = encode_questions(processor, [items[0][0]], [items[0][1].question])
    calibration = None
    if calibration_questions:
        calib = heldout_questions(calibration_questions, split="train")
        calibration = [encode_questions(processor, [img for img, _ in calib], [qa.question for _, qa in calib])]
    config = rc.RedLensConfig(flops_budget=budget, ranking=metric)
    report = rc.optimize(model, example, config=config, calibration=calibration).report
    num_layers = len(report.layers)
    scores = {int(i): s for i, s in report.ranking["scores"].items()}
    settings = {row["layer"]: row.get("settings") for row in report.layers if row.get("reduced")}
    return {
        "budget": budget,
        "ranking": metric,
        "calibration_questions": calibration_questions,
        "layers": num_layers,
        "flops_ratio": report.flops_ratio,
        "order": report.ranking["order"],  # least critical first
        "chosen_layers": sorted(report.chosen_layers),
        "per_layer": [{"layer": i, "depth": i / num_layers, "score": scores.get(i), "reduced": i in settings,
                       "settings": settings.get(i)} for i in range(num_layers)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", "--model-dir", dest="model", default="proof_llava_12",
                        help="a bundled model's name (proof_llava, proof_llava_12) or a model folder")
    parser.add_argument("--budget", type=float, nargs="+", default=[0.5])
    parser.add_argument("--ranking", choices=RANKING_METRICS, default="jsd")
    parser.add_argument("--calibration", type=int, default=10,
                        help="training-split questions (one batch) the ranking runs on; 0: the example alone")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model_dir(args.model)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    out = Path(args.out or f"benchmarks/results/layer_ranking_{Path(model_dir).name}.json")
    result = {"model_dir": str(model_dir), "runs": []}
    for budget in args.budget:  # the file is rewritten after each budget: a long run keeps what it finished
        run = ranking_result(model, processor, budget, args.ranking, args.calibration)
        result["runs"].append(run)
        atomic_write(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
        print(f"budget {run['budget']}: FLOPs ratio {run['flops_ratio']:.3f}, reduced {run['chosen_layers']}")
        print("  " + ", ".join(f"{r['layer']}:{r['score']:.2e}" for r in run["per_layer"]), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
