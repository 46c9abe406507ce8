"""The grading command: submissions collected per student, run in fresh kernels, scored from what their
checkers logged; the teacher's notebooks score full points, the learner's copies zero, a broken copy part.

The tests that run whole chapters take minutes (nine notebooks, twice); they share one grading run.
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from solution_leaks import leak, solution_regions

from course_lib.exercises import iter_exercises
from course_lib.grade import ExerciseGrade, collect, grade, main, summary
from course_lib.student import make_student_notebook, make_student_version

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = [e for e in iter_exercises() if e.checker]  # predict and explain exercises are not auto-graded
POINTS = sum(e.points for e in EXERCISES)


def test_collect_reads_folders_chapter_files_and_loose_files(tmp_path):
    alice = tmp_path / "alice"
    alice.mkdir()
    (alice / "02_x.ipynb").write_text("{}")
    (alice / "notes.txt").write_text("")
    (alice / ".hidden.py").write_text("")
    bob = tmp_path / "bob.py"
    bob.write_text("")
    found = collect([alice, alice / "02_x.ipynb", bob])
    assert [(s.student, s.path.name, s.chapter) for s in found] == [
        ("alice", "02_x.ipynb", 2),
        ("alice", "02_x.ipynb", 2),
        ("bob", "bob.py", None),
    ]
    assert collect([bob], student="carol")[0].student == "carol"
    with pytest.raises(ValueError, match="submission"):
        collect([tmp_path / "missing.pdf"])


def test_the_summary_totals_points_per_student_and_chapter():
    rows = [
        ExerciseGrade("ann", "f", "2.1", "build", "a", 1.0, 1.0, "pass", "✔"),
        ExerciseGrade("ann", "f", "2.2", "build", "b", 0.0, 2.0, "fail", "✘ wrong"),
    ]
    text = summary(rows, {"ann": ["f: 1 cell(s) raised"]})
    assert "| ann | 1 | 3 | 1 / 2 |" in text
    assert (
        "chapter 02: 1 / 3 — 2.1✔ 2.2✘" in text
        and "2.2 b: fail — ✘ wrong" in text
        and "1 cell(s) raised" in text
    )


def _exercise_notebook(cells_by_exercise, extra_cells=()):
    """A small notebook: the teacher's setup cell of chapter 02 and the given exercises' cells."""
    teacher = nbformat.read(ROOT / "notebooks" / "02_memory_hierarchy_and_roofline.ipynb", as_version=4)
    setup = next(c for c in teacher.cells if c.cell_type == "code")
    cells = [setup]
    for exercise, solution in cells_by_exercise.items():
        cell = next(
            c
            for c in teacher.cells
            if c.metadata.get("course", {}) == {"exercise": exercise, "kind": "build", "role": "solution"}
        )
        checker = next(
            c
            for c in teacher.cells
            if c.metadata.get("course", {}).get("exercise") == exercise
            and c.metadata["course"]["role"] == "checker"
        )
        cells += [nbformat.v4.new_code_cell(solution or cell.source, metadata=cell.metadata), checker]
    notebook = nbformat.v4.new_notebook(cells=cells + [nbformat.v4.new_code_cell(s) for s in extra_cells])
    notebook.metadata = teacher.metadata
    return notebook


def test_a_notebook_that_raises_and_loops_scores_what_it_passed(tmp_path):
    wrong = (
        "def attainable(intensity, peak_flops, bandwidth):\n    return max(peak_flops, intensity * bandwidth)"
    )
    folder = tmp_path / "dana"
    folder.mkdir()
    notebook = _exercise_notebook(
        {"2.1": None, "2.2": wrong}, ["1 / 0", "while True:\n    pass", "print('after')"]
    )
    nbformat.write(notebook, folder / "02_memory_hierarchy_and_roofline.ipynb")
    (tmp_path / "erin.py").write_text(
        "import torch\nfrom course_lib.exercises.ch02 import check_gemm_intensity\n"
        "def gemm_ai(M, N, K, b):\n    return 2 * M * N * K / ((M * K + K * N + M * N) * b)\n"
        "check_gemm_intensity(gemm_ai)\nwhile True:\n    pass\n"
    )
    grades, notes = grade(
        collect([folder, tmp_path / "erin.py"]),
        cell_timeout=10,
        script_timeout=60,
        out=tmp_path / "out",
        progress=False,
    )
    dana = {g.exercise: g for g in grades if g.student == "dana"}
    assert set(dana) == {"2.1", "2.2"}, "the chapter's exercises, from the file name"
    assert dana["2.1"].points == 1 and dana["2.1"].status == "pass"
    assert (
        dana["2.2"].points == 0
        and dana["2.2"].status == "fail"
        and "max instead of min" in dana["2.2"].message
    )
    assert any("raised" in note for note in notes["dana"])
    executed = nbformat.read(
        tmp_path / "out" / "executed" / "dana" / "02_memory_hierarchy_and_roofline.ipynb", 4
    )
    assert executed.cells[-1].outputs[0]["text"] == "after\n", (
        "cells run on past an error and an interrupted loop"
    )
    erin = {g.exercise: g for g in grades if g.student == "erin"}
    assert erin["2.1"].points == 1 and any("ran past" in note for note in notes["erin"])
    with open(tmp_path / "out" / "grades.csv") as file:
        rows = list(csv.DictReader(file))
    assert {(r["student"], r["exercise"], r["points"]) for r in rows} >= {
        ("dana", "2.1", "1.0"),
        ("dana", "2.2", "0.0"),
    }
    assert "| dana | 1 | 2 | 1 / 2 |" in (tmp_path / "out" / "summary.md").read_text()


def test_a_submission_that_touches_the_checker_is_flagged(tmp_path):
    script = tmp_path / "mallory.py"
    script.write_text("import os, sys\nsys.setprofile(None)\nprint(os.environ.get('COURSE_LIB_GRADE_LOG'))\n")
    _, notes = grade(collect([script]), script_timeout=60, progress=False)
    assert any("review by hand" in note and "the grade log" in note for note in notes["mallory"])


def test_the_course_notebooks_raise_no_flag():
    from course_lib.grade import _flags

    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        assert _flags(c.source for c in notebook.cells if c.cell_type == "code") == [], path.name
    assert _flags(["from course_lib.exercises import RESULTS"]) == ["checker internals"]
    assert _flags(["sys.setprofile(None)"]) == ["profiler or frames"]


# --- the course's own notebooks: one grading run, several checks -----------------------------------------


def _broken_copy(path: Path, out: Path) -> Path:
    """The teacher's notebook with exercise 3.2 wrong (the mask ignored) and a cell that raises."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        course = cell.metadata.get("course", {})
        if course.get("exercise") == "3.2" and course.get("role") == "solution":
            cell.source = cell.source.replace(
                "scores = scores.masked_fill(~allowed", "scores = scores.masked_fill(allowed & ~allowed"
            )
    notebook.cells.insert(3, nbformat.v4.new_code_cell("raise RuntimeError('a student broke this cell')"))
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out / path.name)
    return out / path.name


@pytest.fixture(scope="module")
def course_run(tmp_path_factory):
    """Grade the teacher's notebooks, the learner's copies and a broken copy in one run."""
    base = tmp_path_factory.mktemp("grading")
    teacher = base / "teacher"
    teacher.mkdir()
    for path in NOTEBOOKS:
        shutil.copy(path, teacher / path.name)
    make_student_version(ROOT / "notebooks", base / "learner")
    broken = _broken_copy(ROOT / "notebooks" / "03_tiling_flash_attention.ipynb", base / "broken")
    out = base / "out"
    grades, notes = grade(collect([teacher, base / "learner", broken]), out=out, progress=False)
    return grades, notes, out


@pytest.mark.slow
def test_the_teachers_notebooks_score_full_points(course_run):
    grades, notes, _ = course_run
    teacher = [g for g in grades if g.student == "teacher"]
    assert len(teacher) == len(EXERCISES)
    assert [g.exercise for g in teacher if g.status != "pass"] == []
    assert sum(g.points for g in teacher) == POINTS
    assert notes["teacher"] == []


@pytest.mark.slow
def test_the_learners_copies_score_zero_and_run_to_the_end(course_run):
    grades, notes, out = course_run
    learner = [g for g in grades if g.student == "learner"]
    assert len(learner) == len(EXERCISES)
    assert {g.status for g in learner} == {"not implemented"} and sum(g.points for g in learner) == 0
    assert notes["learner"] == [], "no cell of the learner's copy raises"
    for path in sorted((out / "executed" / "learner").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        errors = [
            o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
        ]
        assert errors == [], f"{path.name}: {errors[:1]}"
        checkers = [c for c in notebook.cells if c.metadata.get("course", {}).get("role") == "checker"]
        for cell in checkers:
            lines = "".join(o.get("text", "") for o in cell.outputs).strip().splitlines()
            assert len(lines) == 1 and lines[0].endswith("not implemented yet"), (path.name, lines)


@pytest.mark.slow
def test_no_output_of_the_executed_learners_copy_shows_a_solution(course_run):
    _, _, out = course_run
    for path in sorted((out / "executed" / "learner").glob("*.ipynb")):
        teacher = nbformat.read(ROOT / "notebooks" / path.name, as_version=4)
        solutions = [
            (c.metadata["course"]["exercise"], r) for c in teacher.cells for r in solution_regions(c.source)
        ]
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            printed = "\n".join(
                o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs
            )
            for exercise, solution in solutions:
                assert leak(solution, printed) is None, f"{path.name}, cell {cell.id}: exercise {exercise}"


@pytest.mark.slow
def test_a_broken_submission_scores_part_without_crashing_the_grader(course_run):
    grades, notes, out = course_run
    broken = {g.exercise: g for g in grades if g.student == "broken"}
    assert set(broken) == {e.id for e in EXERCISES if e.chapter == 3}
    assert broken["3.2"].points == 0 and broken["3.2"].status == "fail"
    assert all(broken[e].status == "pass" for e in ("3.1", "3.3", "3.4"))
    assert 0 < sum(g.points for g in broken.values()) < sum(g.max_points for g in broken.values())
    assert any("RuntimeError" in note for note in notes["broken"])
    rows = list(csv.DictReader(open(out / "grades.csv")))
    assert {r["student"] for r in rows} == {"teacher", "learner", "broken"}


def test_the_command_line_writes_the_reports(tmp_path, capsys):
    notebook = _exercise_notebook({"2.2": None})
    nbformat.write(notebook, tmp_path / "02_memory_hierarchy_and_roofline.ipynb")
    assert (
        main(
            [
                str(tmp_path / "02_memory_hierarchy_and_roofline.ipynb"),
                "--student",
                "fay",
                "--out",
                str(tmp_path / "report"),
                "--timeout",
                "30",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| fay | 1 | 2 | 1 / 2 |" in printed, (
        "2.1 is in the chapter but not in the notebook: not run"
        and (tmp_path / "report" / "grades.csv").exists()
    )


# --- nbgrader (an optional extra) ------------------------------------------------------------------------


def _nbgrader() -> str | None:
    import os

    for candidate in (
        os.environ.get("COURSE_LIB_NBGRADER"),
        shutil.which("nbgrader"),
        str(ROOT / ".venv-nbgrader" / "bin" / "nbgrader"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.mark.skipif(
    _nbgrader() is None,
    reason="nbgrader is not installed (pip install nbgrader, or set COURSE_LIB_NBGRADER to its executable)",
)
def test_nbgrader_generate_assignment_makes_the_same_learners_copy(tmp_path):
    course = tmp_path / "course"
    (course / "source" / "all").mkdir(parents=True)
    for path in NOTEBOOKS:
        shutil.copy(path, course / "source" / "all" / path.name)
    shutil.copy(ROOT / "nbgrader_config.py", course / "nbgrader_config.py")
    result = subprocess.run(
        [_nbgrader(), "generate_assignment", "all", "--no-db"],
        cwd=course,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for path in NOTEBOOKS:
        released = nbformat.read(course / "release" / "all" / path.name, as_version=4)
        ours = make_student_notebook(nbformat.read(path, as_version=4))
        strip = lambda s: s.replace("# NBVAL_CHECK_OUTPUT\n", "")  # noqa: E731 - ours drops the marker too
        assert [strip(c.source) for c in released.cells] == [c.source for c in ours.cells], path.name
        checkers = [c for c in released.cells if c.metadata.get("nbgrader", {}).get("grade")]
        assert checkers and all(c.metadata["nbgrader"]["locked"] for c in checkers)
    # nbgrader's copy of a chapter scores zero with the course's grader, and runs on past every stub
    grades, notes = grade(
        collect([course / "release" / "all" / "00_start_here.ipynb"], student="nbgrader"), progress=False
    )
    assert [(g.exercise, g.status, g.points) for g in grades] == [("0.1", "not implemented", 0.0)]
    assert notes["nbgrader"] == []


# --- the learner's copy under nbval, as CI runs the teacher's -------------------------------------------


@pytest.mark.slow
def test_every_learners_notebook_runs_to_the_end_under_nbval(tmp_path):
    make_student_version(ROOT / "notebooks", tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "--nbval-lax",
            "--nbval-current-env",
            "--nbval-sanitize-with",
            str(ROOT / "tests" / "nbval_sanitize.cfg"),
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            *sorted(str(p) for p in tmp_path.glob("*.ipynb")),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert json.dumps(result.stdout).count("passed") >= 1
