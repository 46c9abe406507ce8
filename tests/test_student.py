"""The student version: solutions gone, stubs in their place, and the checkers fail on the stubs."""

import nbformat
import pytest

from course_lib.student import END, STUB, make_student_notebook, make_student_version, strip_solutions

SOLVED = """def softmax(x):
    ### BEGIN SOLUTION
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)
    ### END SOLUTION

check_softmax(softmax)"""


def test_strip_solutions_keeps_indentation_and_the_checker():
    stripped = strip_solutions(SOLVED)
    assert "torch.exp" not in stripped and "SOLUTION" not in stripped
    assert f"    {STUB}" in stripped
    assert stripped.endswith("check_softmax(softmax)")


def test_unbalanced_markers_are_rejected():
    with pytest.raises(ValueError, match="markers"):
        strip_solutions("### BEGIN SOLUTION\nx = 1\n")


def test_student_version_of_the_real_notebooks(tmp_path):
    written = make_student_version("notebooks", tmp_path)
    assert written, "no notebooks found"
    solutions = 0
    for path in written:
        original = nbformat.read(f"notebooks/{path.name}", as_version=4)
        solutions += sum(c.source.count(END) for c in original.cells if c.cell_type == "code")
        student = nbformat.read(path, as_version=4)
        for cell in student.cells:
            if cell.cell_type == "code":  # markdown may mention the markers when it explains them
                assert "BEGIN SOLUTION" not in cell.source and END not in cell.source
                assert cell.outputs == [] and cell.execution_count is None
    assert solutions >= 4  # notebook 00 has one exercise, notebook 01 at least three


def test_stubbed_exercise_fails_its_checker_and_the_solution_passes():
    from course_lib.exercises import ExerciseFailed

    namespace = {}
    setup = "import torch\nfrom course_lib.exercises.ch00 import check_softmax\n"
    exec(setup + SOLVED, namespace)  # the solution passes
    with pytest.raises(ExerciseFailed, match="not implemented"):
        exec(setup + strip_solutions(SOLVED), {})


def test_source_and_output_must_differ(tmp_path):
    with pytest.raises(ValueError, match="output"):
        make_student_version("notebooks", "notebooks")
    with pytest.raises(ValueError, match="source"):
        make_student_version(tmp_path / "missing", tmp_path / "out")


def test_make_student_notebook_does_not_touch_the_original():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SOLVED)])
    make_student_notebook(notebook)
    assert "torch.exp" in notebook.cells[0].source
