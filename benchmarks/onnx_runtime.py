"""onnxruntime prefill and decode latency against torch eager, original and optimized; writes JSON.

    .venv/bin/python benchmarks/onnx_runtime.py [--layers 2] [--repeats 5] [--rows identity budget-0.5 random-0.25]
        [--out benchmarks/results/onnx_runtime.json] [--profile-out benchmarks/results/onnx_profile.json]
        [--geometry 2b|smolvlm]

The decoder of benchmarks/prefill.py (Qwen2-VL-2B geometry: hidden 1536, FFN 8960, 12 heads,
2 KV heads; `--layers` layers), case (a): one image of 1024 visual tokens and 64 text tokens,
fp32, 2 threads for torch and for onnxruntime. Per row (a config) the row is optimized and
exported; then, interleaved on the same inputs:
- prefill: the exported decoder_prefill graph in onnxruntime (on the pruned rows where the row
  prunes; the pruning stage itself, prune.onnx, is timed apart) against the original eager
  decoder (transformers' language model and lm_head) and against the identity export's prefill;
- decode: one decoder_step in onnxruntime after that prefill against one eager decode step of the
  original model on its own cache;
- what the runner does before the prefill graph (`front`: vision tower and projector, in
  onnxruntime where the files hold vision.onnx, else torch; token merge and positions; the
  pruning stage) and the pruning stage alone.
- `ort_optimized_prefill`: the same prefill from onnxruntime's offline-optimized CPU file
  (decoder_prefill.ort-cpu.onnx, export_onnx(..., ort_optimized=True)), and its logits' max
  difference from the standard file's;
- `prune_graph` (prune.onnx alone, on feeds made once) against `torch_stage` (the eager pruning
  stage, TokenPruning, scores included) on the same decoder inputs; `pruning_stage` is what the
  runner does (its random scores in torch, then prune.onnx).
Every timed callable of a row runs interleaved in one loop (analysis/timing.py).
Then onnxruntime's own profiler (SessionOptions.enable_profiling) runs each prefill graph (and
prune.onnx) `--profile-runs` times on one intra-op thread (a second thread preempted on a busy
machine stalls whole ops; one thread gives each node its own cost) and the per-op-type shares of
the summed per-node medians, with node counts, go to `--profile-out`.
Latency ratios are ratios of medians from one run; absolute times are this machine's.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from prefill import build_model, eager_prefill, make_inputs  # noqa: E402

import redlens_compile as rc  # noqa: E402
from redlens_compile.analysis.timing import interleaved_medians  # noqa: E402
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs  # noqa: E402
from redlens_compile.exporters.ort_runner import OnnxRunner, to_numpy  # noqa: E402
from redlens_compile.files import atomic_write  # noqa: E402
from redlens_compile.ops.token_pruning import random_scores  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # no spin-waiting after a run: interleaved, a session's spinning threads take the cores from the
    # next callable (benchmarks/prefill.py measured two identical files 1.13-1.30x apart with it)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def prune_feeds(runner: OnnxRunner, decoder_inputs) -> dict:
    """prune.onnx's feeds as the runner makes them (random: the torch module's scores)."""
    args = [to_numpy(a) for a in decoder_inputs.as_args()[:4]]
    if runner.pruning["method"] == "random":
        args.append(to_numpy(random_scores(decoder_inputs.inputs_embeds, decoder_inputs.attention_mask,
                                           decoder_inputs.visual_mask, runner.pruning["seed"])))
    return dict(zip(runner.manifest["graphs"]["prune"]["inputs"], args))


def profile(path: Path, feeds: dict, runs: int, prefix: Path) -> dict:
    """onnxruntime's profiler over `runs` runs (after one warm-up) of one session on one thread: per
    op type, the share of the summed per-node medians, the node count, and the top nodes."""
    options = session_options(threads=1)
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = [e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    durations, op_type, shapes = collections.defaultdict(list), {}, {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[1]:
            name = e["name"].removesuffix("_kernel_time")
            durations[name].append(e["dur"])
            op_type[name] = e["args"]["op_name"]
            shapes[name] = [next(iter(d.values())) for d in e["args"].get("input_type_shape", [])]
    medians = {name: statistics.median(d) for name, d in durations.items()}
    total = sum(medians.values())
    by_type, counts = collections.Counter(), collections.Counter()
    for name, us in medians.items():
        by_type[op_type[name]] += us
        counts[op_type[name]] += 1
    return {
        "file": path.name, "runs": runs, "nodes": len(medians), "node_median_sum_ms": round(total / 1000, 2),
        "op_types": {t: {"share": round(us / total, 4), "nodes": counts[t]} for t, us in by_type.most_common()},
        "top_nodes": [{"node": n, "op": op_type[n], "share": round(us / total, 4), "inputs": shapes[n]}
                      for n, us in sorted(medians.items(), key=lambda kv: -kv[1])[:12]],
    }


def prefill_feeds(runner: OnnxRunner, decoder_inputs) -> dict:
    names = runner.manifest["graphs"]["decoder_prefill"]["inputs"]
    return {n: a.numpy() for n, a in zip(names, decoder_inputs.as_args())}


def step_feeds(runner: OnnxRunner, decoder_inputs, kv) -> dict:
    batch, length = decoder_inputs.attention_mask.shape
    bias = decoder_inputs.key_bias.numpy() if decoder_inputs.key_bias is not None else np.zeros((batch, length), np.float32)
    values = [np.ones((batch, 1), np.int64), (decoder_inputs.position_ids[..., -1:] + 1).numpy(),
              np.ones((batch, length + 1), np.int64), np.concatenate([bias, np.zeros((batch, 1), np.float32)], 1), *kv]
    return dict(zip(runner.manifest["graphs"]["decoder_step"]["inputs"], values))


def eager_step(model, inputs):
    """One decode step of the original model on the cache of its own prefill."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    ids = inputs["input_ids"]
    step = {"input_ids": ids[:, -1:], "attention_mask": torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long),
            "position_ids": torch.full((ids.shape[0], 1), ids.shape[1])}
    cache = out.cache

    def run():
        with torch.no_grad():
            model(**step, cache=cache, use_cache=True)
            cache.crop(-1)  # drop the step's key again: every timed step sees the same cache

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", nargs="+", default=["identity", "budget-0.5", "random-0.25"])
    parser.add_argument("--profile-runs", type=int, default=5, help="onnxruntime profiler runs per file (0: none)")
    parser.add_argument("--geometry", default="2b", choices=["2b", "smolvlm"],
                        help="the decoder's geometry (redlens_compile/models/geometries.py)")
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_runtime.json")
    parser.add_argument("--profile-out", type=Path, default=RESULTS / "onnx_profile.json")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and onnxruntime intra-op threads (1: a run pinned to one core beside other work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    model = build_model(args.layers, Path(tmp.name) / "model", args.geometry)
    inputs = make_inputs(1, 64)
    original = None
    runners = {}
    for row in dict.fromkeys(["identity", *args.rows]):
        print(f"{row}: optimize and export ...", file=sys.stderr, flush=True)
        opt = rc.optimize(model, inputs, config=rc.RedLensConfig.preset(row))
        out = opt.export_onnx(Path(tmp.name) / row, ort_optimized=True)
        runner = OnnxRunner(out, model)  # the model serves only what the files run in torch
        runner.sessions = {name: ort.InferenceSession(str(out / g["file"]), session_options(),
                                                      providers=runner.providers)
                           for name, g in runner.manifest["graphs"].items()}
        optimized = ort.InferenceSession(str(out / runner.manifest["graphs"]["decoder_prefill"]["optimized"]
                                             ["CPUExecutionProvider"]["file"]), session_options(),
                                         providers=["CPUExecutionProvider"])
        runners[row] = (opt, runner, optimized, out)
        if original is None:
            original = eager_prefill(model, opt.adapter)
    decoder_inputs = capture_decoder_inputs(model, runners["identity"][0].adapter, inputs)
    results = []
    identity_runner, identity_optimized = runners["identity"][1], runners["identity"][2]
    identity_feeds = prefill_feeds(identity_runner, decoder_inputs)
    step_eager = eager_step(model, inputs)
    profiles = {}
    for row in args.rows:
        opt, runner, optimized, out = runners[row]
        ran_on = runner.decoder_inputs(inputs)
        feeds = prefill_feeds(runner, ran_on)
        _, kv = runner.prefill(ran_on)
        kv = [value.numpy() for value in kv]  # OrtValues where the provider keeps them: host arrays for run()
        step = step_feeds(runner, ran_on, kv)
        timed = {
            "eager_prefill": lambda: original(decoder_inputs),
            "ort_identity_prefill": lambda: identity_runner.sessions["decoder_prefill"].run(None, identity_feeds),
            "ort_prefill": lambda r=runner, f=feeds: r.sessions["decoder_prefill"].run(None, f),
            "ort_identity_optimized_prefill": lambda: identity_optimized.run(None, identity_feeds),
            "ort_optimized_prefill": lambda s=optimized, f=feeds: s.run(None, f),
            # what the runner does before the prefill graph: vision, merge, positions, pruning stage
            "front": lambda r=runner: r.decoder_inputs(inputs),
            "pruning_stage": lambda r=runner: r.prune(decoder_inputs) if r.pruning is not None else None,
            "torch_stage": lambda o=opt: o.pruning(decoder_inputs) if o.pruning is not None else None,
            "eager_step": step_eager,
            "ort_step": lambda r=runner, f=step: r.sessions["decoder_step"].run(None, f),
        }
        pruned_feeds = prune_feeds(runner, decoder_inputs) if runner.pruning is not None else None
        if pruned_feeds is not None:
            timed["prune_graph"] = lambda r=runner, f=pruned_feeds: r.sessions["prune"].run(None, f)
        with torch.no_grad():
            medians = interleaved_medians(timed, args.repeats)
        standard_logits = runner.sessions["decoder_prefill"].run(None, feeds)[0]
        optimized_diff = float(np.abs(optimized.run(None, feeds)[0] - standard_logits).max())
        if args.profile_runs > 0:  # 0: timings only, no profile file
            profiles[row] = {"decoder_prefill": profile(out / "decoder_prefill.onnx", feeds, args.profile_runs,
                                                        Path(tmp.name) / f"profile_{row}")}
        if pruned_feeds is not None and args.profile_runs > 0:
            profiles[row]["prune"] = profile(out / "prune.onnx", pruned_feeds, args.profile_runs,
                                             Path(tmp.name) / f"profile_prune_{row}")
        results.append({
            "row": row, "flops_ratio": round(opt.report.flops_ratio, 4), "seq_len": decoder_inputs.seq_len,
            "seq_len_after_pruning": ran_on.seq_len,
            "ort_prefill_over_eager": round(medians["ort_prefill"] / medians["eager_prefill"], 4),
            "ort_prefill_over_ort_identity": round(medians["ort_prefill"] / medians["ort_identity_prefill"], 4),
            "ort_prefill_over_ort_identity_per_flops_ratio": round(
                medians["ort_prefill"] / medians["ort_identity_prefill"] / opt.report.flops_ratio, 4),
            "ort_optimized_prefill_over_ort_optimized_identity": round(
                medians["ort_optimized_prefill"] / medians["ort_identity_optimized_prefill"], 4),
            "ort_optimized_prefill_over_ort_prefill": round(medians["ort_optimized_prefill"] / medians["ort_prefill"], 4),
            "optimized_logits_max_abs_diff": optimized_diff,
            "prune_graph_over_torch_stage": (round(medians["prune_graph"] / medians["torch_stage"], 4)
                                             if pruned_feeds is not None else None),
            "ort_step_over_eager_step": round(medians["ort_step"] / medians["eager_step"], 4),
            "vision_runs_in": runner.manifest["front"]["runs_in"],
            "medians_s": {k: round(v, 5) for k, v in medians.items()},
            "lowering": runner.manifest["lowering"],
        })
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {"command": " ".join(["benchmarks/onnx_runtime.py", *sys.argv[1:]]), "geometry": args.geometry,
              "layers": args.layers,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "provider": identity_runner.provider,
              "onnxruntime": ort.__version__, "rows": results}
    shares = {"command": report["command"], "layers": args.layers, "intra_op_threads": 1,
              "onnxruntime": ort.__version__, "rows": profiles}
    for path, data in ((args.out, report), (args.profile_out, shares) if profiles else (None, None)):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, data=data: tmp.write_text(json.dumps(data, indent=2) + "\n"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
