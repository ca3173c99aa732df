"""GEMM rates of the shapes the reductions leave, on this machine; prints JSON.

    python benchmarks/gemm_shapes.py [--repeats 7]

Two facts the passes rely on, measured with the benchmark model's FFN geometry (hidden 1536,
FFN 8960), fp32, 2 threads, distinct weights per call (as layers are):
- `orientation`: a linear over R rows as `x @ W.T` (F.linear) against `(W @ x.T).T` with rows
  padded to a multiple of 16 (ops/thin_linear.py), for the up (1536 -> 8960) and down
  (8960 -> 1536) shapes. The thin-linear lowering uses the second over THIN_ROWS.
- `sliced_up`: the dynamic FFN's per-sample up-side product on 1024 visual rows with K kept
  channels, K aligned to 16 or not (passes/dynamic_ffn.py kept_channels).
Rates are GFLOP/s (2 per multiply-add) of the median call.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from redlens_compile.ops.thin_linear import output_major_mm, thin_linear

HIDDEN, FFN = 1536, 8960
ROWS = (64, 128, 167, 192, 256, 512, 1088)
KEPT = (560, 1063, 1064, 1890, 1904, 4480, 4481)


def rate(fn, macs: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(2 * macs / sorted(times)[len(times) // 2] / 1e9, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    weights = {"up": [torch.randn(FFN, HIDDEN, generator=g) for _ in range(3)],
               "down": [torch.randn(HIDDEN, FFN, generator=g) for _ in range(3)]}
    orientation = []
    with torch.no_grad():
        for rows in ROWS:
            for name, ws in weights.items():
                x = torch.randn(rows, ws[0].shape[1], generator=g)
                macs = 3 * rows * ws[0].numel()
                orientation.append({
                    "shape": name, "rows": rows,
                    "x_at_w_t": rate(lambda: [F.linear(x, w) for w in ws], macs, args.repeats),
                    "w_at_x_t_padded": rate(lambda: [output_major_mm(x, w) for w in ws], macs, args.repeats),
                    "thin_linear_takes_it": thin_linear(x, ws[0]).stride(0) == 1,
                })
        sliced_up = []
        x = torch.randn(1, 1024, HIDDEN, generator=g)
        for kept in KEPT:
            channels = torch.sort(torch.randperm(FFN, generator=g)[:kept]).values
            sliced = [w.index_select(0, channels).view(1, kept, HIDDEN).transpose(1, 2) for w in weights["up"]]
            sliced_up.append({"kept": kept, "aligned_16": kept % 16 == 0,
                              "gflops": rate(lambda: [torch.matmul(x, w) for w in sliced], 3 * 1024 * HIDDEN * kept,
                                             args.repeats)})
    print(json.dumps({"threads": torch.get_num_threads(), "repeats": args.repeats, "orientation": orientation,
                      "sliced_up": sliced_up}, indent=2))


if __name__ == "__main__":
    main()
