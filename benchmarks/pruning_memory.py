"""Peak memory of the token pruning stage on one long prompt; prints JSON.

    .venv/bin/python benchmarks/pruning_memory.py [--seq 16384] [--dim 4096] [--batch 1] [--text 256]
        [--keep 0.25] [--methods codebook random random-plain fastv] [--out benchmarks/results/pruning_memory.json]

Each case runs in a fresh subprocess: the decoder inputs ([batch, seq, dim] float32 embeddings,
`text` text rows, the rest visual) are built and touched first, then the stage runs once
(TokenPruning.__call__: scores, row selection, gathers, proportional key bias where on). The
stage's peak is the growth of the process's peak resident set (resource.getrusage ru_maxrss)
over that run: everything the stage allocates at once, its outputs included, on the CPU. The
goal is under 1 GB at 16k tokens; the earlier rank-by-comparison held B x S x S tensors
(about 0.8 GB per sample at 16k for one of them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "codebook": dict(method="codebook", proportional=True),
    "codebook-plain": dict(method="codebook", proportional=False),
    "random": dict(method="random", proportional=True),
    "random-plain": dict(method="random", proportional=False),
    "fastv": dict(method="fastv", proportional=False),
}
PROTOTYPES = 256


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(name: str, batch: int, seq: int, dim: int, text: int, keep: float) -> dict:
    import torch

    from redlens_compile.capture.decoder_inputs import DecoderInputs
    from redlens_compile.runtime.token_pruning import TokenPruning

    torch.set_num_threads(2)
    case = CASES[name]
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, seq, dim, generator=g)
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    visual[:, text // 2: seq - text // 2] = True
    inputs = DecoderInputs(embeds, torch.ones(batch, seq, dtype=torch.long),
                           torch.arange(seq)[None].expand(batch, -1).contiguous(), visual)
    attention = torch.rand(batch, seq, generator=g) if case["method"] == "fastv" else None
    prototypes = torch.randn(PROTOTYPES, dim, generator=g) if case["method"] == "codebook" else None
    pruning = TokenPruning(case["method"], keep, prototypes=prototypes, layer=0 if case["method"] == "fastv" else None,
                           proportional=case["proportional"])
    before = _rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        out = pruning(inputs, attention)
    seconds = time.perf_counter() - start
    peak = _rss_mb() - before
    return {"case": name, "batch": batch, "seq": seq, "dim": dim, "visual_per_sample": int(visual[0].sum()),
            "kept_rows": int(out.inputs.seq_len), "peak_mb": round(peak, 1),
            "inputs_mb": round(embeds.numel() * 4 / 2**20, 1), "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the subprocess's own call
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch, args.seq, args.dim, args.text, args.keep)))
        return
    rows = []
    for name in args.methods:
        cmd = [sys.executable, __file__, "--case", name, "--seq", str(args.seq), "--dim", str(args.dim),
               "--batch", str(args.batch), "--text", str(args.text), "--keep", str(args.keep)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"goal_mb": 1024, "within_goal": all(r["peak_mb"] / r["batch"] <= 1024 for r in rows), "runs": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        from redlens_compile.files import atomic_write

        atomic_write(args.out, lambda tmp: tmp.write_text(text + "\n"))


if __name__ == "__main__":
    main()
