import json
import os
import shutil
from pathlib import Path

import pytest

from redlens_compile.cli import main
from redlens_compile.models.demo import build_demo_model


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_optimize_cli_writes_report_and_summary(demo_dir, tmp_path, capsys):
    out = tmp_path / "opt"
    assert main(["optimize", str(demo_dir), "--identity", "--out", str(out), "--repeats", "1",
                 "--max-new-tokens", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["visual_tokens"] == 256
    assert summary["max_abs_logit_diff"] <= 1e-5
    assert summary["generated_tokens_equal"] is True
    assert summary["decoder_prefill_flops_ratio"] == 1.0
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "flops.png", "flops.svg",
                                               "summary.json", "redlens-outputs.json", "optimized"}
    assert (out / "optimized" / "plan.json").is_file()  # the loadable folder: --from, rc.load
    assert "decoder FLOPs" in capsys.readouterr().out
    # what the CLI measured is in the report too (report.md's summary block reads it from there)
    measured = json.loads((out / "report.json").read_text())["measurements"]
    assert measured["prefill_latency_s"]["before"] == summary["prefill_latency_s_before"]
    assert measured["logits"]["all_rows_max_abs_diff"] == summary["all_rows_max_abs_logit_diff"] <= 1e-5
    assert measured["generate"]["tokens_compared"] == summary["generated_tokens_compared"] == 3
    assert measured["generate"]["tokens_matching"] == 3


def test_audit_cli_with_prompt(demo_dir, tmp_path):
    out = tmp_path / "audit"
    assert main(["audit", str(demo_dir), "--prompt", "how many shapes ?", "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["inputs"]["visual_tokens"] == 256
    assert data["config"] is None


BAD_INVOCATIONS = [
    (["audit", "/no/such/dir", "--out", "{out}"], "no such directory"),
    (["audit", "{empty}", "--out", "{out}"], "no config.json"),
    (["optimize", "{llama}", "--out", "{out}"], "no vision_config: not an image-text-to-text model"),
    (["optimize", "{model}", "--config", '{"flops_budget": 2}', "--out", "{out}"], "flops_budget=2"),
    (["optimize", "{model}", "--config", "{not json", "--out", "{out}"], "not valid JSON"),
    (["optimize", "{model}", "--config", "fast", "--out", "{out}"], "unknown config preset 'fast'"),
    (["optimize", "{model}", "--config", "/no/such.json", "--out", "{out}"], "no such file"),
    (["optimize", "{model}", "--identity", "--config", "budget-0.5", "--out", "{out}"],
     "argument --config: not allowed with argument --identity"),
    (["optimize", "{model}", "--identity", "--budget", "0.5", "--out", "{out}"], "not allowed with argument --identity"),
    (["optimize", "{model}", "--budget", "1.5", "--out", "{out}"], "argument --budget: 1.5 is not in (0, 1]"),
    (["optimize", "{model}", "--repeats", "0", "--out", "{out}"], "argument --repeats: 0 is below 1"),
    (["optimize", "{model}", "--max-new-tokens", "0", "--out", "{out}"], "argument --max-new-tokens: 0 is below 1"),
    (["optimize", "{model}", "--out", "{file}"], "a file, not a folder"),
    (["optimize", "{model}", "--out", "{file}/sub"], "is a file, so the folder cannot be made"),
    (["audit", "{model}", "--image", "/no/such.png", "--out", "{out}"], "--image /no/such.png: no such file"),
    (["audit", "{model}", "--image", "{empty}", "--out", "{out}"], "a folder, not an image file"),
    (["demo", "--questions", "-1", "--out", "{out}"], "argument --questions: -1 is below 0"),
    (["codebook", "{model}", "--images", "{empty}", "--out", "{cb}"], "the folder is empty"),
    (["export", "{model}", "--out", "{stale}"], "already holds files"),
    (["export", "{model}", "--identity", "--budget", "0.5", "--out", "{out}"], "not allowed with argument --identity"),
    # outputs: a folder holding a user's file, another command's outputs, an unwritable place
    (["audit", "{model}", "--out", "{user}"], "already holds files redlens-compile did not write (notes.txt)"),
    (["optimize", "{model}", "--identity", "--out", "{audited}"],
     "already holds files of `redlens-compile audit` (its redlens-outputs.json), not of `optimize`"),
    (["audit", "{model}", "--out", "{audited_plus}"], "already holds files the earlier `audit` run did not write (mine.txt)"),
    (["export", "{model}", "--out", "{audited}"], "already holds files of `redlens-compile audit`"),
    (["audit", "{model}", "--out", "/proc/redlens-out/sub"], "--out /proc/redlens-out/sub: /proc is not writable"),
    (["demo", "--out", "/sys/redlens-out"], "--out /sys/redlens-out: /sys is not writable"),
    # inputs: truncated weights, a corrupt image, a missing codebook, prune_keep above the visual count
    (["audit", "{truncated}", "--out", "{out}"], "model.safetensors: its header declares"),
    (["audit", "{model}", "--image", "{corrupt}", "--out", "{out}"], "not a readable image"),
    (["optimize", "{model}", "--config", '{"prune": "codebook", "codebook": "/no/cb.safetensors"}', "--out", "{out}"],
     "codebook /no/cb.safetensors: no such file"),
    (["optimize", "{model}", "--config", '{"prune": "random", "prune_keep": 300, "flops_budget": 1.0}', "--out", "{out}"],
     "prune_keep=300 is above the 256 visual tokens of sample 0"),
    (["optimize", "{model}", "--from", "/no/such/dir", "--out", "{out}"], "/no/such/dir: no such folder"),
    (["optimize", "{model}", "--from", "{badplan}", "--out", "{out}"],
     "plan.json: layers[0].ffn_keep=1.5: must be a fraction with 0 < ffn_keep <= 1"),
    (["optimize", "{model}", "--plan", "{badplan}/plan.json", "--out", "{out}"], "layers[0].ffn_keep=1.5"),
    (["optimize", "{model}", "--from", "{empty}", "--config", "budget-0.5", "--out", "{out}"],
     "argument --config: not allowed with argument --from"),
    (["optimize", "{model}", "--from", "{empty}", "--budget", "0.5", "--out", "{out}"],
     "argument --budget: not allowed with argument --from"),
    (["export", "{model}", "--from", "{empty}", "--out", "{out}"], "manifest.json: missing"),
]
# Some cases are checked on the processed example (the processor and the model's meta-device
# skeleton, no weights read).
# The CLI with transformers' weight loading replaced by an exit: "before any model work" asserted, not timed.
_NO_WEIGHTS_CLI = (
    "import sys\n"
    "from transformers import PreTrainedModel\n"
    "def refuse(*args, **kwargs):\n"
    "    sys.stderr.write('weights loaded before the check\\n'); sys.exit(3)\n"
    "PreTrainedModel.from_pretrained = classmethod(refuse)\n"
    "from redlens_compile.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.parametrize("argv, message", BAD_INVOCATIONS)
def test_bad_invocation_is_one_line_exit_2_before_any_model_work(demo_dir, tmp_path, argv, message):
    import subprocess
    import sys

    from transformers import LlamaConfig

    empty = tmp_path / "empty"
    empty.mkdir()
    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64).save_pretrained(llama)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "old.onnx").write_text("x")
    badplan = tmp_path / "badplan"  # a saved folder whose plan.json was edited by hand
    badplan.mkdir()
    (badplan / "manifest.json").write_text(json.dumps({"format": "redlens-optimized/1"}))
    (badplan / "plan.json").write_text(json.dumps({"layers": {"0": {"ffn_keep": 1.5, "hollow_window": 8}}}))
    out = tmp_path / "out"
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    audited = tmp_path / "audited"  # what an earlier `audit` wrote (its outputs manifest)
    audited.mkdir()
    (audited / "report.md").write_text("# report")
    (audited / "redlens-outputs.json").write_text(json.dumps(
        {"written_by": "redlens-compile", "command": "audit", "files": ["report.md"]}))
    audited_plus = tmp_path / "audited_plus"
    shutil.copytree(audited, audited_plus)
    (audited_plus / "mine.txt").write_text("mine")
    truncated = tmp_path / "truncated"
    shutil.copytree(demo_dir, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    names = {"{model}": str(demo_dir), "{out}": str(out), "{empty}": str(empty), "{llama}": str(llama),
             "{file}": str(tmp_path / "a_file"), "{cb}": str(tmp_path / "cb.safetensors"),
             "{stale}": str(tmp_path / "stale"), "{user}": str(user), "{audited}": str(audited),
             "{audited_plus}": str(audited_plus), "{truncated}": str(truncated),
             "{corrupt}": str(tmp_path / "corrupt.png"), "{badplan}": str(badplan)}
    kept = {d: sorted(p.name for p in Path(d).iterdir()) for d in (user, audited, audited_plus)}
    argv = [names.get(a, a) for a in argv]
    argv = [a.replace("{out}", str(out)).replace("{file}", str(tmp_path / "a_file")).replace("{badplan}", str(badplan))
            for a in argv]
    # Weights loading is made to fail loudly: a check that comes after it cannot pass this test.
    done = subprocess.run([sys.executable, "-c", _NO_WEIGHTS_CLI, *argv], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and message in lines[0] and "error:" in lines[0], lines
    assert not out.exists() or not list(out.iterdir())
    assert not (tmp_path / "cb.safetensors").exists()
    assert {d: sorted(p.name for p in Path(d).iterdir()) for d in kept} == kept  # nothing of theirs touched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left


def test_a_rerun_replaces_the_earlier_outputs_whole(demo_dir, tmp_path, capsys):
    """The same command into the same folder twice: the second run's files, whole, and nothing else."""
    out = tmp_path / "audit"
    assert main(["audit", str(demo_dir), "--prompt", "how many shapes ?", "--out", str(out)]) == 0
    first = json.loads((out / "report.json").read_text())
    assert main(["audit", str(demo_dir), "--prompt", "what colour is the big square on the left ?",
                 "--out", str(out)]) == 0
    second = json.loads((out / "report.json").read_text())
    assert second["inputs"]["seq_len"] > first["inputs"]["seq_len"]  # the second prompt's report
    manifest = json.loads((out / "redlens-outputs.json").read_text())
    assert manifest["command"] == "audit"
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["files"] + ["redlens-outputs.json"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch or old folder left


def test_the_staging_helper_replaces_an_earlier_folder_holding_onnx_files(tmp_path):
    """What a second `make demo` into the same folder does: the earlier run's folder (a report and an
    onnx/ folder with files) replaced whole by the new run's; a failed run leaves the earlier one."""
    from redlens_compile.errors import OutputFolderError
    from redlens_compile.files import check_output_folder, staged_folder

    out = tmp_path / "demo"
    for run in ("first", "second"):
        check_output_folder(out, "demo")
        with staged_folder(out, "demo", error=OutputFolderError) as staging:
            (staging / "summary.json").write_text(json.dumps({"run": run}))
            (staging / "onnx").mkdir()
            (staging / "onnx" / f"decoder_{run}.onnx").write_text(run)
    assert json.loads((out / "summary.json").read_text()) == {"run": "second"}
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["decoder_second.onnx"]
    with pytest.raises(RuntimeError, match="failed"):
        with staged_folder(out, "demo", error=OutputFolderError) as staging:
            (staging / "summary.json").write_text("{}")
            raise RuntimeError("the run failed")
    assert json.loads((out / "summary.json").read_text()) == {"run": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no scratch folder left
    (out / "onnx" / "mine.txt").write_text("a user's file")
    with pytest.raises(OutputFolderError, match=r"did not write \(onnx/mine.txt\)"):
        check_output_folder(out, "demo", error=OutputFolderError)


def test_an_unreachable_budget_is_a_clear_error_and_writes_nothing(demo_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["optimize", str(demo_dir), "--config", '{"flops_budget": 0.05}', "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress bar
    assert last.startswith("redlens-compile: error:") and "flops_budget=0.05 cannot be met" in last
    assert not out.exists()


def test_verbose_is_accepted_after_the_subcommand():
    from redlens_compile.cli import build_parser

    assert build_parser().parse_args(["audit", "m", "--out", "o", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "audit", "m", "--out", "o"]).verbose is True
    assert build_parser().parse_args(["audit", "m", "--out", "o"]).verbose is False


def test_optimize_cli_with_a_budget_reports_layers_and_ratios(demo_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "budget"
    assert main(["optimize", str(demo_dir), "--budget", "0.5", "--out", str(out), "--repeats", "1",
                 "--max-new-tokens", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.45 <= summary["decoder_prefill_flops_ratio"] <= 0.5
    assert summary["config"]["flops_budget"] == 0.5
    assert summary["reduced_layers"]
    printed = capsys.readouterr().out
    assert "reduced layers" in printed and "ffn_keep" in printed and "latency" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["ranking"]["metric"] == "jsd" and report["plan"]["steps"]
    # the last position (what generate reads) is printed; every row's difference stays in report.json
    logits = report["measurements"]["logits"]
    assert logits["last_position_max_abs_diff"] == summary["last_position_max_abs_logit_diff"]
    assert logits["all_rows_max_abs_diff"] == summary["all_rows_max_abs_logit_diff"] >= logits["last_position_max_abs_diff"]
    line = next(line for line in printed.splitlines() if line.startswith("logits"))
    assert line.startswith(f"logits           last position (what generate reads) max abs diff "
                           f"{logits['last_position_max_abs_diff']:.3g}, greedy next token the same in ")
    assert f"{logits['all_rows_max_abs_diff']:.3g}" not in line
    gen = report["measurements"]["generate"]
    assert f"generate         {gen['tokens_matching']} of {gen['tokens_compared']} greedy tokens the same" in printed
    md = (out / "report.md").read_text()
    assert f"max abs diff {logits['last_position_max_abs_diff']:.3g};" in md.split("## Details")[0]

    # The saved plan applied without calibration: the ranking and the planner must not run.
    import redlens_compile.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("ranking or planning ran with --from")

    monkeypatch.setattr(api, "_rank", refuse)
    monkeypatch.setattr(api, "plan_to_budget", refuse)
    again = tmp_path / "again"
    assert main(["optimize", str(demo_dir), "--from", str(out / "optimized"), "--out", str(again), "--repeats", "1",
                 "--max-new-tokens", "2"]) == 0
    loaded = json.loads((again / "summary.json").read_text())
    assert loaded["reduced_layers"] == summary["reduced_layers"]
    assert loaded["decoder_prefill_flops_ratio"] == summary["decoder_prefill_flops_ratio"]
    assert loaded["max_abs_logit_diff"] == summary["max_abs_logit_diff"]  # the same graph on the same prompt
    assert loaded["generated_after"] == summary["generated_after"]
    assert loaded["plan_from"] == str(out / "optimized") and "loaded from" in capsys.readouterr().out
    # export takes the saved plan too: the object it exports is the loaded one (the ONNX export itself,
    # identical for any OptimizedModel, is tested in tests/exporters; here only what it is handed)
    import redlens_compile.exporters.verify as verify

    exported = []

    def onnx_check(opt, *args, **kwargs):
        exported.append(opt)
        return {"onnx_vision_runs_in": "onnx", "onnx_provider": "CPUExecutionProvider",
                "onnx_max_abs_logit_diff": 0.0, "onnx_generated_tokens_equal": True}

    monkeypatch.setattr(verify, "check_onnx", onnx_check)
    assert main(["export", str(demo_dir), "--plan", str(out / "optimized" / "plan.json"), "--out",
                 str(tmp_path / "onnx"), "--max-new-tokens", "2"]) == 0
    (opt,) = exported
    assert opt.loaded_from == out / "optimized"
    assert opt.report.plan["settings"] == summary["reduced_layers"]


@pytest.mark.parametrize("preset, visual_after", [("codebook-0.125", 32), ("fastv-0.25", 64), ("vtw-1", 0)])
def test_optimize_cli_with_a_pruning_preset_prints_the_tokens_kept(tmp_path, capsys, preset, visual_after):
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR

    out = tmp_path / preset
    # The shipped proof model: its codebook sits beside it (the codebook presets load it).
    assert main(["optimize", str(SHIPPED_MODEL_DIR), "--config", preset, "--out", str(out), "--repeats", "1",
                 "--max-new-tokens", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["token_pruning"]["visual_before"] == [256]
    assert summary["token_pruning"]["visual_after"] == [visual_after]
    assert summary["decoder_prefill_flops_ratio"] < 0.75
    assert f"-> [{visual_after}]" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["method"] == preset.split("-")[0]
    # pruning drops rows: every row's difference is not defined, the last position's is
    assert report["measurements"]["logits"]["all_rows_max_abs_diff"] is None
    assert report["measurements"]["logits"]["last_position_max_abs_diff"] == summary["max_abs_logit_diff"]


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2-vl", "internvl", "qwen2.5-vl", "gemma3",
                                    "aya-vision"])
def test_console_script_audits_and_optimizes_a_saved_directory_of_every_family(tmp_path, family):
    """The model and the family's own processor saved together; torchvision is not installed, so the
    video-capable families' processors load without their video part."""
    import subprocess
    import sys
    from pathlib import Path

    from tiny_families import build_and_reload, make_processor

    model_dir = tmp_path / "model"
    make_processor(family, build_and_reload(family, model_dir)).save_pretrained(model_dir)
    script = Path(sys.executable).parent / "redlens-compile"
    assert script.is_file(), "the console script is installed beside the interpreter (pip install -e .)"
    for command in (["audit"], ["optimize", "--identity", "--repeats", "1", "--max-new-tokens", "3"]):
        out = tmp_path / command[0]
        done = subprocess.run([str(script), command[0], str(model_dir), *command[1:], "--out", str(out)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads((out / "report.json").read_text())
        assert report["inputs"]["visual_tokens"] > 0
    summary = json.loads((tmp_path / "optimize" / "summary.json").read_text())
    assert summary["max_abs_logit_diff"] <= 1e-5 and summary["generated_tokens_equal"] is True
    text_config = json.loads((model_dir / "config.json").read_text()).get("text_config", {})
    if "sliding_attention" in (text_config.get("layer_types") or []):  # the prompt (one image) is longer than the window
        assert report["inputs"]["seq_len"] > text_config["sliding_window"]


def test_the_demo_speed_line_times_a_geometry_decoder():
    """The demo's 'expected speed' line: the config's reductions on a random-weight decoder of a
    named geometry (here shrunk by an override so the test is fast), measured and labelled."""
    import re

    from redlens_compile.cli import build_parser, geometry_speed, speed_line
    from redlens_compile.config import RedLensConfig

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    speed = geometry_speed(RedLensConfig(hollow_window=8), "2b", layers=1, image_size=16, repeats=1, overrides=tiny)
    assert (speed["hidden_size"], speed["intermediate_size"], speed["layers"]) == (32, 64, 1)
    assert speed["visual_tokens"] == 64 and speed["config"]["layers"] == "all"
    assert 0 < speed["flops_ratio"] < 1 and speed["latency_ratio"] > 0
    line = speed_line(speed)
    assert re.fullmatch(r"expected speed   Qwen2-VL-2B-geometry decoder \(hidden 32, FFN 64; random weights, 1 layer\(s\), "
                        r"64 visual tokens, ffn_keep 0\.5, window 8 on every layer\): prefill ratio \d+\.\d{3} for "
                        r"FLOPs ratio 0\.\d{3} \(eager torch, this machine, median of 1 interleaved runs; .*\)", line), line
    assert f"FLOPs ratio {speed['flops_ratio']:.3f}" in line
    assert build_parser().parse_args(["demo", "--out", "x", "--speed-geometry", "none"]).speed_geometry == "none"
    assert build_parser().parse_args(["demo", "--out", "x"]).speed_geometry == "2b"
