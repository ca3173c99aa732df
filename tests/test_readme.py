"""The README walks a newcomer in a fixed order: the top-level sections and their sequence."""

from pathlib import Path

SECTIONS = ["Quick start", "Python API", "CLI", "Supported families", "Layout", "The methods", "Results",
            "The proof model and its training"]


def test_the_readme_sections_come_in_the_newcomer_order():
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    fenced, headings = False, []
    for line in lines:
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("## "):
            headings.append(line[3:].strip())
    assert lines[0].startswith("# redlens-compile")
    assert headings == SECTIONS
