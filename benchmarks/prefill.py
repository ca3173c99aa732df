"""Prefill latency against FLOPs, measured side by side; prints JSON.

    python benchmarks/prefill.py [--layers 4] [--repeats 5] [--cases a b] [--rows identity budget-0.5 ...]

A LlavaForConditionalGeneration whose decoder has Qwen2-VL-2B geometry (hidden 1536, FFN 8960,
12 heads, 2 KV heads; `--layers` decoder layers), random weights, fp32, 2 threads. Cases:
(a) one image of 1024 visual tokens and 64 text tokens; (b) four images, 4096 visual tokens.

For each row (a config) the decoder prefill is timed as generate runs it: the rewritten graph
with logits for the last position only (`OptimizedModel.prefill_graph`) against the original
eager decoder doing the same (transformers' language model, lm_head on the last position).
The two run interleaved on the same inputs, so drift hits both alike; the latency ratio is the
ratio of their medians. The FLOPs ratio is the audit's (decoder layers, fvcore). Peak memory
is the process's peak RSS after the row (it only grows: read it as an upper bound).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

import redlens_compile as rc
from redlens_compile.analysis.timing import interleaved_medians
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs

IMAGE_TOKEN = 1000
VOCAB = 1024  # small: the lm_head of one position is negligible either way, and init stays fast

ROWS = {name: rc.RedLensConfig.preset(name) for name in ("identity", "budget-0.75", "budget-0.5", "ffn-only",
                                                          "hollow-only")}
CASES = {"a": (1, 64), "b": (4, 64)}  # images of 1024 tokens, text tokens


def build_model(layers: int, directory: Path):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=64, patch_size=2, projection_dim=64)  # 32 x 32 = 1024 patches
    text = LlamaConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=8192)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")  # drop CLS: 1024 tokens
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(directory)
    return AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="sdpa").eval()


def make_inputs(images: int, text: int) -> dict:
    g = torch.Generator().manual_seed(images)
    words = lambda n: torch.randint(3, 900, (n,), generator=g)  # noqa: E731
    parts = [words(text // 2)]
    for i in range(images):
        parts.append(torch.full((1024,), IMAGE_TOKEN))
        if i < images - 1:
            parts.append(words(4))
    parts.append(words(text - text // 2))
    ids = torch.cat(parts)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(images, 3, 64, 64, generator=g)}


def eager_prefill(model, adapter):
    language_model, lm_head = adapter.language_model(model), adapter.lm_head(model)

    def run(inputs):
        out = language_model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                             position_ids=inputs.position_ids, use_cache=True)
        return lm_head(out.last_hidden_state[:, -1:])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.layers, Path(tmp))
    results = []
    for case in args.cases:
        inputs = make_inputs(*CASES[case])
        for row in args.rows:
            print(f"case {case}, {row} ...", file=sys.stderr, flush=True)
            opt = rc.optimize(model, inputs, config=ROWS[row])
            decoder_inputs = capture_decoder_inputs(model, opt.adapter, inputs)
            original = eager_prefill(model, opt.adapter)
            with torch.no_grad():
                medians = interleaved_medians({"original": lambda: original(decoder_inputs),
                                               "optimized": lambda: opt.prefill_graph(*decoder_inputs.as_args())},
                                              args.repeats)
            latency = medians["optimized"] / medians["original"]
            flops = opt.report.flops_ratio
            results.append({
                "case": case, "row": row, "visual_tokens": int(decoder_inputs.visual_mask.sum()),
                "seq_len": decoder_inputs.seq_len, "flops_ratio": round(flops, 4),
                "latency_ratio": round(latency, 4), "latency_over_flops": round(latency / flops, 4),
                "original_s": round(medians["original"], 4), "optimized_s": round(medians["optimized"], 4),
                "reduced_layers": opt.report.chosen_layers,
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            })
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            del opt
    print(json.dumps({"layers": args.layers, "threads": torch.get_num_threads(), "repeats": args.repeats,
                      "results": results}, indent=2))
    print()
    print(markdown(results))


def markdown(results: list[dict]) -> str:
    lines = ["| case | row | FLOPs ratio | latency ratio | latency / FLOPs | original / optimized s | peak RSS GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| ({r['case']}) {r['visual_tokens']} visual of {r['seq_len']} | {r['row']} | "
                     f"{r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} | {r['latency_over_flops']:.3f} | "
                     f"{r['original_s']:.2f} / {r['optimized_s']:.2f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
