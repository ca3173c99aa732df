import json

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
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "flops.png", "summary.json"}
    assert "decoder FLOPs" in capsys.readouterr().out


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
]


@pytest.mark.parametrize("argv, message", BAD_INVOCATIONS)
def test_bad_invocation_is_one_line_exit_2_before_any_model_work(demo_dir, tmp_path, argv, message):
    import subprocess
    import sys
    import time

    from transformers import LlamaConfig

    empty = tmp_path / "empty"
    empty.mkdir()
    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64).save_pretrained(llama)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "old.onnx").write_text("x")
    out = tmp_path / "out"
    names = {"{model}": str(demo_dir), "{out}": str(out), "{empty}": str(empty), "{llama}": str(llama),
             "{file}": str(tmp_path / "a_file"), "{cb}": str(tmp_path / "cb.safetensors"),
             "{stale}": str(tmp_path / "stale")}
    argv = [names.get(a, a) for a in argv]
    argv = [a.replace("{out}", str(out)).replace("{file}", str(tmp_path / "a_file")) for a in argv]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "redlens_compile.cli", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and message in lines[0] and "error:" in lines[0], lines
    assert seconds < 5.0, f"took {seconds:.1f} s: the check must come before any model work"
    assert not out.exists() or not list(out.iterdir())
    assert not (tmp_path / "cb.safetensors").exists()


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


def test_optimize_cli_with_a_budget_reports_layers_and_ratios(demo_dir, tmp_path, capsys):
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
