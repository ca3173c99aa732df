"""The README's table of supported families, from running each claim on the test suite's tiny model
of each family (tests/tiny_families.py), recorded in benchmarks/results/families.json.

A cell says "yes" only where the run did what it claims, checked here:
- identity, reductions: the identity OptimizedModel gives the family's own logits (max abs diff
  <= 1e-4) and greedy tokens, and reducing layer 0 runs, saves FLOPs and generates;
- pruning before layer 0: random pruning (keep 0.25, proportional attention) optimizes and
  generates; where only the plain variant runs, "plain only (prune_proportional=False)";
- fastv / vtw: both (after layer 1, keep 0.25) optimize and generate;
- ONNX: the identity model exports, and OnnxRunner gives the torch module's logits (<= 1e-4).
Anything else is "no (the error)". The first five columns are what the code reads off the model
(capture/families.py support_row). tests/capture/test_families.py keeps the README equal to the
recorded table and the recorded structure equal to what the code says now.

    .venv/bin/python scripts/families_table.py [--jobs 4]   # run every claim (minutes), write, print
    .venv/bin/python scripts/families_table.py --print    # print the recorded table
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "families.json"
RUN_COLUMNS = ("identity, reductions", "pruning before layer 0", "fastv / vtw", "ONNX")
TOKENS = 3


def families_table(rows: list[dict]) -> str:
    """The markdown table of recorded rows (their "cells"), columns in the recorded order."""
    header = list(rows[0]["cells"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row["cells"][h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def _why(exc: BaseException) -> str:
    first = str(exc).split(":")[0].strip().replace("|", "/")
    return f"no ({type(exc).__name__}: {first[:90]})"


def _generates(opt, inputs) -> None:
    import torch

    with torch.no_grad():
        out = opt.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, eos_token_id=None)
    if out.shape[1] != inputs["input_ids"].shape[1] + TOKENS:
        raise AssertionError(f"generate gave {out.shape[1] - inputs['input_ids'].shape[1]} new tokens, not {TOKENS}")


def run_claims(name: str, model, directory: Path) -> dict:
    """Each run column's verdict for one family, with what was measured."""
    import torch
    from tiny_families import make_inputs

    import redlens_compile as rc
    from redlens_compile.exporters.ort_runner import OnnxRunner

    example = make_inputs(name, model)
    cells, evidence = {}, {}
    identity = None
    try:
        identity = rc.optimize(model, example, config=rc.RedLensConfig.identity())
        with torch.no_grad():
            diff = float((identity(**example).logits - model(**example).logits).abs().max())
            want = model.generate(**example, max_new_tokens=TOKENS, do_sample=False, eos_token_id=None)
            got = identity.generate(**example, max_new_tokens=TOKENS, do_sample=False, eos_token_id=None)
        evidence["identity_max_abs_diff"] = diff
        if diff > 1e-4 or not torch.equal(got, want):
            raise AssertionError(f"identity differs from the family (max abs diff {diff:.3g})")
        reduced = rc.optimize(model, example, config=rc.RedLensConfig(layers=[0]))
        evidence["layer_0_reduced_flops_ratio"] = reduced.report.flops_ratio
        if not reduced.report.flops_ratio < 1.0:
            raise AssertionError("reducing layer 0 saved no FLOPs")
        _generates(reduced, example)
        cells["identity, reductions"] = "yes"
    except Exception as exc:  # the table says what failed
        cells["identity, reductions"] = _why(exc)
    pruning = dict(prune="random", prune_keep=0.25, flops_budget=1.0)
    try:
        _generates(rc.optimize(model, example, config=rc.RedLensConfig(**pruning)), example)
        cells["pruning before layer 0"] = "yes"
    except Exception as exc:
        try:
            _generates(rc.optimize(model, example, config=rc.RedLensConfig(**pruning, prune_proportional=False)),
                       example)
            cells["pruning before layer 0"] = "plain only (prune_proportional=False)"
            evidence["proportional_refused"] = str(exc)[:300]
        except Exception as plain_exc:
            cells["pruning before layer 0"] = _why(plain_exc)
    try:
        for method in ("fastv", "vtw"):
            config = rc.RedLensConfig(prune=method, prune_keep=0.25, prune_layer=1, flops_budget=1.0)
            _generates(rc.optimize(model, example, config=config), example)
        cells["fastv / vtw"] = "yes"
    except Exception as exc:
        cells["fastv / vtw"] = _why(exc)
    try:
        if identity is None:
            raise RuntimeError("the identity model did not build")
        runner = OnnxRunner(identity.export_onnx(directory / "onnx"), model)
        with torch.no_grad():
            want = identity(**example).logits.numpy()
        diff = float(abs(runner(**example) - want).max())
        evidence["onnx_max_abs_diff"] = diff
        if diff > 1e-4:
            raise AssertionError(f"onnxruntime's logits differ by {diff:.3g}")
        cells["ONNX"] = "prefill + decode step"
    except Exception as exc:
        cells["ONNX"] = _why(exc)
    return {"cells": cells, "evidence": evidence}


def family_row(name: str, threads: int | None = None) -> dict:
    """One family's recorded row: built from its tiny config, every claim run on it."""
    import torch
    from tiny_families import build_and_reload

    from redlens_compile.capture.families import support_row

    if threads is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / name.replace(".", "_")
        model = build_and_reload(name, directory / "model")
        run = run_claims(name, model, directory)
    print(name, run["cells"], file=sys.stderr, flush=True)
    return {"tiny_family": name, "cells": {**support_row(model), **run["cells"]}, "evidence": run["evidence"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the recorded table, run nothing")
    parser.add_argument("--families", nargs="*", help="only these (a partial run is printed, not recorded)")
    parser.add_argument("--jobs", type=int, default=1, help="families run in this many processes at once")
    args = parser.parse_args()
    if args.print:
        print(families_table(json.loads(RESULTS.read_text())["rows"]))
        return
    import torch
    import transformers
    from tiny_families import FAMILIES

    from redlens_compile.files import atomic_write

    names = args.families or list(FAMILIES)
    if args.jobs > 1:  # one family per process, one thread each; rows in the table's order
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(functools.partial(family_row, threads=1), names, chunksize=1)
    else:
        torch.set_num_threads(2)
        rows = [family_row(name) for name in names]
    if not args.families:
        record = {"script": "scripts/families_table.py", "torch": torch.__version__,
                  "transformers": transformers.__version__, "python": platform.python_version(), "rows": rows}
        atomic_write(RESULTS, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
    print(families_table(rows))


if __name__ == "__main__":
    main()
