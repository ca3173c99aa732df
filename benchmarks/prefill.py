"""Prefill latency against FLOPs, measured side by side; prints JSON.

    python benchmarks/prefill.py [--layers 4] [--repeats 5] [--cases a b] [--rows identity budget-0.5 ...]
    python benchmarks/prefill.py --cases a --rows codebook-0.125 random-0.125 fastv-0.125 vtw --decode
    python benchmarks/prefill.py --geometry smolvlm --cases a --rows identity budget-0.5 codebook-0.125 --compile \
        --out benchmarks/results/prefill_smolvlm.json
    python benchmarks/prefill.py --geometry bundled --cases a --rows identity budget-0.5 --onnx --repeats 20 \
        --out benchmarks/results/prefill_bundled.json

A LlavaForConditionalGeneration whose decoder has Qwen2-VL-2B geometry (hidden 1536, FFN 8960,
12 heads, 2 KV heads; `--layers` decoder layers), or with `--geometry smolvlm` SmolVLM-256M's
(hidden 576, FFN 1536, 9 heads, 3 KV heads), random weights, fp32, 2 threads (the geometry code is
redlens_compile/models/geometries.py, which the CLI's speed line reuses). `--geometry bundled` is the
bundled proof model itself (hidden 128, FFN 352, 4 layers, its trained weights and codebook) on
the proof task's prompt with one (a) or four (b) of its pictures, 256 visual tokens each. `--onnx`
adds onnxruntime original (the identity export's decoder_prefill.onnx) and optimized (the row's),
on the decoder inputs the ONNX runner makes (`onnx_latency_ratio`, `onnx_latency_over_flops`; the
sessions run in a worker process of their own and do not spin-wait between runs,
`session.intra_op.allow_spinning` 0). `--compile` adds
compiled original (torch.compile of the eager decoder, dynamic) and compiled optimized
(`OptimizedModel.compile()`, inductor) to the interleaved runs; both compile on a first call
outside the timed runs (`*_compile_s`), and a prompt 7 text tokens longer then runs the compiled
optimized prefill (`recompiles_for_another_length`: graphs compiled for it, 0 expected; the bundled model: a
longer question). Cases:
(a) one image of 1024 visual tokens and 64 text tokens; (b) four images, 4096 visual tokens.

For each row (a config) the decoder prefill is timed as generate runs it
(`OptimizedModel.run_decoder(..., last_position_only=True)`: the token pruning stage where the
row prunes, the rewritten graph(s), logits for the last position only) against the original
eager decoder doing the same (transformers' language model, lm_head on the last position).
Pruning rows: the presets `<method>-<keep>` for codebook, random and fastv (K = 1), and vtw-1. The
codebook of this random-weight model is 64 random prototypes: the rows time the work, they say
nothing of what is kept. Rows that prune before the first layer also time the eager decoder
on the kept rows alone (`eager_on_kept_rows_ratio`): what the shorter sequence costs with no
pruning machinery at all, the floor for the optimized prefill. `--decode` adds the time per generated token after the prefill
(generate of 33 tokens minus generate of 1, over 32), optimized against the original's generate.
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

import redlens_compile as rc
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.analysis.timing import interleaved_medians
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.models.geometries import GEOMETRIES, bundled_inputs, eager_prefill, geometry
from redlens_compile.models.geometries import build_model as build_geometry_model
from redlens_compile.models.geometries import make_inputs as make_geometry_inputs

DEFAULT_ROWS = ("identity", "budget-0.75", "budget-0.5", "ffn-only", "hollow-only")
PRUNING_ROWS = ("codebook-0.25", "codebook-0.125", "random-0.25", "random-0.125", "fastv-0.25", "fastv-0.125", "vtw-1")
ROWS = {name: rc.RedLensConfig.preset(name) for name in DEFAULT_ROWS + PRUNING_ROWS}
CASES = {"a": (1, 64), "b": (4, 64)}  # images of 1024 tokens (the bundled model's: 256), text tokens
GEOMETRY_NAMES = (*GEOMETRIES, "bundled")


def build_model(layers: int, directory: Path, geometry: str = "2b"):
    """The benchmark's model: random weights at a geometry, or the bundled proof model itself
    (its trained weights and its own depth: `layers` is ignored)."""
    if geometry == "bundled":
        from redlens_compile.loading import load_model
        from redlens_compile.models import PROOF_MODEL_DIR

        return load_model(PROOF_MODEL_DIR)
    return build_geometry_model(layers, directory, geometry)


def make_inputs(images: int, text: int, geometry: str = "2b") -> dict:
    """Case inputs: random ids around images of 1024 tokens, or (bundled) the proof task's prompt
    with `images` of its held-out pictures, through its processor (256 tokens each); there a
    `text` beyond the case's asks a longer question (another prompt length)."""
    if geometry == "bundled":
        from redlens_compile.loading import load_processor
        from redlens_compile.models import PROOF_MODEL_DIR

        question = "what colour is the circle ?" if text <= CASES["a"][1] else "what colour is the circle in the picture ?"
        return bundled_inputs(load_processor(PROOF_MODEL_DIR), images, question)
    return make_geometry_inputs(images, text)


def onnx_prefills(opt, model, inputs, directory: Path, identity_opt, worker: "OnnxWorker") -> dict:
    """onnxruntime original / optimized prefill callables: the identity export (the original
    graph in onnxruntime) and this row's export, each on its own decoder inputs (the pruned rows
    where the row prunes), run by the worker process."""
    from redlens_compile.exporters.ort_runner import OnnxRunner

    timed = {}
    for key, o in (("onnx_original", identity_opt), ("onnx_optimized", opt)):
        out = o.export_onnx(directory / key)
        runner = OnnxRunner(out, model)
        graph = runner.manifest["graphs"]["decoder_prefill"]
        feeds = {n: a.numpy() for n, a in zip(graph["inputs"], runner.decoder_inputs(inputs).as_args())}
        timed[key] = worker.load(f"{directory.name}/{key}", out / graph["file"], feeds)
    return timed


class OnnxWorker:
    """onnxruntime sessions in a process of their own, run one at a time on request.

    With the sessions in the benchmark's process the 2B-geometry eager original moved from 1.2 s to
    1.4-2.3 s across the rows of one run (benchmarks/results/prefill_2b_no_compile.json against
    prefill_2b_eager.json); a session's memory and threads now live elsewhere. A timed call is one
    request and its answer over a pipe (well under a millisecond, paid by both onnxruntime rows).
    """

    def __init__(self, threads: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_sessions, args=(child, threads), daemon=True)
        self._process.start()

    def _ask(self, *message):
        self._conn.send(message)
        answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def load(self, key: str, path: Path, feeds: dict):
        """A session of the file at `path` over `feeds` -> the callable that runs it once."""
        self._ask("load", key, str(path), feeds)
        return lambda: self._ask("run", key)

    def drop(self, prefix: str) -> None:
        self._ask("drop", prefix)

    def close(self) -> None:
        self._ask("stop")
        self._process.join(timeout=30)


def _serve_sessions(conn, threads: int) -> None:
    """The worker's loop: load a session, run one, drop a row's sessions, stop."""
    import onnxruntime as ort

    sessions = {}
    while True:
        command, *rest = conn.recv()
        try:
            if command == "load":
                key, path, feeds = rest
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
                # no spin-waiting after a run: interleaved with the other rows' runs, a session's spinning
                # threads took the cores from the next callable (two identical identity files 1.13-1.30x apart)
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sessions[key] = (ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]), feeds)
                conn.send(None)
            elif command == "run":
                session, feeds = sessions[rest[0]]
                session.run(None, feeds)
                conn.send(None)
            elif command == "drop":
                for key in [k for k in sessions if k.startswith(rest[0])]:
                    del sessions[key]
                conn.send(None)
            else:
                conn.send(None)
                return
        except Exception as exc:  # noqa: BLE001 - the benchmark's process raises it
            conn.send(RuntimeError(f"onnxruntime worker: {type(exc).__name__}: {exc}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    parser.add_argument("--decode", action="store_true", help="also time generated tokens after the prefill")
    parser.add_argument("--geometry", default="2b", choices=GEOMETRY_NAMES,
                        help="the decoder's geometry (bundled: the bundled proof model itself, trained weights)")
    parser.add_argument("--onnx", action="store_true",
                        help="also time onnxruntime original (the identity export) and optimized (this row's export)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the original decoder and the optimized prefill under torch.compile (inductor)")
    parser.add_argument("--out", help="also write the JSON here (e.g. benchmarks/results/prefill_smolvlm.json)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and onnxruntime intra-op threads (1: a run pinned to one core beside other work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    model = build_model(args.layers, Path(tmp.name), args.geometry)
    identity_opt = None
    codebook = Codebook(torch.randn(64, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0)),
                        {"model_type": model.config.model_type}).save(Path(tmp.name) / "random_codebook.safetensors")
    results = []
    worker = OnnxWorker(args.threads) if args.onnx else None
    for case in args.cases:
        inputs = make_inputs(*CASES[case], geometry=args.geometry)
        for row in args.rows:
            print(f"case {case}, {row} ...", file=sys.stderr, flush=True)
            config = ROWS[row]
            compile_error, compile_info = None, {}
            if config.prune == "codebook" and args.geometry != "bundled":  # the bundled model has its own
                config = rc.RedLensConfig.from_dict(dict(config.to_dict(), codebook=str(codebook)))
            opt = rc.optimize(model, inputs, config=config)
            decoder_inputs = capture_decoder_inputs(model, opt.adapter, inputs)
            original = eager_prefill(model, opt.adapter)
            timed = {"original": lambda: original(decoder_inputs),
                     "optimized": lambda opt=opt: opt.run_decoder(decoder_inputs, True)}
            if opt.pruning is not None and opt.pruning.after_layer is None:
                # What the shorter sequence costs the eager decoder itself: the floor for a pruned prefill.
                with torch.no_grad():
                    kept_inputs = opt.run_decoder(decoder_inputs, True).ran_on
                timed["eager_on_kept_rows"] = lambda: original(kept_inputs)
            if args.compile:
                compiled_original = torch.compile(original, dynamic=True)
                compiled_opt = rc.optimize(model, inputs, config=config).compile()
                timed["compiled_original"] = lambda: compiled_original(decoder_inputs)
                timed["compiled_optimized"] = lambda: compiled_opt.run_decoder(decoder_inputs, True)
                try:  # compile now (the first call, outside the timed runs), so a failure is recorded
                    compile_info = warm_up_compiled(timed, compiled_opt,
                                                    capture_decoder_inputs(model, opt.adapter, make_inputs(
                                                        CASES[case][0], CASES[case][1] + 7, geometry=args.geometry)))
                except Exception as exc:  # noqa: BLE001 - the row records what failed
                    compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    print(f"compiled rows skipped: {compile_error}", file=sys.stderr, flush=True)
                    del timed["compiled_original"], timed["compiled_optimized"]
            if args.onnx:
                if identity_opt is None or identity_opt[0] != case:
                    identity_opt = (case, rc.optimize(model, inputs, config=rc.RedLensConfig.identity()))
                timed.update(onnx_prefills(opt, model, inputs, Path(tmp.name) / f"onnx_{case}_{row}", identity_opt[1],
                                           worker))
            with torch.no_grad():
                medians = interleaved_medians(timed, args.repeats)
            latency = medians["optimized"] / medians["original"]
            flops = opt.report.flops_ratio
            results.append({
                "case": case, "row": row, "visual_tokens": int(decoder_inputs.visual_mask.sum()),
                "seq_len": decoder_inputs.seq_len, "flops_ratio": round(flops, 4),
                "latency_ratio": round(latency, 4), "latency_over_flops": round(latency / flops, 4),
                "original_s": round(medians["original"], 4), "optimized_s": round(medians["optimized"], 4),
                "eager_on_kept_rows_ratio": round(medians["eager_on_kept_rows"] / medians["original"], 4)
                if "eager_on_kept_rows" in medians else None,
                # compiled optimized / compiled original: the anchor a torch.compile user compares with
                "compiled_latency_ratio": round(medians["compiled_optimized"] / medians["compiled_original"], 4)
                if "compiled_original" in medians else None,
                "compile_error": compile_error,
                **compile_info,
                # onnxruntime optimized / original (the identity export), and its latency / FLOPs
                "onnx_latency_ratio": round(medians["onnx_optimized"] / medians["onnx_original"], 4)
                if "onnx_original" in medians else None,
                "onnx_latency_over_flops": round(medians["onnx_optimized"] / medians["onnx_original"] / flops, 4)
                if "onnx_original" in medians else None,
                "medians_s": {k: round(v, 5) for k, v in medians.items()},
                "compiled_original_over_eager": round(medians["compiled_original"] / medians["original"], 4)
                if "compiled_original" in medians else None,
                "reduced_layers": opt.report.chosen_layers,
                "pruning": None if opt.report.pruning is None else {
                    k: opt.report.pruning[k] for k in ("method", "where", "visual_after", "seq_len_after")},
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            })
            if args.decode:
                results[-1].update(decode_per_token(model, opt, inputs, args.repeats))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            if worker is not None:
                worker.drop(f"onnx_{case}_{row}/")
            del opt  # the next row's optimize must not hold this one's graphs (peak RSS column)
    if worker is not None:
        worker.close()
    layers = model.config.text_config.num_hidden_layers
    record = {"command": " ".join(["benchmarks/prefill.py", *sys.argv[1:]]), "geometry": args.geometry,
              **geometry(args.geometry), "layers": layers,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "results": results}
    print(json.dumps(record, indent=2))
    if args.out:
        from redlens_compile.files import atomic_write
        atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    print()
    print(markdown(results))


def warm_up_compiled(timed: dict, compiled_opt, other_length) -> dict:
    """Compile both compiled rows (their first call) and check that a prompt of another length
    runs the compiled optimized prefill without compiling again -> the row's compile fields
    (seconds of the first calls, compiled graph counts)."""
    import time

    from torch._dynamo.utils import counters

    info = {}
    with torch.no_grad():
        for name in ("compiled_original", "compiled_optimized"):
            start = time.perf_counter()
            timed[name]()
            info[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
        graphs = counters["stats"]["unique_graphs"]
        compiled_opt.run_decoder(other_length, True)
        info["recompiles_for_another_length"] = counters["stats"]["unique_graphs"] - graphs
    return info


def decode_per_token(model, opt, inputs: dict, repeats: int, tokens: int = 32) -> dict:
    """Seconds per generated token after the prefill: (generate of 1 + tokens) - (generate of 1), over tokens."""
    def original(n):  # min_new_tokens: an end-of-sequence token must not cut the run short
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def optimized(n):  # transformers' own generate loop, with the graph prefill
        return lambda: opt.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.no_grad():
        medians = interleaved_medians({"original_1": original(1), "original_n": original(1 + tokens),
                                       "optimized_1": optimized(1), "optimized_n": optimized(1 + tokens)}, repeats)
    before = (medians["original_n"] - medians["original_1"]) / tokens
    after = (medians["optimized_n"] - medians["optimized_1"]) / tokens
    return {"decode_s_per_token_original": round(before, 5), "decode_s_per_token_optimized": round(after, 5),
            "decode_ratio": round(after / before, 4)}


def markdown(results: list[dict]) -> str:
    with_decode = any("decode_ratio" in r for r in results)
    with_floor = any(r.get("eager_on_kept_rows_ratio") is not None for r in results)
    with_compiled = any(r.get("compile_error") or r.get("compiled_latency_ratio") is not None for r in results)
    lines = ["| case | row | FLOPs ratio | latency ratio | latency / FLOPs | original / optimized s | peak RSS GiB |"
             + (" eager on kept rows |" if with_floor else "") + (" compiled latency ratio |" if with_compiled else "")
             + (" decode s/token ratio |" if with_decode else ""),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if with_floor else "") + ("---:|" if with_compiled else "")
             + ("---:|" if with_decode else "")]
    for r in results:
        decode = f" | {r['decode_ratio']:.3f}" if "decode_ratio" in r else (" | n/a" if with_decode else "")
        if with_compiled:
            ratio = r.get("compiled_latency_ratio")
            decode = (f" | {ratio:.3f}" if ratio is not None else " | failed") + decode
        if with_floor:
            floor = r.get("eager_on_kept_rows_ratio")
            decode = (f" | {floor:.3f}" if floor is not None else " | n/a") + decode
        lines.append(f"| ({r['case']}) {r['visual_tokens']} visual of {r['seq_len']} | {r['row']} | "
                     f"{r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} | {r['latency_over_flops']:.3f} | "
                     f"{r['original_s']:.2f} / {r['optimized_s']:.2f} | {r['peak_rss_gib']:.2f}{decode} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
