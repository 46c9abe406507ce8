"""The checkers: every exercise's reference solution passes, its stub says "not implemented yet" in one line,
calls to the library or a PyTorch shortcut are refused, and each misconception fails with a message that names
it. Then the framework's parts: comparisons and their hints, printing, recording, predictions."""

import importlib
import json
import re
from pathlib import Path

import nbformat
import pytest
import torch
from exercise_mistakes import MISTAKES
from exercise_notebooks import NOTEBOOKS, exercise_cells, solution_functions

from course_lib.exercises import (
    EXERCISES,
    RESULTS,
    ExerciseFailed,
    Mismatch,
    compare,
    compare_exact,
    compare_number,
    iter_exercises,
    predict,
    reveal,
    use_mine_or_library,
)
from course_lib.exercises import predictions as predict_module
from course_lib.exercises.ch02 import check_roofline

TEACHING = (Path(__file__).resolve().parents[1] / "TEACHING.md").read_text(encoding="utf-8")

ALL = list(iter_exercises())
IDS = [e.id for e in ALL]
BUILD = [e for e in ALL if e.kind == "build"]  # the exercises with a checker
BUILD_IDS = [e.id for e in BUILD]
PREDICT = [e for e in ALL if e.kind == "predict"]
EXPLAIN = [e for e in ALL if e.kind == "explain"]
CELLS = exercise_cells()


def checker_of(exercise):
    return getattr(importlib.import_module(exercise.module), exercise.checker)


def stub(*args, **kwargs):
    raise NotImplementedError("not implemented yet")


def test_the_registry_lists_every_exercise_of_chapters_00_to_08():
    assert len(BUILD) >= 28, "the 28 build exercises ported in stage 1 stay"
    assert [e.chapter for e in ALL] == sorted(e.chapter for e in ALL)
    assert {e.chapter for e in BUILD} >= set(range(9))  # 09 where Triton is installed
    for exercise in ALL:
        assert exercise.kind in ("build", "predict", "explain")
        assert exercise.points >= 1 if exercise.kind != "predict" else exercise.points == 0, (
            "build and explain exercises carry points; predictions are feedback only"
        )
        assert bool(exercise.checker) == (exercise.kind == "build")
        assert re.fullmatch(r"[A-Za-z0-9_-]+", exercise.grade_id), "nbgrader accepts only these characters"
    assert set(CELLS) == {e.id for e in ALL}, "every exercise has cells in a notebook, and only those"


@pytest.mark.parametrize("exercise", ALL, ids=[e.id for e in ALL])
def test_each_exercise_lives_in_one_notebook_with_its_kind_in_the_heading(exercise):
    cells = CELLS[exercise.id]
    assert len(set(cells["notebook"])) == 1, f"exercise {exercise.id} is spread over {set(cells['notebook'])}"
    assert len(cells["statement"]) == 1
    assert f"Exercise {exercise.id} ({exercise.kind})" in cells["statement"][0].source
    for role, found in cells.items():
        for cell in found if role != "notebook" else []:
            assert cell.metadata["course"]["kind"] == exercise.kind, (role, cell.source[:60])


@pytest.mark.parametrize("chapter", sorted({e.chapter for e in PREDICT + EXPLAIN}))
def test_a_chapter_with_predict_or_explain_exercises_has_all_three_kinds(chapter):
    kinds = [e.kind for e in ALL if e.chapter == chapter]
    assert len(kinds) >= 5, f"chapter {chapter:02d}: at least 5 exercises"
    assert kinds.count("build") >= 2 and kinds.count("predict") >= 1 and kinds.count("explain") >= 1


@pytest.mark.parametrize("exercise", PREDICT, ids=[e.id for e in PREDICT])
def test_a_predict_exercise_asks_before_it_reveals(exercise):
    cells = CELLS[exercise.id]
    assert [len(cells[role]) for role in ("statement", "prediction", "reveal")] == [1, 1, 1]
    statement, prediction, reveal_cell = cells["statement"][0], cells["prediction"][0], cells["reveal"][0]
    assert statement.cell_type == "markdown" and f"Exercise {exercise.id} (predict)" in statement.source
    assert prediction.cell_type == "code" and reveal_cell.cell_type == "code"
    assert f'predict("{exercise.id}"' in prediction.source and f'reveal("{exercise.id}"' in reveal_cell.source
    assert re.search(r"^\w+ = None  # your prediction", prediction.source, re.M), (
        "the teacher's copy leaves the prediction empty too: the learner's copy keeps this cell as it is"
    )
    assert "SOLUTION" not in prediction.source and "nbgrader" not in prediction.metadata
    notebook = nbformat.read(NOTEBOOKS / cells["notebook"][0], as_version=4)
    order = [c.get("id") for c in notebook.cells]
    assert order.index(statement.id) < order.index(prediction.id) < order.index(reveal_cell.id)
    assert f"**{exercise.id} (predict" in TEACHING, "TEACHING.md holds the model answer"


@pytest.mark.parametrize("exercise", EXPLAIN, ids=[e.id for e in EXPLAIN])
def test_an_explain_exercise_has_a_manually_graded_answer_cell(exercise):
    cells = CELLS[exercise.id]
    assert [len(cells[role]) for role in ("statement", "answer")] == [1, 1]
    statement, answer = cells["statement"][0], cells["answer"][0]
    assert statement.cell_type == "markdown" and f"Exercise {exercise.id} (explain)" in statement.source
    assert answer.cell_type == "markdown"
    assert answer.metadata["nbgrader"] == {
        "grade": True,
        "grade_id": exercise.grade_id,
        "locked": False,
        "points": exercise.points,
        "schema_version": 3,
        "solution": True,
        "task": False,
    }
    assert answer.source.count("### BEGIN SOLUTION") == 1 and answer.source.count("### END SOLUTION") == 1
    model = answer.source.split("### BEGIN SOLUTION")[1].split("### END SOLUTION")[0]
    assert len(model.split()) >= 60, "the teacher's copy holds a model answer"
    assert f"**{exercise.id} (explain" in TEACHING, (
        "TEACHING.md holds the model answer and what it must mention"
    )


@pytest.mark.parametrize("exercise", BUILD, ids=BUILD_IDS)
def test_the_notebook_holds_a_statement_a_solution_and_a_checker_with_nbgrader_metadata(exercise):
    cells = CELLS[exercise.id]
    assert len(cells["statement"]) == 1 and len(cells["solution"]) == 1 and len(cells["checker"]) == 1
    statement = cells["statement"][0].source
    assert f"Exercise {exercise.id} ({exercise.kind})" in statement, "the kind is named in the heading"
    solution, check = cells["solution"][0], cells["checker"][0]
    assert solution.metadata["nbgrader"] == {
        "grade": False,
        "grade_id": exercise.grade_id + "-solution",
        "locked": False,
        "schema_version": 3,
        "solution": True,
        "task": False,
    }
    assert check.metadata["nbgrader"] == {
        "grade": True,
        "grade_id": exercise.grade_id,
        "locked": True,
        "points": exercise.points,
        "schema_version": 3,
        "solution": False,
        "task": False,
    }
    for cell in (solution, check):
        assert cell.metadata["course"]["kind"] == exercise.kind
    assert "### BEGIN SOLUTION" in solution.source and "### END SOLUTION" in solution.source
    assert exercise.checker + "(" in check.source and "SOLUTION" not in check.source


@pytest.mark.parametrize("exercise", BUILD, ids=BUILD_IDS)
def test_the_notebook_solution_passes_on_several_seeds(exercise):
    functions = solution_functions(exercise.id, CELLS[exercise.id])
    for seed in (0, 1, 2, 12345):
        outcome = checker_of(exercise).run(*functions, seed=seed)
        assert outcome, outcome.message
        assert outcome.cases_run == outcome.cases_total >= 2


@pytest.mark.parametrize("exercise", BUILD, ids=BUILD_IDS)
def test_the_stub_says_not_implemented_yet_in_one_line(exercise, capsys):
    functions = solution_functions(exercise.id, CELLS[exercise.id])
    check = checker_of(exercise)
    check(*[stub] * len(functions), record=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"✘ Exercise {exercise.id} ({exercise.checker}): not implemented yet"
    assert check.run(*[stub] * len(functions)).status == "not implemented"


@pytest.mark.parametrize("exercise", BUILD, ids=BUILD_IDS)
def test_every_exercise_refuses_a_call_to_the_course_library(exercise):
    library = [entry for entry in MISTAKES[exercise.id] if entry[1] == "course's own code"]
    assert library, f"exercise {exercise.id} needs a wrong solution that calls the library"
    for description, fragment, fn in library:
        outcome = checker_of(exercise).run(*(fn if isinstance(fn, tuple) else (fn,)), seed=0)
        assert outcome.status == "refused", (description, outcome.message)
        assert fragment in outcome.message and "\n" not in outcome.message


MISTAKE_CASES = [(e, d, f, fn) for e in BUILD_IDS for d, f, fn in MISTAKES[e]]


def test_the_wrong_solutions_are_of_build_exercises_and_each_has_several():
    assert set(MISTAKES) == set(BUILD_IDS)
    for exercise in BUILD_IDS:
        assert len(MISTAKES[exercise]) >= 2, exercise


@pytest.mark.parametrize(
    "exercise_id,description,fragment,fn", MISTAKE_CASES, ids=[f"{c[0]}-{c[1]}" for c in MISTAKE_CASES]
)
def test_each_misconception_fails_with_a_message_that_names_it(exercise_id, description, fragment, fn):
    check = checker_of(EXERCISES[exercise_id])
    for seed in (0, 7):
        outcome = check.run(*(fn if isinstance(fn, tuple) else (fn,)), seed=seed)
        assert not outcome, f"{description} passed with seed {seed}"
        assert fragment in outcome.message, outcome.message
        if outcome.status in ("fail", "error", "timeout"):
            assert f"seed={seed}" in outcome.message, "a failure prints the seed that replays it"


def test_failures_name_the_case_the_shapes_the_dtype_and_the_largest_difference():
    from course_lib.exercises.ch01 import check_attention

    def no_scale(q, k, v, mask=None, causal=False):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    message = check_attention.run(no_scale, seed=3).message
    assert 'wrong on case 1 of 7, "no mask, T != S' in message
    assert re.search(r"q=tensor\(\d, \d, \d, \d\) float64", message)
    assert "largest difference" in message and "at index" in message
    assert "hint: your result equals attention without the 1/sqrt(D) scale" in message
    assert "replay: check_attention(no_scale, seed=3)" in message


def test_the_cases_change_with_the_seed_and_replay_with_it():
    from course_lib.exercises.ch03 import check_causal_skips

    cases = [list(check_causal_skips.cases(__import__("course_lib").exercises.Draw(s))) for s in (1, 2, 1)]
    args = [[case.args for case in run] for run in cases]
    assert args[0] == args[2] and args[0] != args[1]


# --- the checker's behaviour in a notebook ------------------------------------------------------------


def test_a_pass_prints_one_line_on_stdout_and_records_the_function(capsys):
    def mine(intensity, peak, bandwidth):
        return min(peak, intensity * bandwidth)

    assert check_roofline(mine) is None
    captured = capsys.readouterr()
    assert captured.out.startswith("✔ Exercise 2.2 — the roofline: all 5 cases pass") and captured.err == ""
    assert RESULTS["2.2"].status == "pass"
    assert use_mine_or_library(mine, "2.2") is mine


def test_use_mine_or_library_falls_back_until_the_function_passes(capsys):
    from course_lib.hardware import roofline

    check_roofline(stub)
    capsys.readouterr()
    assert use_mine_or_library(stub, "2.2") is roofline
    assert "not implemented" in capsys.readouterr().out
    with pytest.raises(ValueError, match="exercise_id"):
        use_mine_or_library(stub, "9.9")


def test_a_failure_goes_to_stderr_without_stopping_and_can_raise_on_request(capsys):
    check_roofline(lambda i, p, b: max(p, i * b))
    captured = capsys.readouterr()
    assert captured.out == "" and "max instead of min" in captured.err
    with pytest.raises(ExerciseFailed, match="max instead of min"):
        check_roofline(lambda i, p, b: max(p, i * b), raise_on_failure=True)


def test_outcomes_are_logged_for_the_grader(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("COURSE_LIB_GRADE_LOG", str(log))
    check_roofline(stub)
    check_roofline(lambda i, p, b: min(p, i * b), seed=5)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["exercise"], r["status"]) for r in records] == [("2.2", "not implemented"), ("2.2", "pass")]
    assert records[1]["seed"] == 5 and records[1]["cases_total"] == 5


def test_record_false_leaves_no_trace(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("COURSE_LIB_GRADE_LOG", str(log))
    RESULTS.pop("2.2", None)
    check_roofline(stub, record=False)
    assert not log.exists() and "2.2" not in RESULTS


def test_a_function_that_loops_is_stopped_at_the_time_limit(monkeypatch):
    monkeypatch.setenv("COURSE_LIB_EXERCISE_TIMEOUT", "0.5")

    def endless(intensity, peak, bandwidth):
        while True:
            pass

    outcome = check_roofline.run(endless, seed=0)
    assert outcome.status == "timeout" and "time limit of 0.5 s" in outcome.message


def test_a_crash_names_the_line_of_the_readers_code():
    def broken(intensity, peak, bandwidth):
        return min(peak, intensity * bandwidth_typo)  # noqa: F821 - the bug under test

    outcome = check_roofline.run(broken, seed=0)
    assert outcome.status == "error"
    assert (
        "NameError" in outcome.message and "bandwidth_typo" in outcome.message and "line" in outcome.message
    )


def test_warnings_of_the_readers_code_do_not_reach_stderr(capsys):
    import warnings

    def noisy(intensity, peak, bandwidth):
        warnings.warn("deprecated", UserWarning, stacklevel=1)
        return min(peak, intensity * bandwidth)

    check_roofline(noisy, record=False)
    assert capsys.readouterr().err == "", "nbgrader fails a grade cell with any stderr output"


def test_a_not_implemented_error_from_pytorch_is_not_taken_for_the_stub():
    from course_lib.exercises.ch06 import check_elu_plus_one

    def unsupported(x):
        return torch.ones(2).to_sparse().exp_() + x  # PyTorch raises NotImplementedError for this op

    outcome = check_elu_plus_one.run(unsupported, seed=0)
    assert outcome.status != "not implemented"


def test_returning_none_is_reported_as_a_missing_return():
    outcome = check_roofline.run(lambda i, p, b: None, seed=0)
    assert outcome.status == "fail" and "return" in outcome.message


def test_a_result_that_is_not_a_plain_tensor_is_refused_inside_the_guard():
    from course_lib.exercises.ch06 import check_elu_plus_one

    class Lazy(torch.Tensor):
        pass

    outcome = check_elu_plus_one.run(
        lambda x: torch.where(x > 0, x + 1, x.clamp(max=0).exp()).as_subclass(Lazy)
    )
    assert outcome.status == "error" and "plain torch.Tensor" in outcome.message


# --- comparisons and their hints ---------------------------------------------------------------------


def test_compare_names_a_transpose_a_factor_an_offset_and_a_dtype():
    e = torch.arange(9.0, dtype=torch.float64).reshape(3, 3) + 1
    with pytest.raises(Mismatch, match="transposed"):
        compare(e.T, e)
    with pytest.raises(Mismatch, match="times a constant 2.82843 = sqrt"):
        compare(e * 8**0.5, e, factors={"sqrt(D)": 8**0.5})
    with pytest.raises(Mismatch, match="plus a constant 0.5"):
        compare(e + 0.5, e)
    with pytest.raises(Mismatch, match="should be too, got torch.float32"):
        compare(e.float(), e)
    with pytest.raises(
        Mismatch, match=r"expected shape \(3, 4\), got \(4, 3\)\nhint: .*last two axes swapped"
    ):
        compare(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))
    compare(e + 1e-12, e)


def test_compare_finds_the_region_of_the_wrong_entries_and_its_advice():
    e = torch.ones(4, 3, dtype=torch.float64)
    got = e.clone()
    got[2] = float("nan")
    regions = {"in row 2": torch.tensor([False, False, True, False])[:, None]}
    with pytest.raises(Mismatch, match="exactly in row 2: do X"):
        compare(got, e, regions=regions, advice={"in row 2": "do X"})


def test_compare_exact_and_compare_number_explain_their_differences():
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    with pytest.raises(Mismatch, match="bool tensor.*pattern is right"):
        compare_exact(mask.float(), mask)
    with pytest.raises(Mismatch, match="too many and none too few"):
        compare_exact(torch.ones(3, 3, dtype=torch.bool), mask)
    with pytest.raises(Mismatch, match="whole number"):
        compare_number(12.5, 12, integer=True)
    with pytest.raises(Mismatch, match="exactly 2 times"):
        compare_number(24, 12)
    with pytest.raises(Mismatch, match="equals the A way, which here is also the B way"):
        compare_number(3.0, 1.0, variants={"the A way": 3.0, "the B way": 3.0})
    compare_number(12.0, 12, integer=True)


def test_predict_and_explain_exercises_are_declared_without_a_checker(monkeypatch):
    from course_lib.exercises import declare

    monkeypatch.setattr("course_lib.exercises.common.EXERCISES", dict(EXERCISES))
    import course_lib.exercises.common as common

    exercise = declare("9.8", kind="explain", title="why the chunk form exists", points=2)
    assert common.EXERCISES["9.8"] is exercise and exercise.checker == "" and exercise.grade_id == "ex9-8"
    assert declare("9.8", kind="explain", title="why the chunk form exists", points=2) == exercise
    with pytest.raises(ValueError, match="twice"):
        declare("9.8", kind="explain", title="something else")
    with pytest.raises(ValueError, match="kind"):
        declare("9.7", kind="build", title="a build exercise needs a checker")


# --- predictions ------------------------------------------------------------------------------------


@pytest.fixture
def fresh_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LIB_PREDICTIONS", str(tmp_path / "predictions.json"))
    monkeypatch.setattr(predict_module, "PREDICTIONS", {})
    return tmp_path / "predictions.json"


def test_the_first_prediction_counts_and_a_change_is_shown(fresh_predictions, capsys, tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("COURSE_LIB_GRADE_LOG", str(log))
    predict("1.9", None)
    assert "still None" in capsys.readouterr().out
    predict("1.9", 2.0)
    predict("1.9", 1.0)
    assert "first prediction was 2.0" in capsys.readouterr().err
    assert reveal("1.9", 1.97, tolerance=0.1, why="the score matrix is T x T.") is True
    out = capsys.readouterr().out
    assert "you predicted 2.0 (you changed it 1 time(s) afterwards)" in out and "T x T" in out
    predict("1.9", 1.5)
    assert "after the reveal" in capsys.readouterr().err
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["predicted", "changed", "revealed", "changed"]


def test_a_prediction_survives_a_restarted_kernel(fresh_predictions, monkeypatch, capsys):
    predict("4.9", "h2o")
    monkeypatch.setattr(predict_module, "PREDICTIONS", {})  # a new kernel: memory empty, the file remains
    assert reveal("4.9", "h2o") is True
    assert reveal("4.8", 3) is None
    assert "No prediction was recorded" in capsys.readouterr().out


def test_the_teachers_guide_lists_every_exercise_with_its_kind():
    guide = (NOTEBOOKS.parent / "TEACHING.md").read_text(encoding="utf-8")
    missing = [e.id for e in ALL if f"**{e.id} ({e.kind}" not in guide]
    assert missing == [], (
        "TEACHING.md lists each exercise as **N.M (kind ...: its misconceptions or model answer"
    )


# --- cases that run the reader's function their own way, or limit its PyTorch calls --------------------


def test_a_case_may_run_the_readers_function_through_a_call_and_limit_its_torch_calls():
    from course_lib.exercises import Case, Exercise
    from course_lib.exercises.common import run_checker

    exercise = Exercise("9.9", "build", "a cumulative sum", 1, "check_cumsum", __name__)

    def through(fn, x):  # e.g. chapter 09 launches a kernel that calls the reader's step
        return fn(x) * 2

    def cases(draw):
        x = draw.randn(300)
        yield Case("via a call", (x,), expected=lambda: 2 * x.cumsum(0), call=through)
        yield Case(
            "a long input", (x,), expected=lambda: x.cumsum(0), max_torch_calls=10, too_many_calls="a loop?"
        )

    def loop(x):
        out, total = [], 0.0
        for value in x:
            total = total + value
            out.append(total)
        return torch.stack(out)

    assert run_checker(exercise, cases, lambda x: x.cumsum(0), seed=1)
    outcome = run_checker(exercise, cases, loop, seed=1)
    assert outcome.status == "fail" and "more than the 10 this case allows: a loop?" in outcome.message
    assert 'case 2 of 2, "a long input"' in outcome.message and "seed=1" in outcome.message
