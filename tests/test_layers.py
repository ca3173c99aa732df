"""The stage layering in pyproject.toml's import-linter contract holds, and a back-edge breaks it."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `root` (only that copy importable: PYTHONPATH is `root`)."""
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env={"PYTHONPATH": str(root), "PATH": ""},
                          capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    run = lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


def test_a_back_edge_breaks_the_contract(tmp_path):
    """The exporter importing the artifact (the circle issue 20 removed) fails the check, naming the edge."""
    shutil.copytree(ROOT / "redlens_compile", tmp_path / "redlens_compile",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.bin"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint(tmp_path).returncode == 0  # the copy alone passes: the failure below is the added edge's
    module = tmp_path / "redlens_compile" / "exporters" / "onnx.py"
    module.write_text(module.read_text() + "\n\ndef _back_edge():\n    from ..artifact.optimized_model import OptimizedModel\n"
                      "    return OptimizedModel\n")
    run = lint(tmp_path)
    assert run.returncode != 0
    assert "redlens_compile.exporters is not allowed to import redlens_compile.artifact" in run.stdout
    assert "redlens_compile.exporters.onnx -> redlens_compile.artifact.optimized_model" in run.stdout


def test_no_stage_writes_a_graph_module_meta_key():
    """Contracts between stages travel as fields (CapturedDecoder.seq_range, CompiledDecoder.key_bias_layers),
    not as graph_module.meta keys; node annotations (capture/annotate.py) are the one node-level channel."""
    import re

    pattern = re.compile(r"\b(graph_module|gm|head_gm|tail_gm|\w+_graph)\.meta\[")
    found = [f"{path.relative_to(ROOT)}:{i}" for path in sorted((ROOT / "redlens_compile").rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
