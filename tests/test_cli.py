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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["audit", "/no/such/dir", "--out", "x"], "no config.json"),
        (["optimize", "{model}", "--config", '{"flops_budget": 2}', "--out", "x"], "flops_budget=2"),
        (["optimize", "{model}", "--config", '{"flops_budget": 0.05}', "--out", "x"], "flops_budget=0.05 cannot be met"),
        (["audit", "{model}", "--image", "/no/such.png", "--out", "x"], "--image /no/such.png: no such file"),
    ],
)
def test_bad_input_is_one_line_error_and_nonzero_exit(demo_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("{model}", str(demo_dir)).replace("x", str(tmp_path / "o")) if a in ("{model}", "x") else a
            for a in argv]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress bar
    assert last.startswith("redlens-compile: error:") and message in last


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
