"""The learner's copy: solutions stubbed, answers hidden, outputs cleared, the learner's work kept, and every
checker of the copy saying "not implemented yet" in one line."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from exercise_notebooks import cell_namespace, run_cell
from solution_leaks import leak, solution_regions
from test_notebook_structure import EXERCISES_PENDING

from course_lib.exercises import iter_exercises
from course_lib.student import (
    CODE_STUB,
    HIDE_TAG,
    TEXT_STUB,
    default_output,
    default_source,
    make_student_notebook,
    make_student_version,
    strip_solutions,
)

ROOT = Path(__file__).resolve().parents[1]
B, E = "### BEGIN " + "SOLUTION", "### END " + "SOLUTION"

SOLVED = f"""def softmax(x):
    {B}
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)
    {E}

check_softmax(softmax)"""


def test_strip_solutions_keeps_the_indentation_and_what_surrounds_the_region():
    stripped = strip_solutions(SOLVED)
    assert "torch.exp" not in stripped and "SOLUTION" not in stripped
    for line in CODE_STUB.splitlines():
        assert f"    {line}" in stripped
    assert stripped.startswith("def softmax(x):") and stripped.endswith("check_softmax(softmax)")


def test_several_regions_in_one_cell_are_each_replaced():
    two = SOLVED + "\n\n" + SOLVED.replace("softmax", "other")
    assert strip_solutions(two).count("not implemented yet") == 2


@pytest.mark.parametrize(
    "broken,message",
    [(f"{B}\nx = 1\n", "without"), (f"x = 1\n{E}\n", "without"), (f"{B}\n{B}\n{E}\n", "inside another")],
)
def test_unbalanced_or_nested_markers_are_rejected(broken, message):
    with pytest.raises(ValueError, match=message):
        strip_solutions(broken)


def _notebook():
    return nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "# NBVAL_CHECK_OUTPUT\nprint(1)",
                outputs=[nbformat.v4.new_output("stream", text="1\n")],
                execution_count=1,
            ),
            nbformat.v4.new_code_cell("print(inspect.getsource(answer))", metadata={"tags": [HIDE_TAG]}),
            nbformat.v4.new_code_cell(SOLVED, metadata={"nbgrader": {"solution": True, "checksum": "abc"}}),
            nbformat.v4.new_markdown_cell(f"Why?\n{B}\nBecause of the max.\n{E}"),
        ],
        metadata={"widgets": {"state": {}}},
    )


def test_the_learners_notebook_hides_answers_and_clears_what_ran():
    original = _notebook()
    student = make_student_notebook(original)
    sources = [cell.source for cell in student.cells]
    assert len(student.cells) == 3, "the cell tagged hide-in-student is gone"
    assert sources[0] == "print(1)", "no stored output to compare with, so no NBVAL_CHECK_OUTPUT"
    assert student.cells[0].outputs == [] and student.cells[0].execution_count is None
    assert "not implemented yet" in sources[1] and "torch.exp" not in sources[1]
    assert sources[2] == f"Why?\n{TEXT_STUB}", "an explain exercise's model answer becomes the text stub"
    assert "checksum" not in student.cells[1].metadata["nbgrader"] and "widgets" not in student.metadata
    assert "torch.exp" in original.cells[2].source and len(original.cells) == 4, "the original is unchanged"


def test_existing_copies_are_the_learners_work_and_are_kept(tmp_path):
    source, out = tmp_path / "notebooks", tmp_path / "student"
    source.mkdir()
    nbformat.write(_notebook(), source / "01_x.ipynb")
    assert [p.name for p in make_student_version(source, out)] == ["01_x.ipynb"]
    (out / "01_x.ipynb").write_text("my work")
    nbformat.write(_notebook(), source / "02_y.ipynb")
    assert [p.name for p in make_student_version(source, out)] == ["02_y.ipynb"], "only the new chapter"
    assert (out / "01_x.ipynb").read_text() == "my work"
    assert len(make_student_version(source, out, force=True)) == 2
    assert (out / "01_x.ipynb").read_text() != "my work"


def test_source_and_output_must_differ_and_the_source_exist(tmp_path):
    with pytest.raises(ValueError, match="output"):
        make_student_version("notebooks", "notebooks")
    with pytest.raises(ValueError, match="source"):
        make_student_version(tmp_path / "missing", tmp_path / "out")


def test_the_defaults_point_into_the_course_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_source() == ROOT / "notebooks" and default_output() == ROOT / "student"
    assert (ROOT / ".gitignore").read_text().count("student/") >= 1, "the learner's folder is git-ignored"


@pytest.mark.parametrize("option", ["--out", "--output"])
def test_the_command_works_outside_the_course_folder(tmp_path, option):
    out = tmp_path / "mine"
    result = subprocess.run(
        [sys.executable, "-m", "course_lib.student", option, str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.ipynb"))) == len(list((ROOT / "notebooks").glob("*.ipynb"))) >= 9
    again = subprocess.run(
        [sys.executable, "-m", "course_lib.student", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert "wrote 0 notebooks" in again.stdout and "kept your" in again.stdout


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    make_student_version(ROOT / "notebooks", out)
    return {
        p.name: (nbformat.read(ROOT / "notebooks" / p.name, as_version=4), nbformat.read(p, as_version=4))
        for p in sorted(out.glob("*.ipynb"))
    }


def test_every_solution_region_of_the_course_is_stubbed(student_copy):
    for name, (teacher, student) in student_copy.items():
        regions = sum(len(solution_regions(c.source)) for c in teacher.cells if c.cell_type == "code")
        stubs = sum(c.source.count("not implemented yet") for c in student.cells if c.cell_type == "code")
        assert stubs == regions, name
        for cell in student.cells:
            assert "SOLUTION" not in cell.source or cell.cell_type == "markdown", name
            assert HIDE_TAG not in cell.metadata.get("tags", []), name


def test_no_kept_cell_of_the_learners_copy_holds_a_solution(student_copy):
    for name, (teacher, student) in student_copy.items():
        solutions = [
            (c.metadata.get("course", {}).get("exercise", name), region)  # chapter 09's cells carry none
            for c in teacher.cells
            for region in solution_regions(c.source)
        ]
        assert solutions or Path(name).stem in EXERCISES_PENDING, name
        for cell in student.cells:
            if cell.cell_type != "code" or cell.metadata.get("course", {}).get("role") == "solution":
                continue
            for exercise, solution in solutions:
                assert leak(solution, cell.source) is None, (
                    f"{name}: cell {cell.id} holds exercise {exercise}"
                )


def test_the_leak_detector_finds_a_renamed_copy_and_a_printed_listing():
    solution = "m = torch.maximum(m_a, m_b)\nreturn m, l_a * torch.exp(m_a - m) + l_b * torch.exp(m_b - m)\n"
    renamed = "new = torch.maximum(a, b)\ntotal = x * torch.exp(a - new) + y * torch.exp(b - new)"
    assert leak(solution, renamed)
    printed = (
        "def merge(a, b, x, y):\n    new = torch.maximum(a, b)\n"
        "    return new, x * torch.exp(a - new) + y * torch.exp(b - new)\n"
    )
    assert leak(solution, printed)
    assert leak(solution, "scores = q @ k.T\nprint(torch.exp(scores - 1))") is None


@pytest.mark.parametrize("exercise", [e for e in iter_exercises() if e.kind != "build"], ids=lambda e: e.id)
def test_predict_and_explain_exercises_reach_the_copy_without_their_answers(student_copy, exercise):
    teacher, student = next(
        pair for name, pair in student_copy.items() if name.startswith(f"{exercise.notebook}_")
    )
    roles = {
        c.metadata["course"]["role"]: c
        for c in student.cells
        if c.metadata.get("course", {}).get("exercise") == exercise.id
    }
    if exercise.kind == "explain":
        assert set(roles) == {"statement", "answer"}
        assert (
            roles["answer"].source.rstrip().endswith(TEXT_STUB) and "SOLUTION" not in roles["answer"].source
        )
        model = next(
            c for c in teacher.cells if c.metadata.get("course", {}) == roles["answer"].metadata["course"]
        )
        answer = model.source.split(B)[1].split(E)[0]
        sentences = [part.strip() for part in answer.replace("\n", " ").split(". ") if len(part.strip()) > 40]
        for cell in student.cells:
            assert not any(sentence in cell.source.replace("\n", " ") for sentence in sentences), (
                f"a kept cell repeats the model answer of {exercise.id}"
            )
    else:
        assert set(roles) == {"statement", "prediction", "reveal"}
        assert "= None  # your prediction" in roles["prediction"].source


@pytest.mark.parametrize("exercise", [e for e in iter_exercises() if e.kind == "build"], ids=lambda e: e.id)
def test_each_stubbed_exercise_of_the_copy_says_not_implemented_in_one_line(student_copy, exercise):
    cells = {
        c.metadata["course"]["role"]: c
        for _, student in student_copy.values()
        for c in student.cells
        if c.metadata.get("course", {}).get("exercise") == exercise.id
    }
    namespace = cell_namespace(exercise.id)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        run_cell(cells["solution"].source, namespace, f"stub {exercise.id}")
        exec(cells["checker"].source.rstrip()[:-1] + ", record=False)", namespace)
    assert err.getvalue().strip() == f"✘ Exercise {exercise.id} ({exercise.checker}): not implemented yet"
