"""Write the student version of the notebooks: solutions removed, outputs cleared.

Every block between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` becomes
``raise NotImplementedError(...)`` at the block's indentation (the markers nbgrader uses), so
the checker after it fails until the reader writes their own code::

    python -m course_lib.student                      # notebooks/ -> student/
    python -m course_lib.student --source notebooks --output /tmp/student
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import nbformat

__all__ = ["strip_solutions", "make_student_notebook", "make_student_version", "main"]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("Your solution here")'
_BLOCK = re.compile(rf"^([ \t]*){re.escape(BEGIN)}[^\n]*\n.*?^[ \t]*{re.escape(END)}[^\n]*$", re.S | re.M)


def strip_solutions(source: str) -> str:
    """Replace each solution block of one cell's source by a stub at the same indentation."""
    if source.count(BEGIN) != source.count(END):
        raise ValueError(
            f"source has {source.count(BEGIN)} {BEGIN!r} but {source.count(END)} {END!r} markers"
        )
    return _BLOCK.sub(lambda match: f"{match.group(1)}{STUB}", source)


def make_student_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``notebook`` with solutions stubbed and every output cleared."""
    student = nbformat.from_dict(notebook)
    for cell in student.cells:
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source)
            cell.outputs = []
            cell.execution_count = None
    return student


def make_student_version(source: str | Path = "notebooks", output: str | Path = "student") -> list[Path]:
    """Write the student copy of every ``*.ipynb`` in ``source`` into ``output``."""
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise ValueError(f"source={str(source)!r} must be a folder of notebooks")
    if source.resolve() == output.resolve():
        raise ValueError("output must differ from source, or the solutions would be overwritten")
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(source.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        target = output / path.name
        nbformat.write(make_student_notebook(notebook), target)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.student", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--source", default="notebooks", help="folder with the full notebooks")
    parser.add_argument("--output", default="student", help="folder for the student copies")
    args = parser.parse_args(argv)
    written = make_student_version(args.source, args.output)
    print(f"wrote {len(written)} student notebooks to {args.output}/")
    return written


if __name__ == "__main__":
    main()
