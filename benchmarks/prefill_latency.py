"""Prefill latency of the eager model vs the optimized model, measured side by side; prints JSON.

    python benchmarks/prefill_latency.py [--config JSON] [--repeats N]

Runs on the bundled default model. Times are medians of interleaved runs on this machine;
`decoder_*` times the decoder alone (eager DecoderWithHead vs the rewritten graph) on the
captured decoder inputs, which isolates the graph from the shared vision path.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import redlens_compile as rc
from redlens_compile.analysis.timing import interleaved_medians
from redlens_compile.cli import _build_inputs
from redlens_compile.models.demo import ensure_default_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", help="RedLensConfig JSON (default: identity)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    config = rc.RedLensConfig.from_json(args.config) if args.config else rc.RedLensConfig.identity()
    torch.set_num_threads(torch.get_num_threads())
    model_dir = ensure_default_model()
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    inputs = _build_inputs(AutoProcessor.from_pretrained(model_dir), None, None)
    opt = rc.optimize(model, inputs, config=config)
    captured = rc.capture(model, inputs)
    dec_args = captured.example.as_args()
    with torch.no_grad():
        medians = interleaved_medians(
            {
                "model_eager": lambda: model(**inputs),
                "model_optimized": lambda: opt(**inputs),
                "decoder_eager": lambda: captured.decoder(*dec_args),
                "decoder_graph": lambda: opt.graph_module(*dec_args),
            },
            args.repeats,
        )
    result = {
        "model": type(model).__name__,
        "seq_len": captured.example.seq_len,
        "visual_tokens": int(captured.example.visual_mask.sum()),
        "config": config.to_dict(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "median_s": medians,
        "model_speedup": medians["model_eager"] / medians["model_optimized"],
        "decoder_speedup": medians["decoder_eager"] / medians["decoder_graph"],
        "decoder_flops_ratio": opt.report.flops_ratio,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
