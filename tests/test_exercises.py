"""The checkers: every exercise's reference solution passes, its stub says "not implemented yet" in one line,
calls to the library or a PyTorch shortcut are refused, and each misconception fails with a message that names
it. Then the framework's parts: comparisons and their hints, printing, recording, predictions."""

import importlib
import json
import re

import pytest
import torch
from exercise_mistakes import MISTAKES
from exercise_notebooks import exercise_cells, solution_functions

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

ALL = list(iter_exercises())
BUILD = [e for e in ALL if e.kind == "build"]
IDS = [e.id for e in BUILD]
CELLS = exercise_cells()


def checker_of(exercise):
    return getattr(importlib.import_module(exercise.module), exercise.checker)


def stub(*args, **kwargs):
    raise NotImplementedError("not implemented yet")


def test_the_registry_lists_the_exercises_of_every_chapter_in_order():
    assert len(BUILD) >= 28 and all(e.checker for e in BUILD)
    assert [e.chapter for e in ALL] == sorted(e.chapter for e in ALL)
    assert {e.chapter for e in ALL} >= set(range(9))
    for exercise in ALL:
        assert exercise.kind in ("build", "predict", "explain")
        assert exercise.points >= (1 if exercise.kind == "build" else 0)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", exercise.grade_id), "nbgrader accepts only these characters"
    for exercise in (e for e in ALL if e.kind != "build"):
        assert exercise.checker == "", "predict and explain exercises have no checker"
        if exercise.kind == "predict":
            assert exercise.points == 0, "predictions are feedback, not points (TEACHING.md)"


# Chapters whose stage-2 exercises are in: at least five, of the three kinds, at least two to build.
STAGE2_CHAPTERS = (7, 8, 9)


@pytest.mark.parametrize("chapter", [c for c in STAGE2_CHAPTERS if any(e.chapter == c for e in ALL)])
def test_a_chapter_has_five_exercises_of_three_kinds(chapter):
    kinds = [e.kind for e in ALL if e.chapter == chapter]
    assert len(kinds) >= 5 and kinds.count("build") >= 2
    assert "predict" in kinds and "explain" in kinds


OTHER = [e for e in ALL if e.kind != "build"]


@pytest.mark.parametrize("exercise", OTHER, ids=[e.id for e in OTHER])
def test_predict_and_explain_exercises_have_their_cells(exercise):
    cells = CELLS[exercise.id]
    statement = cells["statement"]
    assert len(statement) == 1 and statement[0].cell_type == "markdown"
    assert f"Exercise {exercise.id} ({exercise.kind})" in statement[0].source, (
        "the kind is named in the heading"
    )
    assert cells["solution"] == [] and cells["checker"] == []
    if exercise.kind == "predict":
        (prediction,), (reveal_cell,) = cells["prediction"], cells["reveal"]
        assert f'predict("{exercise.id}", ' in prediction.source and "= None" in prediction.source
        assert (
            f'reveal("{exercise.id}", ' in reveal_cell.source and reveal_cell.metadata["nbgrader"]["locked"]
        )
        assert "SOLUTION" not in prediction.source + reveal_cell.source, "a stub there would stop Run All"
    else:
        (answer,) = cells["answer"]
        assert answer.cell_type == "markdown"
        assert "### BEGIN SOLUTION" in answer.source and "### END SOLUTION" in answer.source
        assert answer.metadata["nbgrader"] == {
            "grade": True,
            "grade_id": exercise.grade_id,
            "locked": False,
            "points": exercise.points,
            "schema_version": 3,
            "solution": True,
            "task": False,
        }, "nbgrader: a manually graded answer cell"
    for cell in statement + sum((cells[r] for r in cells if r != "statement"), []):
        assert cell.metadata["course"]["kind"] == exercise.kind


@pytest.mark.parametrize("exercise", BUILD, ids=IDS)
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


@pytest.mark.parametrize("exercise", BUILD, ids=IDS)
def test_the_notebook_solution_passes_on_several_seeds(exercise):
    functions = solution_functions(exercise.id, CELLS[exercise.id])
    for seed in (0, 1, 2, 12345):
        outcome = checker_of(exercise).run(*functions, seed=seed)
        assert outcome, outcome.message
        assert outcome.cases_run == outcome.cases_total >= 2


@pytest.mark.parametrize("exercise", BUILD, ids=IDS)
def test_the_stub_says_not_implemented_yet_in_one_line(exercise, capsys):
    functions = solution_functions(exercise.id, CELLS[exercise.id])
    check = checker_of(exercise)
    check(*[stub] * len(functions), record=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"✘ Exercise {exercise.id} ({exercise.checker}): not implemented yet"
    assert check.run(*[stub] * len(functions)).status == "not implemented"


@pytest.mark.parametrize("exercise", BUILD, ids=IDS)
def test_every_exercise_refuses_a_call_to_the_course_library(exercise):
    library = [entry for entry in MISTAKES[exercise.id] if entry[1] == "course's own code"]
    assert library, f"exercise {exercise.id} needs a wrong solution that calls the library"
    for description, fragment, fn in library:
        outcome = checker_of(exercise).run(*(fn if isinstance(fn, tuple) else (fn,)), seed=0)
        assert outcome.status == "refused", (description, outcome.message)
        assert fragment in outcome.message and "\n" not in outcome.message


MISTAKE_CASES = [(e, d, f, fn) for e in IDS for d, f, fn in MISTAKES[e]]


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
