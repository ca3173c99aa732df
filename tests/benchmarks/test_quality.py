"""benchmarks/quality.py end to end on a few questions: its JSON, its table, configs given three ways."""

import json
import subprocess
import sys
from pathlib import Path

from redlens_compile.config import RedLensConfig

ROOT = Path(__file__).resolve().parents[2]


def test_quality_benchmark_rows_for_presets_files_and_json_text(tmp_path):
    config_file = tmp_path / "identity.json"
    config_file.write_text(RedLensConfig.identity().to_json())  # multi-line JSON, as users write it
    json_text = RedLensConfig.identity().to_json()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--questions", "25", "--plot",
         str(tmp_path / "quality.png"), "--configs", "identity", str(config_file), json_text],
        capture_output=True, text=True, check=True, cwd=ROOT)
    report_json, table = done.stdout.rsplit("\n\n", 1)
    rows = json.loads(report_json)["rows"]
    assert [r["name"] for r in rows] == ["original", "image-blind (blank image)", "identity", str(config_file),
                                         "json: identity"]
    # identity configs change no answer: the same accuracy as the original on every type
    for row in rows[2:]:
        assert row["accuracy"] == rows[0]["accuracy"]
        assert abs(row["flops_ratio"] - 1.0) < 1e-9
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)  # header, rule, one line per row: no name spans lines
    assert all(line.count("|") == 9 for line in lines)
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_frontier_keeps_the_points_nothing_beats_and_replot_draws_a_saved_run(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    points = [(0.5, 90.0), (0.2, 80.0), (0.3, 75.0), (1.0, 99.0), (0.6, 89.0), (0.2, 70.0)]
    assert quality.frontier(points) == [(0.2, 80.0), (0.5, 90.0), (1.0, 99.0)]
    assert [quality.method_of(n) for n in ("codebook-0.125", "diverse-0.25-plain", "codebook-0.25+budget-0.2",
                                           "vtw-1", "original")] == [
        "codebook", "diverse plain", "pruning + budget", "vtw", "original"]
    row = lambda name, ratio, acc: {"name": name, "flops_ratio": ratio, "accuracy": {"overall": acc}}  # noqa: E731
    run = {"model_dir": "/x/proof_llava", "questions": 3,
           "rows": [row("original", 1.0, 0.99), row("image-blind (blank image)", None, 0.3),
                    row("codebook-0.25", 0.28, 0.98), row("codebook-0.125", 0.17, 0.97)]}
    saved = tmp_path / "run.txt"
    saved.write_text(json.dumps(run, indent=2) + "\n\n| table |\n")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--replot", str(saved), "--plot",
                    str(tmp_path / "frontier.png")], check=True, cwd=ROOT, capture_output=True)
    assert (tmp_path / "frontier.png").stat().st_size > 0
