"""Why token pruning keeps or loses accuracy on the proof task; prints JSON.

    .venv/bin/python benchmarks/pruning_diagnostics.py [--scenes 100] [--images 4] [--configs codebook-0.125 ...]

kept: for each config, on held-out count scenes, the share of object tokens (the grid cells
the objects sit in) the pruning keeps, the count accuracy, and how the wrong answers miss
(over- or undercounts). For `downsample` every cell is in a kept pooled token, so it reports
instead the share of its pooled token an object cell makes up (1 / the pool's tokens, on average).
token_stats: on training-split scenes, the codebook build's per-token statistics (top-1
probability of the token alone, leave-one-out JSD) for object tokens against background
tokens, with the settings the shipped codebook was built with (scripts/build_proof_codebook.py).
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
from redlens_compile.analysis.codebook import CodebookSettings, probe_context, token_statistics  # noqa: E402
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs  # noqa: E402
from redlens_compile.models.demo import ensure_default_model  # noqa: E402
from redlens_compile.models.evaluate import encode_questions  # noqa: E402
from redlens_compile.models.shapes_task import GRID, NUMBERS, sample  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_proof_codebook import SETTINGS as CODEBOOK_FLAGS  # noqa: E402


def scenes(split: str, count: int, qtype: str | None = None, start: int = 0):
    out, index = [], start
    while len(out) < count:
        item, seed = sample(split, index, 1, qtypes=(qtype,) if qtype else ("colour",))
        index += 1
        if item.qas:
            out.append((item, seed))
    return out


def object_cells(item) -> set[int]:
    return {o.row * GRID + o.col for o in item.objects}


def kept_report(model, processor, spec: str, count_scenes) -> dict:
    first, seed = count_scenes[0]
    example = encode_questions(processor, [first.image(seed)], [first.qas[0].question])
    opt = rc.optimize(model, example, config=rc.RedLensConfig.parse(spec))
    hit = total = right = over = under = 0
    share = 0.0
    for item, seed in count_scenes:
        enc = encode_questions(processor, [item.image(seed)], [item.qas[0].question])
        decoder_inputs = capture_decoder_inputs(model, opt.adapter, enc)
        kept = opt.pruning(decoder_inputs).kept
        visual = decoder_inputs.visual_mask[0]
        first_visual = int(visual.nonzero()[0])
        kept_cells = {int(i) - first_visual for i in kept.index[0][kept.valid[0]] if visual[i]}
        cells = object_cells(item)
        if opt.pruning.method == "downsample":
            rows, cols = opt.pruning.grid
            pool = opt.pruning.pool
            def members(cell):  # tokens of the pool that holds `cell`
                r0, c0 = (cell // cols) // pool * pool, (cell % cols) // pool * pool
                return (min(r0 + pool, rows) - r0) * (min(c0 + pool, cols) - c0)
            share += sum(1 / members(c) for c in cells)
            kept_cells = set(range(rows * cols))
        hit += len(cells & kept_cells)
        total += len(cells)
        answer = processor.tokenizer.convert_ids_to_tokens(opt.generate(**enc, max_new_tokens=1)[0, -1:].tolist())[0]
        truth = item.qas[0].answer
        right += answer == truth
        if answer != truth and answer in NUMBERS:
            over += NUMBERS.index(answer) > NUMBERS.index(truth)
            under += NUMBERS.index(answer) < NUMBERS.index(truth)
    n = len(count_scenes)
    extra = {"object_share_of_its_pooled_token": round(share / total, 4)} if opt.pruning.method == "downsample" else {}
    return extra | {"config": spec, "flops_ratio": round(opt.report.flops_ratio, 4), "object_token_recall": round(hit / total, 4),
            "count_accuracy": round(right / n, 4), "overcounts": over / n, "undercounts": under / n}


def token_report(model, processor, images: int) -> dict:
    flags = dict(zip(CODEBOOK_FLAGS[::2], CODEBOOK_FLAGS[1::2]))
    settings = CodebookSettings(prompt=flags["--prompt"], top_k=int(flags["--top-k"]))
    values = {"object": {"top1": [], "jsd": []}, "background": {"top1": [], "jsd": []}}
    for item, seed in scenes("train", images, start=500_000):
        stats = token_statistics(probe_context(model, processor, item.image(seed), settings), settings)
        jsd = stats["jsd_region"] + settings.global_weight * stats["jsd_global"]
        is_object = torch.zeros(jsd.numel(), dtype=torch.bool)
        is_object[list(object_cells(item))] = True
        for kind, rows in (("object", is_object), ("background", ~is_object)):
            values[kind]["top1"].append(stats["top1"][rows])
            values[kind]["jsd"].append(jsd[rows])
    quantiles = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return {kind: {name: [round(float(q), 6) for q in torch.quantile(torch.cat(v).double(), quantiles)]
                   for name, v in stats_.items()} | {"tokens": int(torch.cat(stats_["top1"]).numel())}
            for kind, stats_ in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=100, help="held-out count scenes")
    parser.add_argument("--images", type=int, default=4, help="training scenes for the token statistics")
    parser.add_argument("--configs", nargs="+", default=["codebook-0.125", "codebook-0.125-plain", "random-0.125"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir = ensure_default_model()
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    count_scenes = scenes("test", args.scenes, qtype="count")
    with torch.no_grad():
        result = {"kept": [kept_report(model, processor, spec, count_scenes) for spec in args.configs],
                  "token_stats": {"images": args.images, "quantiles": "10/50/90%",
                                  **token_report(model, processor, args.images)}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
