"""Write the learner's copy of the notebooks: solutions stubbed, answers hidden, outputs cleared.

The solved notebooks in ``notebooks/`` are the teacher's copy. The learner's copy goes into a folder
that git ignores (``student/`` at the top of the course by default, whatever the current directory), so
``git pull`` never overwrites a learner's work; a notebook already there is kept unless ``--force``::

    python -m course_lib.student                     # notebooks/ -> student/ (existing copies kept)
    python -m course_lib.student --out /tmp/class    # somewhere else (--output is the old spelling)
    python -m course_lib.student --force             # replace existing copies (loses the work in them)

What changes, cell by cell (the same as ``nbgrader generate_assignment`` with the shipped
``nbgrader_config.py``):

- in code cells, each region between nbgrader's solution markers becomes :data:`CODE_STUB` at the
  region's indentation (a checker then reports "not implemented yet" in one line);
- in markdown cells (the *explain* exercises' model answers), each region becomes :data:`TEXT_STUB`;
- cells tagged :data:`HIDE_TAG` (worked examples or library listings that show an exercise's answer) are
  left out;
- outputs, execution counts, saved widget state and ``# NBVAL_CHECK_OUTPUT`` markers (nothing is stored
  to compare with) are removed.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import nbformat

__all__ = [
    "BEGIN",
    "END",
    "CODE_STUB",
    "TEXT_STUB",
    "HIDE_TAG",
    "strip_solutions",
    "make_student_notebook",
    "make_student_version",
    "default_source",
    "default_output",
    "main",
]

# nbgrader's markers, spelled in two pieces so that this file holds no marker itself.
BEGIN, END = "### BEGIN " + "SOLUTION", "### END " + "SOLUTION"
CODE_STUB = '# YOUR CODE HERE\nraise NotImplementedError("not implemented yet")'
TEXT_STUB = "YOUR ANSWER HERE"
HIDE_TAG = "hide-in-student"
_CHECK_OUTPUT = re.compile(r"^[ \t]*# NBVAL_CHECK_OUTPUT[ \t]*\n?", re.M)
_COURSE_ROOT = Path(__file__).resolve().parents[1]


def default_source() -> Path:
    """The teacher's notebooks: ``notebooks/`` at the top of the course (found from this file)."""
    return _COURSE_ROOT / "notebooks"


def default_output() -> Path:
    """The learner's folder: ``student/`` at the top of the course (git-ignored)."""
    return _COURSE_ROOT / "student"


def strip_solutions(source: str, stub: str = CODE_STUB) -> str:
    """Replace each solution region of one cell's source by ``stub`` at the region's indentation.

    Markers are recognised the way nbgrader recognises them: any line containing the marker text.
    """
    begin, end = BEGIN.removeprefix("### "), END.removeprefix("### ")
    lines = source.split("\n")
    out: list[str] = []
    inside = False
    for line in lines:
        if begin in line:
            if inside:
                raise ValueError(f"source has a {BEGIN!r} inside another solution region")
            inside = True
            indent = re.match(r"[ \t]*", line).group(0)
            out.extend(indent + stub_line if stub_line else stub_line for stub_line in stub.split("\n"))
        elif end in line:
            if not inside:
                raise ValueError(f"source has an {END!r} without a {BEGIN!r} before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"source has a {BEGIN!r} without an {END!r} after it")
    return "\n".join(out)


def make_student_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``notebook`` as the learner sees it (the original is not changed)."""
    student = nbformat.from_dict(notebook)
    cells = []
    for cell in student.cells:
        if HIDE_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        if cell.cell_type == "code":
            cell.source = _CHECK_OUTPUT.sub("", strip_solutions(cell.source))
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source = strip_solutions(cell.source, TEXT_STUB)
        cell.get("metadata", {}).get("nbgrader", {}).pop("checksum", None)
        cells.append(cell)
    student.cells = cells
    student.metadata.pop("widgets", None)
    return student


def make_student_version(
    source: str | Path | None = None, output: str | Path | None = None, *, force: bool = False
) -> list[Path]:
    """Write the learner's copy of every ``*.ipynb`` in ``source`` into ``output``; return the files written.

    A notebook that already exists in ``output`` is the learner's work: it is kept unless ``force``.
    """
    source = default_source() if source is None else Path(source)
    output = default_output() if output is None else Path(output)
    if not source.is_dir():
        raise ValueError(f"source={str(source)!r} must be a folder of notebooks")
    if source.resolve() == output.resolve():
        raise ValueError("output must differ from source, or the solutions would be overwritten")
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(source.glob("*.ipynb")):
        target = output / path.name
        if target.exists() and not force:
            continue
        notebook = nbformat.read(path, as_version=4)
        nbformat.write(make_student_notebook(notebook), target)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.student", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--source", default=None, help="folder with the solved notebooks (default: notebooks/)"
    )
    parser.add_argument(
        "--out",
        "--output",
        dest="out",
        default=None,
        help="folder for the learner's copy (default: student/ at the top of the course)",
    )
    parser.add_argument("--force", action="store_true", help="replace notebooks that already exist there")
    args = parser.parse_args(argv)
    output = default_output() if args.out is None else Path(args.out)
    source = default_source() if args.source is None else Path(args.source)
    written = make_student_version(source, output, force=args.force)
    kept = sorted({p.name for p in source.glob("*.ipynb")} - {p.name for p in written})
    print(f"wrote {len(written)} notebooks to {output}/")
    if kept:
        print(f"kept your {len(kept)} existing notebooks there (--force replaces them): {', '.join(kept)}")
    return written


if __name__ == "__main__":
    main()
