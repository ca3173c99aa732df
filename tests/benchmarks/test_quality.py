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
