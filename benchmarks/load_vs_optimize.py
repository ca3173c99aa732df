"""Time to optimize against time to load the saved result; prints JSON.

    python benchmarks/load_vs_optimize.py [--models proof 2b] [--layers 2] [--config budget-0.5] [--repeats 1]

`optimize` captures the decoder, ranks the layers on the calibration inputs (the example) and
plans to the budget; `OptimizedModel.from_pretrained` checks the folder and the model's
fingerprint, captures the decoder and applies the saved plan (no ranking, no planning). Both
run on the same model and inputs, one after the other, `--repeats` times each (medians; every
run is kept in `runs`), after one identity optimize that pays the process's first-capture costs.
Models: `proof`, the bundled proof model (`redlens_compile/models/proof_llava`, 4 layers, 264
tokens, on one held-out question); `2b`, the LLaVA with a Qwen2-VL-2B-geometry decoder that
benchmarks/prefill.py builds (`--layers` decoder layers, random weights, fp32, one image of 1024
visual tokens and 64 text tokens). Besides the seconds, each row counts the decoder graphs
rewritten (`apply_plan`) and FLOPs counts run (`count_graph_flops`): the ranking trials and the
planner's ladder are those, and loading runs only its own two counts and one rewrite. The
loaded object's logits are checked against the optimized one's (`max_abs_logit_diff`). Writes
benchmarks/results/load_vs_optimize.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import redlens_compile as rc  # noqa: E402
import redlens_compile.api as api  # noqa: E402
from redlens_compile.files import atomic_write  # noqa: E402
from redlens_compile.report.audit_report import library_versions  # noqa: E402

RESULTS = HERE / "results" / "load_vs_optimize.json"


class Counted:
    """Wraps api's apply_plan and count_graph_flops to count the work each stage does."""

    def __init__(self):
        self.counts = {"apply_plan": 0, "count_graph_flops": 0}
        for name in self.counts:
            original = getattr(api, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(api, name, wrapped)

    def take(self) -> dict[str, int]:
        taken = dict(self.counts)
        for name in self.counts:
            self.counts[name] = 0
        return taken


def proof_model():
    from redlens_compile.loading import load_model_dir
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR
    from redlens_compile.models.evaluate import encode_questions
    from redlens_compile.models.shapes_task import heldout_questions

    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    image, qa = heldout_questions(1)[0]
    return model, encode_questions(processor, [image], [qa.question])


def geometry_2b_model(layers: int, directory: Path):
    from prefill import build_model, make_inputs

    return build_model(layers, directory), make_inputs(1, 64)


def measure(name: str, model, inputs: dict, config: rc.RedLensConfig, repeats: int, directory: Path,
            counter: Counted) -> dict:
    rc.optimize(model, inputs, config=rc.RedLensConfig.identity())  # first-capture costs, paid by neither
    counter.take()
    optimize_s, load_s, runs = [], [], []
    for i in range(repeats):
        start = time.perf_counter()
        opt = rc.optimize(model, inputs, config=config)
        optimize_s.append(time.perf_counter() - start)
        optimize_work = counter.take()
        folder = opt.save_pretrained(directory / f"{name}-{i}")
        start = time.perf_counter()
        loaded = rc.OptimizedModel.from_pretrained(folder, model)
        load_s.append(time.perf_counter() - start)
        load_work = counter.take()
        with torch.no_grad():
            diff = float((opt(**inputs).logits - loaded(**inputs).logits).abs().max())
        runs.append({"optimize_s": optimize_s[-1], "load_s": load_s[-1], "optimize_work": optimize_work,
                     "load_work": load_work, "max_abs_logit_diff": diff})
    optimize_median, load_median = statistics.median(optimize_s), statistics.median(load_s)
    return {
        "model": name,
        "decoder_layers": opt.num_layers,
        "seq_len": opt.report.inputs["seq_len"],
        "visual_tokens": opt.report.inputs["visual_tokens"],
        "reduced_layers": opt.report.plan["settings"],
        "decoder_flops_ratio": opt.report.flops_ratio,
        "optimize_s": optimize_median,
        "load_s": load_median,
        "optimize_over_load": optimize_median / load_median,
        "optimize_work": runs[-1]["optimize_work"],
        "load_work": runs[-1]["load_work"],
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["proof", "2b"], choices=["proof", "2b"])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 2b model")
    parser.add_argument("--config", default="budget-0.5", help="a preset name, JSON text or a JSON file")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = rc.RedLensConfig.parse(args.config)
    counter = Counted()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"{name} ...", file=sys.stderr, flush=True)
            model, inputs = proof_model() if name == "proof" else geometry_2b_model(args.layers, Path(tmp) / "2b")
            rows.append(measure(name, model, inputs, config, args.repeats, Path(tmp), counter))
            del model
    result = {"config": config.to_dict(), "threads": torch.get_num_threads(), "repeats": args.repeats,
              "versions": library_versions(),
              "rows": rows}
    text = json.dumps(result, indent=2)
    atomic_write(args.out, lambda tmp: tmp.write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
