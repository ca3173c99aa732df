"""Command line: `redlens-compile {audit,optimize,demo,export,codebook}`.

Each command parses its arguments, checks them and its output path before any model work
(files.check_output_folder / check_output_file), calls the package (api.audit, api.optimize or
artifact/saved.py's load, artifact/verify.py's comparison with the original, models/evaluate.py's
task accuracy, exporters/verify.py's ONNX check, analysis/codebook.py's build), writes its
outputs through files.staged_folder and prints what they hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("redlens_compile")

DEFAULT_QUESTION = "what colour is the circle ?"
OPTIMIZED_DIR = "optimized"  # optimize --out DIR writes the loadable folder DIR/optimized


def _check_model_dir(model_dir: str) -> Path:
    """A save_pretrained directory of a supported class: read its config.json before loading anything."""
    from .errors import UnsupportedModelError

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such directory; pass a directory written by save_pretrained")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a directory written by save_pretrained")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileNotFoundError(f"{model_dir}/config.json is not readable JSON: {exc}") from exc
    if "vision_config" not in config:
        # Image-text-to-text configs carry a vision_config; the family itself is checked once loaded.
        architectures = ", ".join(config.get("architectures") or []) or f"model_type {config.get('model_type')!r}"
        raise UnsupportedModelError(
            f"{model_dir} holds {architectures} with no vision_config: not an image-text-to-text model. "
            "redlens-compile optimizes decoder-only image-text-to-text models (the README lists the families)")
    return path


def _load(model_dir: str):
    path = _check_model_dir(model_dir)
    from .loading import load_model_dir

    return load_model_dir(path)  # the processor without its video part where torchvision is missing


def _load_checked(model_dir: str, build, config=None):
    """(model, processor, inputs): the weight files, the example (build(processor)) and the config
    checked before the weights load, on the model's meta-device skeleton (api.check_inputs)."""
    path = _check_model_dir(model_dir)
    from .loading import check_weight_files

    check_weight_files(path)  # before torch loads
    from .api import check_inputs
    from .loading import load_model, load_processor, skeleton_model

    processor = load_processor(path)  # the processor without its video part where torchvision is missing
    inputs = build(processor)
    try:
        skeleton = skeleton_model(path)
    except Exception as exc:  # a class the meta device cannot build: the same checks run once it loads
        logger.info("input checks wait for the weights (%s: %s)", type(exc).__name__, exc)
    else:
        check_inputs(skeleton, inputs, config)
    return load_model(path), processor, inputs


def _build_inputs(processor, image_path: str | None, prompt: str | None) -> dict[str, Any]:
    from PIL import Image

    from .models.demo import demo_image
    from .models.shapes_task import prompt as task_prompt

    if image_path is not None:
        if not Path(image_path).is_file():
            raise FileNotFoundError(f"--image {image_path}: no such file")
        image = Image.open(image_path).convert("RGB")
    else:
        image = demo_image()
    image_token = getattr(processor, "image_token", "<image>")
    text = prompt if prompt is not None else task_prompt(DEFAULT_QUESTION, image_token)
    if image_token not in text:
        text = f"{image_token}\n{text}"
    return dict(processor(images=image, text=text, return_tensors="pt"))


def _config_from_args(args: argparse.Namespace):
    from .config import RedLensConfig

    if getattr(args, "from_dir", None) is not None:
        return _saved_from_args(args).config
    if args.identity:
        config = RedLensConfig.identity()
    elif args.config is not None:
        config = RedLensConfig.parse(args.config)
    else:
        config = RedLensConfig()  # the defaults: flops_budget 0.5, layers chosen by the ranking
    if args.budget is not None:
        config = RedLensConfig.from_dict(dict(config.to_dict(), flops_budget=args.budget))
    if config.codebook is not None:  # a missing or broken codebook before the model loads
        from .errors import CodebookError
        from .files import safetensors_problem

        if not Path(config.codebook).is_file():
            raise CodebookError(f"codebook {config.codebook}: no such file (build one with `redlens-compile codebook`)")
        problem = safetensors_problem(Path(config.codebook))
        if problem is not None:
            raise CodebookError(f"codebook {config.codebook}: {problem}")
    return config


def _saved_from_args(args: argparse.Namespace):
    """--from DIR (or DIR/plan.json): the saved folder, read and validated before the model loads."""
    from .artifact.saved import read_saved

    if getattr(args, "_saved", None) is None:
        args._saved = read_saved(args.from_dir)
    return args._saved


def _optimize_or_load(model, inputs, config, saved, progress=None, engine="local"):
    """optimize with `config`, or (--from) the saved plan applied on these inputs: no ranking, no planning."""
    if saved is not None:
        from .api import load

        return load(saved.directory, model, example_inputs=inputs, progress=progress)
    from .api import optimize

    return optimize(model, inputs, config=config, progress=progress, engine=engine)


def _run_optimize(model, processor, inputs, config, out: Path, max_new_tokens: int, repeats: int,
                  questions: int = 0, onnx: bool = False, command: str = "optimize", saved=None,
                  engine: Any = "local", speed_geometry: str | None = None) -> dict:
    """optimize (or --from: load), the checks against the original (artifact/verify.py; with
    `questions` models/evaluate.py, with `onnx` exporters/verify.py), then every output staged."""
    from tqdm import tqdm

    from .artifact.verify import compare
    from .errors import OutputFolderError
    from .files import staged_folder

    with tqdm(total=6, desc="optimize" if saved is None else "load", unit="step", file=sys.stderr) as bar:
        def progress(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        opt = _optimize_or_load(model, inputs, config, saved, progress, engine=engine)
        bar.update(bar.total - bar.n)

    checked = compare(model, opt, inputs, max_new_tokens=max_new_tokens, repeats=repeats,
                      tokenizer=processor.tokenizer)
    report = opt.report
    summary = {
        "model": report.model["class"],
        "family": report.model["family"],
        "visual_tokens": report.inputs["visual_tokens"],
        "seq_len": report.inputs["seq_len"],
        "config": config.to_dict(),
        "decoder_prefill_flops_before": report.decoder_flops_before,
        "decoder_prefill_flops_after": report.decoder_flops_after,
        "decoder_prefill_flops_ratio": report.flops_ratio,
        "reduced_layers": {str(i): report.plan["settings"][str(i)] for i in report.chosen_layers},
        "token_pruning": report.pruning,
        "ranking": report.ranking,
        "prefill_latency_s_before": checked.prefill_latency_s_before,
        "prefill_latency_s_after": checked.prefill_latency_s_after,
        "reductions_do_not_pay": checked.does_not_pay(report.flops_ratio),
        # kept as it was (every row; the last position where pruning drops rows): the two below say which
        "max_abs_logit_diff": (checked.last_position_max_abs_logit_diff if checked.all_rows_max_abs_logit_diff is None
                               else checked.all_rows_max_abs_logit_diff),
        "last_position_max_abs_logit_diff": checked.last_position_max_abs_logit_diff,
        "all_rows_max_abs_logit_diff": checked.all_rows_max_abs_logit_diff,
        "greedy_next_token_agreement": checked.greedy_next_token_agreement,
        "generated_before": checked.generated_before,
        "generated_after": checked.generated_after,
        "generated_tokens_equal": checked.generated_tokens_equal,
        "generated_tokens_matching": checked.generated_tokens_matching,
        "generated_tokens_compared": checked.generated_tokens_compared,
        "report_dir": str(out),
        "optimized_dir": str(out / OPTIMIZED_DIR),
        "plan_from": str(saved.directory) if saved is not None else None,
    }
    checked.record(report)
    if speed_geometry is not None:
        summary["expected_speed"] = geometry_speed(config, speed_geometry)
    if questions:
        from .models.evaluate import task_accuracy

        summary.update(task_accuracy(model, opt, processor, questions))
        report.add_measurements(accuracy={"questions": questions, "before": summary["accuracy_before"],
                                          "after": summary["accuracy_after"]})
    with staged_folder(out, command, error=OutputFolderError) as staging:  # every output or none
        if onnx:
            from .exporters import verify

            summary.update(verify.check_onnx(opt, model, inputs, staging / "onnx", max_new_tokens))
            summary["onnx_dir"] = str(out / "onnx")
            report.add_measurements(onnx={k: v for k, v in summary.items() if k.startswith("onnx_")})
        report.save(staging)
        opt.save_pretrained(staging / OPTIMIZED_DIR)  # the loadable folder: --from, rc.load
        (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


SPEED_LAYERS = 1
SPEED_IMAGE_SIZE = 32  # (32 / 2)^2 = 256 visual tokens, as many as the bundled model: a few seconds at 2B width
SPEED_VISUAL_TOKENS = (SPEED_IMAGE_SIZE // 2) ** 2
SPEED_TEXT_TOKENS = 64
SPEED_REPEATS = 3
GEOMETRY_LABELS = {"2b": "Qwen2-VL-2B", "smolvlm": "SmolVLM-256M"}


def geometry_speed(config, geometry: str = "2b", layers: int = SPEED_LAYERS, image_size: int = SPEED_IMAGE_SIZE,
                   repeats: int = SPEED_REPEATS, overrides: dict | None = None) -> dict:
    """The prefill latency ratio of `config`'s reductions on a random-weight decoder of `geometry`
    (models/geometries.py; `overrides` replace its fields: tests use a tiny one), `layers` layers,
    one image of (image_size / 2)^2 tokens, optimized / original eager decoder, interleaved medians.
    A small model is dispatch-bound where a real one is not: this is what a model of that size
    should expect."""
    import torch

    from .analysis.timing import interleaved_medians
    from .api import optimize
    from .capture.decoder_inputs import capture_decoder_inputs
    from .config import RedLensConfig
    from .models.geometries import build_model, eager_prefill, geometry as geometry_of, make_inputs

    # The config's own reductions on every layer (no ranking, no planning: a 2B layer's trials would
    # take a minute); the line gives the FLOPs ratio they reach. No codebook of this width exists.
    settings = {**config.to_dict(), "layers": "all", "flops_budget": 1.0}
    if config.prune == "codebook":
        settings.update(prune=None, codebook=None)
    timed_config = RedLensConfig.from_dict(settings)
    model = build_model(layers, name=geometry, image_size=image_size, overrides=overrides)
    inputs = make_inputs(1, SPEED_TEXT_TOKENS, image_size, device=next(model.parameters()).device)
    opt = optimize(model, inputs, config=timed_config)
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, inputs)
    original = eager_prefill(model, opt.adapter)
    with torch.no_grad():
        medians = interleaved_medians({"original": lambda: original(decoder_inputs),
                                       "optimized": lambda: opt.run_decoder(decoder_inputs, True)}, repeats)
    shape = {**geometry_of(geometry), **(overrides or {})}
    return {"geometry": geometry, "label": GEOMETRY_LABELS.get(geometry, geometry), **shape, "layers": layers,
            "visual_tokens": int(decoder_inputs.visual_mask.sum()), "seq_len": decoder_inputs.seq_len,
            "config": timed_config.to_dict(), "repeats": repeats, "flops_ratio": opt.report.flops_ratio,
            "latency_ratio": medians["optimized"] / medians["original"]}


def _reductions_text(config: dict) -> str:
    parts = [f"ffn_keep {config['ffn_keep']:g}", f"window {config['hollow_window']}"]
    if config.get("prune"):
        parts.append(f"{config['prune']} pruning to {config['prune_keep']:g}")
    return ", ".join(parts)


def speed_line(speed: dict) -> str:
    return (f"expected speed   {speed['label']}-geometry decoder (hidden {speed['hidden_size']}, FFN "
            f"{speed['intermediate_size']}; random weights, {speed['layers']} layer(s), {speed['visual_tokens']} visual "
            f"tokens, {_reductions_text(speed['config'])} on every layer): prefill ratio {speed['latency_ratio']:.3f} for FLOPs ratio {speed['flops_ratio']:.3f} "
            f"(eager torch, this machine, median of {speed['repeats']} interleaved runs; the line above is this small "
            "model's own)")


def _print_summary(summary: dict) -> None:
    print(f"model            {summary['model']} ({summary['family']}), {summary['visual_tokens']} visual tokens "
          f"of {summary['seq_len']}")
    print(f"decoder FLOPs    {summary['decoder_prefill_flops_before']:.4g} -> "
          f"{summary['decoder_prefill_flops_after']:.4g} (ratio {summary['decoder_prefill_flops_ratio']:.3f}, fvcore)")
    from .report.reading import layer_settings_text

    layers = summary["reduced_layers"]
    print("reduced layers   " + ("none" if not layers else ", ".join(
        f"{i} ({layer_settings_text(s)})" for i, s in layers.items())))
    pruning = summary.get("token_pruning")
    if pruning:
        chosen = f", keep {pruning['keep']} (chosen by the planner)" if pruning.get("keep_planned") else ""
        print(f"token pruning    {pruning['method']} {pruning['where']}{chosen}: visual tokens "
              f"{pruning['visual_before']} -> "
              f"{pruning['visual_after']}, sequence {pruning['seq_len_before']} -> {pruning['seq_len_after']}")
    before, after = summary["prefill_latency_s_before"], summary["prefill_latency_s_after"]
    print(f"prefill latency  {before * 1e3:.1f} ms -> {after * 1e3:.1f} ms (ratio {after / before:.3f}; median of "
          "interleaved runs, whole model, this machine)")
    if summary.get("reductions_do_not_pay"):
        print(f"note             {summary['reductions_do_not_pay']}")
    if summary.get("expected_speed"):
        print(speed_line(summary["expected_speed"]))
    print(f"logits           last position (what generate reads) max abs diff "
          f"{summary['last_position_max_abs_logit_diff']:.3g}, greedy next token the same in "
          f"{100 * summary['greedy_next_token_agreement']:.3g}% of rows")
    print(f"generate         {summary['generated_tokens_matching']} of {summary['generated_tokens_compared']} greedy "
          f"tokens the same ({'same tokens' if summary['generated_tokens_equal'] else 'tokens differ'}): "
          f"{summary['generated_after']!r}")
    if "accuracy_before" in summary:
        print(f"accuracy         {100 * summary['accuracy_before']['overall']:.1f}% -> "
              f"{100 * summary['accuracy_after']['overall']:.1f}% on {summary['heldout_questions']} held-out questions")
    if "onnx_dir" in summary:
        print(f"onnx             {summary['onnx_dir']} on {summary['onnx_provider']} (vision in "
              f"{summary['onnx_vision_runs_in']}): last-position logits max abs diff "
              f"{summary['onnx_max_abs_logit_diff']:.3g} vs torch, "
              f"{'same tokens' if summary['onnx_generated_tokens_equal'] else 'tokens differ'}")
    print(f"report           {summary['report_dir']}/report.md, report.json, flops.png, flops.svg, summary.json")
    if summary.get("plan_from"):
        print(f"plan             loaded from {summary['plan_from']} (no ranking, no planning)")
    print(f"saved            {summary['optimized_dir']} (load: rc.load(DIR, model), or --from DIR)")


def _check_image_arg(args: argparse.Namespace) -> None:
    image = getattr(args, "image", None)
    if image is None:
        return
    if Path(image).is_dir():
        raise FileNotFoundError(f"--image {image}: a folder, not an image file")
    if not Path(image).is_file():
        raise FileNotFoundError(f"--image {image}: no such file")
    from PIL import Image

    from .errors import InputError

    try:  # decoded now: a corrupt or truncated file fails before the model loads
        with Image.open(image) as picture:
            picture.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"--image {image}: not a readable image ({' '.join(str(exc).split())})") from None


def _check_out(out: str, command: str) -> Path:
    """--out is new, empty or an earlier output of the same command (replaced whole, as listed in its
    outputs manifest), and writable: checked before any model work (files.check_output_folder)."""
    from .errors import OutputFolderError
    from .files import check_output_folder

    return check_output_folder(Path(out), command, error=OutputFolderError)


def cmd_audit(args: argparse.Namespace) -> int:
    _check_image_arg(args)
    out = _check_out(args.out, "audit")
    model, processor, inputs = _load_checked(args.model_dir, lambda p: _build_inputs(p, args.image, args.prompt))
    from .api import audit

    from .errors import OutputFolderError
    from .files import staged_folder

    report = audit(model, inputs)
    with staged_folder(out, "audit", error=OutputFolderError) as staging:
        report.save(staging)
    print(report.summary())
    print(f"report written to {args.out}/report.md, report.json, flops.png, flops.svg")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    config = _config_from_args(args)  # bad configs fail before the model loads
    engine = _engine_from_args(args)
    _check_image_arg(args)
    out = _check_out(args.out, "optimize")
    model, processor, inputs = _load_checked(args.model_dir, lambda p: _build_inputs(p, args.image, args.prompt),
                                             config)
    saved = _saved_from_args(args) if args.from_dir is not None else None
    summary = _run_optimize(model, processor, inputs, config, out, args.max_new_tokens, args.repeats, saved=saved,
                            engine=engine)
    _print_summary(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    engine = _engine_from_args(args)
    out = _check_out(args.out, "demo")  # before torch loads
    from .models.demo import ensure_default_model
    from .models.evaluate import encode_questions
    from .models.shapes_task import heldout_questions

    model_dir = ensure_default_model()
    meta = json.loads((model_dir / "redlens_model.json").read_text())
    print(f"default model    {model_dir} ({meta['weights']} weights)")
    image, qa = heldout_questions(1)[0]
    model, processor, inputs = _load_checked(str(model_dir), lambda p: encode_questions(p, [image], [qa.question]),
                                             config)
    questions = args.questions if meta["weights"] == "trained" else 0  # random weights: accuracy means nothing
    saved = _saved_from_args(args) if args.from_dir is not None else None
    summary = _run_optimize(model, processor, inputs, config, out, args.max_new_tokens, args.repeats, questions,
                            onnx=not args.no_onnx, command="demo", saved=saved, engine=engine,
                            speed_geometry=None if args.speed_geometry == "none" else args.speed_geometry)
    _print_summary(summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    engine = _engine_from_args(args)
    _check_image_arg(args)
    # before any model work: new, empty or an earlier export (export_onnx's manifest says "export")
    out = _check_out(args.out, "export")
    model, processor, inputs = _load_checked(args.model_dir, lambda p: _build_inputs(p, args.image, args.prompt),
                                             config)
    from .exporters.onnx import export_dtype

    # what the files hold, said before the work (a bfloat16 model: float32 unless --dtype float16)
    dtype = str(export_dtype(model.get_input_embeddings().weight.dtype, args.dtype)).removeprefix("torch.")
    print(f"onnx dtype       {dtype}", file=sys.stderr)
    saved = _saved_from_args(args) if args.from_dir is not None else None
    opt = _optimize_or_load(model, inputs, config, saved, engine=engine)
    from .exporters import verify

    check = verify.check_onnx(opt, model, inputs, out, args.max_new_tokens, dtype=dtype)
    files = ", ".join(sorted(p.name for p in out.glob("*.onnx")))
    print(f"onnx             {out}: {files}, redlens.json (vision in {check['onnx_vision_runs_in']})")
    print(f"decoder FLOPs    ratio {opt.report.flops_ratio:.3f} (fvcore, the torch graph)")
    print(f"onnxruntime      {check['onnx_provider']}: last-position logits max abs diff "
          f"{check['onnx_max_abs_logit_diff']:.3g} vs torch, "
          f"{'same tokens' if check['onnx_generated_tokens_equal'] else 'tokens differ'}")
    return 0


def cmd_codebook(args: argparse.Namespace) -> int:
    import torch

    from .analysis.codebook import CodebookSettings, build_codebook, list_images
    from .analysis.ray_engine import image_sources
    from .errors import CodebookError
    from .files import check_output_file

    # Every argument and the output path before the model loads: a bad one fails in seconds.
    engine = _engine_from_args(args)
    out = Path(args.out)
    check_output_file(out, error=CodebookError)
    _check_model_dir(args.model_dir)
    settings = CodebookSettings(**{f: getattr(args, f) for f in CODEBOOK_FIELDS if getattr(args, f) is not None})
    dtype = getattr(torch, args.dtype) if args.dtype else None
    shards = Path(args.shards) if args.shards else out.with_name(out.name + ".shards")
    if engine == "local":
        list_images(args.images)
        model, processor = _load(args.model_dir)
        model = model.to(dtype) if dtype is not None else model
    else:
        image_sources(args.images)  # a folder or a list file; the workers load the model
        model, processor = args.model_dir, None
    codebook = build_codebook(model, processor, args.images, shards, settings, extra_shards=args.extra_shards or (),
                              engine=engine, allow_missing=args.allow_missing, dtype=dtype,
                              on_summary=lambda s: print(f"map              {s.line()}", flush=True))
    codebook.save(out)
    meta = codebook.metadata
    print(f"codebook         {out}: {codebook.prototypes.shape[0]} prototypes of dim {codebook.hidden_size}")
    print(f"from             {meta['images']} images, {meta['visual_tokens']} visual tokens, "
          f"{meta['candidates']} redundant candidates, {meta['image_clusters']} image clusters, "
          f"{meta['recurring_clusters']} recurring in >= {meta['min_images']} images")
    print(f"shards           {shards} (rerun the same command to resume an interrupted build)")
    return 0


# CodebookSettings fields the codebook command takes as --flags (dashes for underscores).
CODEBOOK_FIELDS = ("prompt", "top_k", "top1_threshold", "jsd_threshold", "global_weight", "region_radius",
                   "clusters_per_image", "min_cluster_size", "global_clusters", "min_image_share", "batch_size")


def _engine_from_args(args: argparse.Namespace) -> Any:
    """"local", or the RayEngine the --engine ray flags describe (Ray's import checked now, before any work)."""
    ray_flags = {"address": args.address, "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                 "gpus_per_worker": args.gpus_per_worker}
    if args.engine == "local":
        given = [f"--{k.replace('_', '-')}" for k, v in ray_flags.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --engine ray")
        return "local"
    from .analysis.ray_engine import RayEngine, require_ray

    require_ray()
    return RayEngine(**{k: v for k, v in ray_flags.items() if v is not None})


def _engine_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help=f"where {what} runs: this process (default) or Ray (pip install \"redlens-compile[ray]\")")
    p.add_argument("--address", help="with --engine ray: a running Ray cluster (auto or HOST:PORT, from "
                                     "`ray start --head`); default: a local Ray started and stopped by the command")
    p.add_argument("--workers", type=_int_at_least(1), help="with --engine ray: actors, each one model replica "
                                                             "(default: as many as the cluster's CPUs/GPUs hold)")
    p.add_argument("--cpus-per-worker", type=float, help="with --engine ray: CPUs of each worker (its torch threads; "
                                                         "default 1)")
    p.add_argument("--gpus-per-worker", type=float, help="with --engine ray: GPUs of each worker (default 0: CPU)")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]: the decoder FLOPs ratio after/before")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad arguments print one line naming the problem (no usage block) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="redlens-compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = parser.add_subparsers(dest="command", required=True)
    # -v also after the subcommand; SUPPRESS keeps an absent one from resetting the top-level flag
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log each stage")

    def common(p: argparse.ArgumentParser, with_model: bool = True) -> None:
        if with_model:
            p.add_argument("model_dir", help="a local directory written by save_pretrained (model + processor)")
            p.add_argument("--image", help="an image file (default: a generated test picture)")
            p.add_argument("--prompt", help="the prompt text; the image placeholder is added if missing")
        p.add_argument("--out", required=True, help="output folder for the report")

    def reductions(p: argparse.ArgumentParser) -> None:
        which = p.add_mutually_exclusive_group()
        which.add_argument("--config", help="a preset name (identity, budget-0.75, budget-0.5, ffn-only, hollow-only; "
                                            "token pruning: codebook-0.125, fastv-0.25, random-0.25, vtw-1, ...), "
                                            "JSON text or a JSON file (default: RedLensConfig(), flops_budget 0.5)")
        which.add_argument("--identity", action="store_true", help="RedLensConfig.identity(): change no number")
        which.add_argument("--from", "--plan", dest="from_dir", metavar="DIR",
                           help="a folder written by optimize --out (OUT/optimized) or save_pretrained, or its "
                                "plan.json: apply that plan without calibration (no ranking, no planning)")
        p.add_argument("--budget", type=_budget, help="flops_budget: decoder prefill FLOPs after/before "
                                                      "(overrides --config's; not with --identity)")
        p.add_argument("--max-new-tokens", type=_int_at_least(1), default=8)
        p.add_argument("--repeats", type=_int_at_least(1), default=20, help="timed prefill runs, interleaved (median)")
        _engine_flags(p, "the layer ranking's trials")

    p_audit = sub.add_parser("audit", help="FLOPs audit of the unmodified model", parents=[verbose])
    common(p_audit)
    p_audit.set_defaults(func=cmd_audit)
    p_opt = sub.add_parser("optimize", help="optimize a model and write its audit report", parents=[verbose])
    common(p_opt)
    reductions(p_opt)
    p_opt.set_defaults(func=cmd_optimize)
    p_demo = sub.add_parser("demo", help="optimize the bundled default model (the quick start)", parents=[verbose])
    common(p_demo, with_model=False)
    reductions(p_demo)
    p_demo.add_argument("--questions", type=_int_at_least(0), default=200,
                        help="held-out questions for the accuracy check (0: none)")
    p_demo.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (written to OUT/onnx)")
    p_demo.add_argument("--speed-geometry", choices=("2b", "smolvlm", "none"), default="2b",
                        help="also time the same reduction on a random-weight decoder of this geometry (1 layer, "
                             f"{SPEED_VISUAL_TOKENS} visual tokens; a few seconds): the speed a model of that size "
                             "should expect (none: skip)")
    p_demo.set_defaults(func=cmd_demo)
    p_export = sub.add_parser("export", help="optimize a model and write ONNX files for onnxruntime",
                              parents=[verbose])
    common(p_export)
    reductions(p_export)
    p_export.add_argument("--dtype", choices=["float32", "float16"], default=None,
                          help="what the ONNX files hold (default: the model's dtype; float32 for a bfloat16 model: "
                               "onnxruntime's CPU provider has no bfloat16 kernels)")
    p_export.set_defaults(func=cmd_export)

    p_cb = sub.add_parser("codebook", help="build a redundancy codebook from a folder of calibration images",
                          parents=[verbose])
    p_cb.add_argument("model_dir", help="a local directory written by save_pretrained (model + processor)")
    p_cb.add_argument("--images", required=True, help="a folder of calibration images (png, jpg, ...); with "
                                                      "--engine ray also a list file, one path or URI a line")
    p_cb.add_argument("--out", required=True, help="the codebook file to write (.safetensors; must not exist)")
    p_cb.add_argument("--shards", help="folder of per-image shards (default: OUT.shards); an interrupted build "
                                       "resumes from it")
    p_cb.add_argument("--extra-shards", nargs="*", help="shard folders made elsewhere, merged in")
    _engine_flags(p_cb, "the per-image map")
    p_cb.add_argument("--allow-missing", type=_int_at_least(0), default=0,
                      help="write the codebook although up to N images failed (default 0: every image has a shard)")
    p_cb.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="the model's dtype for the build")
    p_cb.add_argument("--prompt", help="the probe prompt; '{image}' marks the image (default: a describe-in-one-word "
                                       "prompt)")
    for name, kind in (("top_k", int), ("top1_threshold", float), ("jsd_threshold", float),
                       ("global_weight", float), ("region_radius", int), ("clusters_per_image", int),
                       ("min_cluster_size", int), ("global_clusters", int), ("min_image_share", float),
                       ("batch_size", int)):
        p_cb.add_argument("--" + name.replace("_", "-"), type=kind, help="see CodebookSettings")
    p_cb.set_defaults(func=cmd_codebook)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import RedLensError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "identity", False) and args.budget is not None:
        parser.error("argument --budget: not allowed with argument --identity (identity changes no number)")
    if getattr(args, "from_dir", None) is not None and args.budget is not None:
        parser.error("argument --budget: not allowed with argument --from (the saved plan is applied as it is)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (RedLensError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"redlens-compile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
