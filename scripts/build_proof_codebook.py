"""Build the redundancy codebook shipped beside the proof model, with `redlens-compile codebook`.

    python scripts/build_proof_codebook.py [--images 64] [--model proof_llava_12] [--out PATH] [--replace]

--model is a bundled model's name or a model folder (default: the 4-layer proof model); --out
defaults to codebook.safetensors beside that model, where the pruning presets look for it.

Calibration images are training-split scenes of the proof task (never the held-out split the
accuracy is measured on), written as PNG files into a temporary folder that the command reads.

Settings, and why they differ from the paper's defaults:
- prompt: the task's own question format ("what colour is the object ?"); the word-level
  tokenizer knows no "describe".
- top1_threshold 1.0 (the single-token condition off): on this model a background token repeated
  over the whole image is a confident answer ("an empty scene"), so a low top-1 probability does
  not mark redundancy here (benchmarks/pruning_diagnostics.py, training scenes: top-1 median
  0.66 for background tokens, 0.64 for object tokens). The leave-one-out condition separates
  them: JSD median 6e-4 for background, 0.59 for object tokens.
- jsd_threshold 1e-3, top_k 10 (the vocabulary has 48 words, the answers a dozen).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redlens_compile.models.demo import resolve_model_dir  # noqa: E402
from redlens_compile.models.shapes_task import prompt, write_codebook_scenes  # noqa: E402

SETTINGS = ["--prompt", prompt("what colour is the object ?", "{image}"), "--top1-threshold", "1.0",
            "--jsd-threshold", "1e-3", "--top-k", "10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="training-split scenes to calibrate on")
    parser.add_argument("--model", "--model-dir", dest="model", default=None,
                        help="a bundled model's name (proof_llava, proof_llava_12) or a model folder")
    parser.add_argument("--out", default=None, help="default: codebook.safetensors in the model's folder")
    parser.add_argument("--replace", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model)
    out = Path(args.out) if args.out else model_dir / "codebook.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_codebook_scenes(folder, args.images)
        staged = Path(tmp) / "codebook.safetensors"
        command = [sys.executable, "-m", "redlens_compile.cli", "codebook", str(model_dir), "--images", str(folder),
                   "--out", str(staged), *SETTINGS]
        print(" ".join(command[2:5] + ["..."]), file=sys.stderr)
        subprocess.run(command, check=True, cwd=ROOT)
        if out.exists():
            if not args.replace:
                raise SystemExit(f"{out} exists; pass --replace to overwrite it")
            out.unlink()
        shutil.move(staged, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
