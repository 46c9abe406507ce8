"""Every notebook follows the course's shape: stored executed, goals, widgets, exercises, summary.

nbval (run by the same `pytest`) re-executes the notebooks; this module checks what a reader sees
in the stored copy and what COURSE_DESIGN.md asks of every chapter.
"""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted(Path("notebooks").glob("[0-9][0-9]*_*.ipynb"))  # 04b_serving sits after 04
CHAPTERS = [p for p in NOTEBOOKS if not p.name.startswith("00_")]
# Chapters whose exercises are still to be written (none now: 04b's landed with issue 13); a name added here
# skips the exercise checks below.
EXERCISES_PENDING: set[str] = set()


def code_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]


def markdown(notebook) -> str:
    return "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["00_start_here.ipynb", "01_standard_attention.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_executed_top_to_bottom_without_errors(path):
    notebook = nbformat.read(path, as_version=4)
    cells = code_cells(notebook)
    counts = [c.execution_count for c in cells]
    assert None not in counts, f"{path.name}: some code cells were never run"
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: not run top to bottom in a fresh kernel"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: stored error output {errors[0].get('ename')}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_has_goals_widgets_exercises_summary_references(path):
    notebook = nbformat.read(path, as_version=4)
    text = markdown(notebook)
    source = "\n".join(c.source for c in code_cells(notebook))
    assert "After this notebook you can" in text, "learning goals at the top"
    assert "Where this is used" in text
    assert re.search(r"^## Summary", text, re.M) and re.search(r"^## References", text, re.M)
    imports = re.findall(r"^from course_lib\.widgets\.ch\d\d import (\([^)]*\)|[^\n]+)", source, re.M)
    widget_names = {n.strip(" ()\n") for names in imports for n in names.split(",") if n.strip(" ()\n")}
    assert len(widget_names) >= 2, "at least two widgets from course_lib.widgets"
    if path.stem in EXERCISES_PENDING:
        assert "### BEGIN SOLUTION" not in source, (
            f"{path.stem} has exercises now: drop it from EXERCISES_PENDING"
        )
        return
    solutions = source.count("### BEGIN SOLUTION")
    assert solutions >= 1 and solutions == source.count("### END SOLUTION")
    assert "check_" in source and "course_lib.exercises" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_checked_cells_print_something(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in code_cells(notebook):
        if "# NBVAL_CHECK_OUTPUT" in cell.source:
            assert cell.outputs, f"{path.name}: a checked cell has no stored output to compare"
