"""Print the README's table of supported families, from the code's own checks on the test suite's
tiny model of each family (tests/tiny_families.py). tests/capture/test_families.py keeps the
README equal to this output.

    .venv/bin/python scripts/families_table.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def families_table(models: dict) -> str:
    from redlens_compile.capture.families import support_row

    rows = [support_row(model) for model in models.values()]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    from tiny_families import FAMILIES, build_and_reload

    with tempfile.TemporaryDirectory() as tmp:
        models = {name: build_and_reload(name, Path(tmp) / name.replace(".", "_")) for name in FAMILIES}
        print(families_table(models))


if __name__ == "__main__":
    main()
