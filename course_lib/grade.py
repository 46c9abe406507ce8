"""Grade submitted notebooks (or .py files) with the course's checkers — no nbgrader needed.

    python -m course_lib.grade submissions/*/                  # one folder per student
    python -m course_lib.grade alice/03_tiling_flash_attention.ipynb bob.py --out grades/

Each submission runs in a fresh kernel (a ``.py`` file in a fresh Python), in a temporary folder. Every
checker it calls appends its outcome to a log (``COURSE_LIB_GRADE_LOG``); an exercise scores its points
when a checker call passed, and nothing otherwise. A notebook that raises or loops keeps what it passed
before: cells run on after an error, a cell is interrupted after ``--cell-timeout`` seconds, and each
checker stops the reader's function after ``--timeout`` seconds.

Writes, under ``--out`` (default ``grades/``): ``grades.csv`` (one row per student and exercise:
points, status, the checker's message), ``summary.md`` (readable totals per student and chapter), and
``executed/<student>/`` (the submissions as they ran, outputs included). A submission whose code touches
the checker's machinery (profiler hooks, the grade log, ``course_lib.exercises`` internals) is flagged
for a human to read: in-process checks can be tampered with by code that sets out to (TEACHING.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

__all__ = ["Submission", "ExerciseGrade", "grade", "collect", "run_submission", "main"]

GRADE_LOG_ENV = "COURSE_LIB_GRADE_LOG"
TIME_LIMIT_ENV = "COURSE_LIB_EXERCISE_TIMEOUT"
_CHAPTER = re.compile(r"^((\d\d)[a-z]?)_")  # "04_..." and "04b_...": chapter 4, notebooks "04" and "04b"
_SUSPICIOUS = [
    (
        re.compile(r"\bsys\.(setprofile|settrace|_getframe)|threading\.setprofile|sys\.monitoring"),
        "profiler or frames",
    ),
    (re.compile(GRADE_LOG_ENV), "the grade log"),
    (
        re.compile(
            r"course_lib\.exercises\.(common|guard)|exercises\.RESULTS|import[^\n]*\bRESULTS\b"
            r"|_PASSED_FUNCTIONS|_pop_mode"
        ),
        "checker internals",
    ),
    (re.compile(r"\.__code__\s*=|importlib\.reload|gc\.get_objects|ctypes"), "code or memory surgery"),
]


@dataclass
class Submission:
    """One file of one student."""

    student: str
    path: Path

    @property
    def chapter(self) -> int | None:
        match = _CHAPTER.match(self.path.name)
        return int(match.group(2)) if match else None

    @property
    def notebook(self) -> str | None:
        """The notebook this file is a copy of, by its name's prefix: "04" or "04b" (None for other files)."""
        match = _CHAPTER.match(self.path.name)
        return match.group(1) if match else None


@dataclass
class ExerciseGrade:
    student: str
    file: str
    exercise: str
    kind: str
    title: str
    points: float
    max_points: float
    status: str
    message: str = ""
    seconds: float = 0.0


@dataclass
class RunResult:
    records: list[dict] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    executed: Path | None = None
    flags: list[str] = field(default_factory=list)


def collect(paths: Iterable[str | Path], student: str | None = None) -> list[Submission]:
    """Submissions from files and folders: a folder is one student (its name) with every notebook and
    ``.py`` file directly inside; a chapter file (``NN_*.ipynb``) belongs to the folder it is in; any
    other file is its own student (its stem), unless ``student`` is given."""
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix in (".ipynb", ".py") and not p.name.startswith(".")
            )
            found += [Submission(student or path.resolve().name, p) for p in files]
        elif path.is_file() and path.suffix in (".ipynb", ".py"):
            name = student or (path.resolve().parent.name if _CHAPTER.match(path.name) else path.stem)
            found.append(Submission(name, path))
        else:
            raise ValueError(f"submission {str(path)!r} is not a notebook, a .py file or a folder")
    return found


def _flags(sources: Iterable[str]) -> list[str]:
    text = "\n".join(sources)
    return [label for pattern, label in _SUSPICIOUS if pattern.search(text)]


def _environment(log: Path, time_limit: float) -> dict:
    env = dict(os.environ)
    env[GRADE_LOG_ENV] = str(log)
    env[TIME_LIMIT_ENV] = str(time_limit)
    env["MPLBACKEND"] = "Agg"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _read_log(log: Path) -> list[dict]:
    if not log.exists():
        return []
    records = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _kernel_manager():
    """A kernel of the Python running this command (like nbval's --nbval-current-env)."""
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class CurrentEnvironment(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return self.kernel_spec_class(
                resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict()
            )

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=CurrentEnvironment())


def run_submission(
    submission: Submission,
    *,
    time_limit: float = 60.0,
    cell_timeout: float = 300.0,
    script_timeout: float = 1800.0,
    executed_dir: Path | None = None,
) -> RunResult:
    """Run one submission in a temporary folder and return what its checkers logged."""
    result = RunResult()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="course-grade-") as folder:
        work = Path(folder)
        log = work / "grade_log.jsonl"
        env = _environment(log, time_limit)
        target = work / submission.path.name
        shutil.copyfile(submission.path, target)
        if submission.path.suffix == ".py":
            source = target.read_text(encoding="utf-8", errors="replace")
            result.flags = _flags([source])
            try:
                completed = subprocess.run(
                    [sys.executable, target.name],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=script_timeout,
                )
                if completed.returncode:
                    last = (completed.stderr.strip().splitlines() or ["(no message)"])[-1]
                    result.error = f"the script stopped with exit code {completed.returncode}: {last}"
            except subprocess.TimeoutExpired:
                result.error = f"the script ran past {script_timeout:g} s and was stopped"
        else:
            result.error, result.executed, result.flags = _run_notebook(
                target, work, env, cell_timeout, executed_dir
            )
        result.records = _read_log(log)
    result.seconds = time.perf_counter() - started
    return result


def _run_notebook(target: Path, work: Path, env: dict, cell_timeout: float, executed_dir: Path | None):
    from nbclient import NotebookClient

    try:
        notebook = nbformat.read(target, as_version=4)
    except Exception as error:  # a damaged file scores nothing, with the reason
        return f"the notebook could not be read: {error}", None, []
    flags = _flags(
        cell.source
        for cell in notebook.cells
        if cell.cell_type == "code" and cell.get("metadata", {}).get("course", {}).get("role") != "checker"
    )
    client = NotebookClient(
        notebook,
        timeout=cell_timeout,
        allow_errors=True,
        interrupt_on_timeout=True,
        km=_kernel_manager(),
        resources={"metadata": {"path": str(work)}},
    )
    error = ""
    try:
        client.execute(env=env)  # passed on to the kernel's launch
    except Exception as failure:  # the kernel died, or could not start: keep what was logged
        first = str(failure).splitlines()[0] if str(failure) else ""
        error = f"the notebook stopped: {type(failure).__name__}: {first}"
    errors = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    if errors and not error:
        names = sorted({o.get("ename", "?") for o in errors})
        error = f"{len(errors)} cell(s) raised ({', '.join(names)}); the notebook ran on past them"
    executed = None
    if executed_dir is not None:
        executed_dir.mkdir(parents=True, exist_ok=True)
        executed = executed_dir / target.name
        nbformat.write(notebook, executed)
    return error, executed, flags


def _exercises():
    from .exercises import iter_exercises

    return list(iter_exercises())


def grade(
    submissions: Sequence[Submission],
    *,
    time_limit: float = 60.0,
    cell_timeout: float = 300.0,
    script_timeout: float = 1800.0,
    out: Path | None = None,
    progress: bool = True,
) -> tuple[list[ExerciseGrade], dict[str, list[str]]]:
    """Run every submission; return one :class:`ExerciseGrade` per student and exercise, and notes
    (errors, flags) per student. Only the exercises of the notebooks a student submitted (or whose
    checkers ran) are listed; one of them whose checker never ran scores 0 ("not run")."""
    exercises = _exercises()
    by_id = {e.id: e for e in exercises}
    students: dict[str, list[Submission]] = {}
    for submission in submissions:
        students.setdefault(submission.student, []).append(submission)
    grades: list[ExerciseGrade] = []
    notes: dict[str, list[str]] = {}
    for student, files in students.items():
        best: dict[str, tuple[dict, str]] = {}
        notebooks: set[str] = set()  # "04", "04b": the notebooks this student handed in
        notes[student] = []
        for submission in files:
            if progress:
                print(f"grading {student}: {submission.path.name} ...", flush=True)
            executed_dir = None if out is None else out / "executed" / _safe(student)
            run = run_submission(
                submission,
                time_limit=time_limit,
                cell_timeout=cell_timeout,
                script_timeout=script_timeout,
                executed_dir=executed_dir,
            )
            if submission.notebook is not None:
                notebooks.add(submission.notebook)
            if run.error:
                notes[student].append(f"{submission.path.name}: {run.error}")
            if run.flags:
                notes[student].append(
                    f"{submission.path.name}: review by hand, it touches {', '.join(run.flags)}"
                )
            for record in run.records:
                exercise = record.get("exercise")
                if exercise not in by_id or record.get("kind") == "predict":
                    continue
                notebooks.add(by_id[exercise].notebook)
                previous = best.get(exercise)
                if previous is None or (
                    record.get("status") == "pass" and previous[0].get("status") != "pass"
                ):
                    best[exercise] = (record, submission.path.name)
        for exercise in exercises:
            if exercise.notebook not in notebooks or not exercise.checker:
                continue  # predict and explain exercises are feedback or graded by hand
            record, file = best.get(exercise.id, ({}, ""))
            status = record.get("status", "not run")
            passed = status == "pass"
            message = (record.get("message") or "") if record else "the checker never ran"
            grades.append(
                ExerciseGrade(
                    student=student,
                    file=file,
                    exercise=exercise.id,
                    kind=exercise.kind,
                    title=exercise.title,
                    points=float(exercise.points) if passed else 0.0,
                    max_points=float(exercise.points),
                    status=status,
                    message=message,
                    seconds=float(record.get("seconds", 0.0)),
                )
            )
    if out is not None:
        write_reports(grades, notes, out)
    return grades, notes


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "student"


def write_reports(grades: Sequence[ExerciseGrade], notes: dict[str, list[str]], out: Path) -> None:
    """``grades.csv`` (one row per student and exercise) and ``summary.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    columns = [
        "student",
        "file",
        "exercise",
        "kind",
        "title",
        "points",
        "max_points",
        "status",
        "message",
        "seconds",
    ]
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in grades:
            writer.writerow({name: getattr(row, name) for name in columns})
    (out / "summary.md").write_text(summary(grades, notes), encoding="utf-8")


def summary(grades: Sequence[ExerciseGrade], notes: dict[str, list[str]]) -> str:
    """A readable report: totals per student and chapter, then each exercise that did not pass."""
    lines = ["# Grades", ""]
    students = list(dict.fromkeys(g.student for g in grades)) + [
        s for s in notes if s not in {g.student for g in grades}
    ]
    lines += ["| student | points | of | exercises passed |", "|---|---:|---:|---:|"]
    for student in students:
        rows = [g for g in grades if g.student == student]
        got, total = sum(g.points for g in rows), sum(g.max_points for g in rows)
        passed = sum(g.status == "pass" for g in rows)
        lines.append(f"| {student} | {got:g} | {total:g} | {passed} / {len(rows)} |")
    for student in students:
        rows = [g for g in grades if g.student == student]
        lines += ["", f"## {student}", ""]
        for chapter in sorted({int(g.exercise.split(".")[0]) for g in rows}):
            in_chapter = [g for g in rows if int(g.exercise.split(".")[0]) == chapter]
            got, total = sum(g.points for g in in_chapter), sum(g.max_points for g in in_chapter)
            marks = " ".join(f"{g.exercise}{'✔' if g.status == 'pass' else '✘'}" for g in in_chapter)
            lines.append(f"- chapter {chapter:02d}: {got:g} / {total:g} — {marks}")
        misses = [g for g in rows if g.status != "pass"]
        if misses:
            lines += ["", "Not passed:", ""]
            for g in misses:
                first, *rest = g.message.splitlines() or [""]
                lines.append(f"- {g.exercise} {g.title}: {g.status} — {first}")
                lines += [f"  - {line.strip()}" for line in rest if line.strip().startswith("hint:")]
        for note in notes.get(student, []):
            lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("submissions", nargs="+", help="notebooks, .py files, or one folder per student")
    parser.add_argument("--out", default="grades", help="folder for grades.csv, summary.md and executed/")
    parser.add_argument("--student", default=None, help="the student's name, for files given one by one")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per exercise's checker (default 60)"
    )
    parser.add_argument(
        "--cell-timeout", type=float, default=300.0, help="seconds per notebook cell (default 300)"
    )
    parser.add_argument(
        "--script-timeout", type=float, default=1800.0, help="seconds per .py file (default 1800)"
    )
    args = parser.parse_args(argv)
    submissions = collect(args.submissions, args.student)
    out = Path(args.out)
    grades, notes = grade(
        submissions,
        time_limit=args.timeout,
        cell_timeout=args.cell_timeout,
        script_timeout=args.script_timeout,
        out=out,
    )
    print(summary(grades, notes).split("\n## ")[0].rstrip())
    print(f"\nwrote {out / 'grades.csv'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
