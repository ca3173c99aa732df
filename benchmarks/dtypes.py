"""Half precision against the same model in that dtype: bf16 and fp16 on tiny families and the proof model.

    python benchmarks/dtypes.py [--families llava qwen2-vl internvl] [--dtypes bfloat16 float16] [--out benchmarks/results/dtypes.json]

For each (model, dtype, config): the max abs difference of the last position's logits between
the optimized model and the original, both in that dtype (identity: the whole sequence, and it
must be 0), and whether greedy `generate` gives the original's tokens. Tiny families are built from
configs with random weights (tests/tiny_families.py), so a reduction's logit difference there says
nothing about accuracy (benchmarks/quality.py --dtype measures that on the proof task); what the
table shows is that every config runs in that dtype and identity stays bit-exact. Codebook
pruning uses the shipped codebook on the proof model and, on a tiny family, every seventh of its
own example's visual rows as prototypes. Writes JSON to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import redlens_compile as rc  # noqa: E402
from redlens_compile.analysis.codebook_file import Codebook  # noqa: E402
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs  # noqa: E402
from redlens_compile.capture.families import adapter_for  # noqa: E402
from redlens_compile.files import atomic_write  # noqa: E402

CONFIGS = ["identity", "budget-0.5", "codebook-0.25", "random-0.25"]
NEW_TOKENS = 8


def proof_model():
    from redlens_compile.loading import load_model_dir
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR
    from redlens_compile.models.evaluate import encode_questions
    from redlens_compile.models.shapes_task import heldout_questions

    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    items = heldout_questions(3)
    return model, encode_questions(processor, [i for i, _ in items], [qa.question for _, qa in items])


def tiny_model(family: str, scratch: Path):
    from tiny_families import build_and_reload, make_inputs

    model = build_and_reload(family, scratch / family.replace("-", "_"))
    return model, make_inputs(family, model, text_before=5, batch=2, pad_left=(2,))


def config_for(name: str, label: str, model, example, scratch: Path) -> rc.RedLensConfig:
    config = rc.RedLensConfig.preset(name)
    if config.prune == "codebook" and label != "proof model":
        # a tiny family: its own rows as prototypes (the shipped codebook is the proof model's)
        inputs = capture_decoder_inputs(model, adapter_for(model), example)
        rows = inputs.inputs_embeds[0][inputs.visual_mask[0]].float()
        path = Codebook(rows[::7].clone(), {"model_type": model.config.model_type}).save(scratch / f"cb-{label}-{model.dtype}.safetensors".replace(" ", "_"))
        config = rc.RedLensConfig.from_dict(dict(config.to_dict(), codebook=str(path)))
    return config


@torch.no_grad()
def measure(model, example, config: rc.RedLensConfig, name: str) -> dict:
    reference = model(**example).logits
    start = time.time()
    opt = rc.optimize(model, example, config=config)
    logits = opt(**example).logits
    if name == "identity":
        diff = (logits.float() - reference.float()).abs().max().item()
    else:  # pruning keeps other rows: the next token's logits
        diff = (logits[:, -1].float() - reference[:, -1].float()).abs().max().item()
    want = model.generate(**example, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    got = opt.generate(**example, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    return {"config": name, "flops_ratio": opt.report.flops_ratio, "max_abs_logit_diff": diff,
            "logits_finite": bool(torch.isfinite(logits[:, -1]).all()), "tokens_equal": bool(torch.equal(got, want)),
            "seconds": round(time.time() - start, 1)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | dtype | config | FLOPs ratio | max abs logit diff | greedy tokens equal |",
             "|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['config']} | {r['flops_ratio']:.3f} | "
                     f"{r['max_abs_logit_diff']:.3g} | {'yes' if r['tokens_equal'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="*", default=["llava", "qwen2-vl", "internvl"])
    parser.add_argument("--no-proof-model", action="store_true", help="the tiny families only")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float16"], choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dtypes.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        models = [(f, *tiny_model(f, scratch)) for f in args.families]
        if not args.no_proof_model:
            models.append(("proof model", *proof_model()))
        for label, base, example in models:
            for dtype_name in args.dtypes:
                model = base.to(getattr(torch, dtype_name)).eval()
                for name in args.configs:
                    row = dict(model=label, dtype=dtype_name, **measure(model, example,
                                                                        config_for(name, label, model, example, scratch), name))
                    print(json.dumps(row), file=sys.stderr)
                    rows.append(row)
            base.to(torch.float32)
    result = {"rows": rows, "new_tokens": NEW_TOKENS, "torch": torch.__version__}
    atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    print(json.dumps({"rows": rows}, indent=2))
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
