"""onnxruntime prefill and decode latency against torch eager, original and optimized; prints JSON.

    .venv/bin/python benchmarks/onnx_runtime.py [--layers 2] [--repeats 5] [--rows identity budget-0.5 random-0.25]

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
Latency ratios are ratios of medians from one run; absolute times are this machine's.
"""

from __future__ import annotations

import argparse
import json
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
from redlens_compile.exporters.ort_runner import OnnxRunner  # noqa: E402


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


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
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.TemporaryDirectory()
    model = build_model(args.layers, Path(tmp.name) / "model")
    inputs = make_inputs(1, 64)
    original = None
    runners = {}
    for row in dict.fromkeys(["identity", *args.rows]):
        print(f"{row}: optimize and export ...", file=sys.stderr, flush=True)
        opt = rc.optimize(model, inputs, config=rc.RedLensConfig.preset(row))
        out = opt.export_onnx(Path(tmp.name) / row)
        runner = OnnxRunner(out, model)  # the model serves only what the files run in torch
        runner.sessions = {name: ort.InferenceSession(str(out / g["file"]), session_options(),
                                                      providers=runner.providers)
                           for name, g in runner.manifest["graphs"].items()}
        runners[row] = (opt, runner)
        if original is None:
            original = eager_prefill(model, opt.adapter)
    decoder_inputs = capture_decoder_inputs(model, runners["identity"][0].adapter, inputs)
    results = []
    identity_runner = runners["identity"][1]
    identity_feeds = prefill_feeds(identity_runner, decoder_inputs)
    step_eager = eager_step(model, inputs)
    for row in args.rows:
        opt, runner = runners[row]
        ran_on = runner.decoder_inputs(inputs)
        feeds = prefill_feeds(runner, ran_on)
        _, kv = runner.prefill(ran_on)
        kv = [value.numpy() for value in kv]  # OrtValues where the provider keeps them: host arrays for run()
        step = step_feeds(runner, ran_on, kv)
        timed = {
            "eager_prefill": lambda: original(decoder_inputs),
            "ort_identity_prefill": lambda: identity_runner.sessions["decoder_prefill"].run(None, identity_feeds),
            "ort_prefill": lambda r=runner, f=feeds: r.sessions["decoder_prefill"].run(None, f),
            # what the runner does before the prefill graph: vision, merge, positions, pruning stage
            "front": lambda r=runner: r.decoder_inputs(inputs),
            "pruning_stage": lambda r=runner: r.prune(decoder_inputs) if r.pruning is not None else None,
            "eager_step": step_eager,
            "ort_step": lambda r=runner, f=step: r.sessions["decoder_step"].run(None, f),
        }
        with torch.no_grad():
            medians = interleaved_medians(timed, args.repeats)
        results.append({
            "row": row, "flops_ratio": round(opt.report.flops_ratio, 4), "seq_len": decoder_inputs.seq_len,
            "seq_len_after_pruning": ran_on.seq_len,
            "ort_prefill_over_eager": round(medians["ort_prefill"] / medians["eager_prefill"], 4),
            "ort_prefill_over_ort_identity": round(medians["ort_prefill"] / medians["ort_identity_prefill"], 4),
            "ort_step_over_eager_step": round(medians["ort_step"] / medians["eager_step"], 4),
            "vision_runs_in": runner.manifest["front"]["runs_in"],
            "medians_s": {k: round(v, 5) for k, v in medians.items()},
            "lowering": runner.manifest["lowering"],
        })
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"layers": args.layers, "threads": torch.get_num_threads(), "repeats": args.repeats,
                      "provider": identity_runner.provider, "onnxruntime": ort.__version__, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
