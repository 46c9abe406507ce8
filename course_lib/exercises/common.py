"""What every checker shares: exercises, cases drawn from a seed, comparisons that explain, reporting.

An exercise's checker is a generator of :class:`Case` objects decorated with :func:`checker`::

    @checker("3.1", title="merging two softmax pieces", points=2)
    def check_merge_softmax_stats(draw):
        x = draw.randn(4, 9)
        yield Case("pieces of 4 and 5", args=(...), expected=lambda: ..., compare=...)

The decorated function is what a notebook calls: ``check_merge_softmax_stats(merge_stats)``. It draws
fresh random cases (a new seed each run, printed when something fails so the run can be replayed
with ``seed=``), calls the reader's function inside :func:`~course_lib.exercises.guard.guarded_call`
(no course_lib implementation, no PyTorch shortcut), computes the expected value afterwards, and
compares with hints derived from the actual difference.

It never stops Run All: a pass prints one line; "not implemented yet" is one line on stderr; a wrong
answer prints its explanation on stderr (nbgrader counts a grade cell with stderr output as failed).
Every outcome is kept in :data:`RESULTS` and, when ``COURSE_LIB_GRADE_LOG`` names a file, appended
to it as one JSON line (what ``python -m course_lib.grade`` reads).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .guard import ExerciseTimeout, Refused, Rules, TooLarge, guarded_call

__all__ = [
    "Case",
    "Draw",
    "Exercise",
    "ExerciseFailed",
    "Mismatch",
    "Outcome",
    "EXERCISES",
    "RESULTS",
    "checker",
    "compare",
    "compare_number",
    "compare_exact",
    "declare",
    "use_mine_or_library",
]

GRADE_LOG_ENV = "COURSE_LIB_GRADE_LOG"
TIME_LIMIT_ENV = "COURSE_LIB_EXERCISE_TIMEOUT"
SEED_ENV = "COURSE_LIB_EXERCISE_SEED"
DEFAULT_TIME_LIMIT = 60.0
KINDS = ("build", "predict", "explain")


class ExerciseFailed(AssertionError):
    """Raised by a checker called with ``raise_on_failure=True`` when the exercise does not pass."""


class Mismatch(Exception):
    """One case's result differs from the expected one; the message explains how."""


# ---------------------------------------------------------------------------------------------------
# Exercises and their outcomes.


@dataclass(frozen=True)
class Exercise:
    """One exercise of a chapter: its id ("3.2"), kind, title, points and checker."""

    id: str
    kind: str
    title: str
    points: int
    checker: str
    module: str
    rules: Rules = Rules()
    fallback: str | None = None  # "module:attribute" of a library function with the same contract

    @property
    def chapter(self) -> int:
        return int(self.id.split(".")[0])

    @property
    def notebook(self) -> str:
        """The prefix of the notebook that holds it: its checkers' module ``chNN`` (``ch04b``: "04b"),
        else the chapter's number ("04")."""
        module = self.module.rsplit(".", 1)[-1]
        return module[2:] if module.startswith("ch") else f"{self.chapter:02d}"

    @property
    def grade_id(self) -> str:
        """The nbgrader ``grade_id`` of the checker cell (letters, digits, ``-`` and ``_`` only)."""
        return "ex" + self.id.replace(".", "-")


@dataclass
class Outcome:
    """What one run of a checker found."""

    exercise: str
    checker: str
    status: str  # "pass", "fail", "not implemented", "refused", "error", "timeout"
    message: str
    seed: int
    cases_run: int = 0
    cases_total: int = 0
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.status == "pass"

    def as_json(self) -> dict:
        return {
            "exercise": self.exercise,
            "checker": self.checker,
            "status": self.status,
            "message": self.message,
            "seed": self.seed,
            "cases_run": self.cases_run,
            "cases_total": self.cases_total,
            "seconds": round(self.seconds, 3),
        }


EXERCISES: dict[str, Exercise] = {}
RESULTS: dict[str, Outcome] = {}
_PASSED_FUNCTIONS: dict[str, Callable] = {}


# ---------------------------------------------------------------------------------------------------
# Random inputs from one seed.


class Draw:
    """Random inputs for one run of a checker, all from one seed (so a failing run can be replayed)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=self.generator, dtype=dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, dtype=dtype)

    def int(self, low: int, high: int) -> int:
        """An integer in ``[low, high]`` (both included)."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator).item())

    def float(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def choice(self, options: Sequence):
        return options[self.int(0, len(options) - 1)]

    def permutation(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def not_multiple(self, low: int, high: int, of: int) -> int:
        """An integer in ``[low, high]`` that is not a multiple of ``of`` (when one exists)."""
        for _ in range(100):
            value = self.int(low, high)
            if value % of:
                return value
        return value


# ---------------------------------------------------------------------------------------------------
# Cases.


@dataclass
class Case:
    """One call of the reader's function and how to judge its result.

    ``expected`` is a value or a zero-argument callable, evaluated after the reader's call (so the
    reference is never in memory while their code runs). ``compare(got, expected)`` raises
    :class:`Mismatch`; the default compares tensors and numbers with :func:`compare`.
    ``inputs`` names the arguments for messages (defaults to ``arg0, arg1, ...``).
    ``max_elements``: the largest tensor the reader's code may build (views excluded), with
    ``too_large`` saying why in the failure message (e.g. "FlashAttention never holds the T x S scores").
    ``call(fn, *args, **kwargs)``, when given, runs the reader's function ``fn`` for this case instead of
    ``fn(*args, **kwargs)`` (chapter 09 runs a ``@triton.jit`` function inside a library kernel); it runs
    watched, like the reader's code, so the exercise's ``allow`` must name it.
    ``max_torch_calls`` limits the PyTorch functions and tensor methods one call may use (to tell a
    log-depth scan or a chunked form from a loop over time steps); ``too_many_calls`` says why.
    """

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    expected: object = None
    compare: Callable[[object, object], None] | None = None
    inputs: Sequence[str] | None = None
    copy_args: bool = True
    target: int = 0  # which of the reader's functions this case calls (exercises with several)
    max_elements: int | None = None
    too_large: str = ""
    call: Callable[..., object] | None = None
    max_torch_calls: int | None = None
    too_many_calls: str = ""

    def describe_inputs(self) -> str:
        names = list(self.inputs or [f"arg{i}" for i in range(len(self.args))])
        parts = [f"{name}={_describe(value)}" for name, value in zip(names, self.args)]
        parts += [f"{name}={_describe(value)}" for name, value in self.kwargs.items()]
        return ", ".join(parts)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        if len(value) > 6 or any(isinstance(item, (torch.Tensor, list, tuple, dict)) for item in value):
            inner = ", ".join(_describe(item) for item in value[:3])
            more = f", ... ({len(value)} items)" if len(value) > 3 else ""
            return f"[{inner}{more}]"
        return repr(list(value)) if isinstance(value, list) else repr(tuple(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(value.items())[:6]) + "}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _copy(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------
# Comparisons that explain.


def _fmt(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.6g}"


def _index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    if not shape:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=False))


def _region_hint(
    bad: torch.Tensor, regions: dict[str, torch.Tensor] | None, advice: dict[str, str] | None, what: str
) -> list[str]:
    """Hints naming the labelled regions that contain every bad entry (and none of the good ones)."""
    hints = []
    if not regions or not bad.any():
        return hints
    for label, region in regions.items():
        while region.dim() < bad.dim():
            region = region.unsqueeze(-1)
        try:
            region = region.expand_as(bad)
        except RuntimeError:  # a region of another shape than this result
            continue
        if not region.any():
            continue
        inside = bool(bad[region].all()) if region.any() else False
        only_there = not bool(bad[~region].any())
        if only_there:
            text = f"all {int(bad.sum())} {what} are {label}"
            if inside:
                text = f"the {what} are exactly {label}"
            hint = advice.get(label) if advice else None
            hints.append(text + (f": {hint}" if hint else ""))
    return hints


def compare(
    got: object,
    expected: torch.Tensor,
    what: str = "result",
    *,
    atol: float = 1e-7,
    rtol: float = 1e-6,
    variants: dict[str, Callable[[], torch.Tensor]] | None = None,
    regions: dict[str, torch.Tensor] | None = None,
    advice: dict[str, str] | None = None,
    factors: dict[str, float] | None = None,
    check_dtype: bool = True,
) -> None:
    """Raise :class:`Mismatch` unless ``got`` is a tensor close to ``expected``.

    The message gives the shapes, dtypes and largest difference, and hints found by testing the
    actual result: against ``variants`` (named wrong answers: "softmax over the queries"), the
    transpose, a constant factor (named through ``factors``) or offset, and ``regions`` (named boolean
    masks: "rows whose logsumexp exceeds 700") that contain every wrong entry, each with its ``advice``.
    """
    if expected.dtype == torch.bool:
        compare_exact(got, expected, what, variants=variants, regions=regions, advice=advice)
        return
    lines: list[str] = []
    if not isinstance(got, torch.Tensor):
        raise Mismatch(
            f"{what}: expected a torch.Tensor of shape {tuple(expected.shape)}, got {_describe(got)}"
        )
    if got.shape != expected.shape:
        lines.append(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dim() >= 2 and got.shape == expected.transpose(-1, -2).shape:
            lines.append("hint: your result has the last two axes swapped")
        elif got.numel() == expected.numel():
            lines.append(
                "hint: same number of entries in another shape: a reshape or view in the wrong order?"
            )
        elif got.dim() == expected.dim() + 1 and 1 in got.shape:
            lines.append("hint: one axis of size 1 too many (a missing squeeze, or keepdim=True?)")
        elif got.dim() + 1 == expected.dim():
            lines.append("hint: one axis too few (reduced over an axis you should have kept, or a squeeze?)")
        for name, make in (variants or {}).items():
            try:
                if make().shape == got.shape:
                    lines.append(f"hint: your shape is that of {name}")
                    break
            except Exception:  # a variant that does not apply to these inputs
                continue
        raise Mismatch("\n".join(lines))
    if not got.is_floating_point() and not got.is_complex():
        lines.append(f"{what}: expected a floating-point tensor ({expected.dtype}), got {got.dtype}")
        raise Mismatch("\n".join(lines))
    if check_dtype and expected.dtype == torch.float64 and got.dtype != torch.float64:
        note = (
            f"{what}: the inputs are float64 and the result should be too, got {got.dtype} "
            "(a float32 constant or .float() somewhere loses the precision the checker needs)"
        )
        got64 = got.detach().double()
        if _close(got64, expected.double(), atol=max(atol, 1e-4), rtol=max(rtol, 1e-3)):
            raise Mismatch(note)
    g = got.detach().double().cpu()
    e = expected.detach().double().cpu()
    finite_expected = torch.isfinite(e)
    nonfinite = ~torch.isfinite(g) & finite_expected
    if nonfinite.any():
        first = _index(int(nonfinite.flatten().nonzero()[0]), g.shape)
        kinds = "NaN" if torch.isnan(g[nonfinite]).all() else "NaN/inf"
        lines.append(
            f"{what}: {kinds} in {int(nonfinite.sum())} of {g.numel()} entries where the answer is finite, "
            f"first at index {first} (expected {_fmt(e[first].item())})"
        )
        lines += ["hint: " + h for h in _region_hint(nonfinite, regions, advice, f"{kinds} entries")]
        raise Mismatch("\n".join(lines))
    both_inf = ~finite_expected
    if both_inf.any() and not torch.equal(g[both_inf], e[both_inf]):
        lines.append(f"{what}: expected {int(both_inf.sum())} entries of +-inf/NaN, yours differ there")
        raise Mismatch("\n".join(lines))
    g_f, e_f = g.masked_fill(both_inf, 0.0), e.masked_fill(both_inf, 0.0)
    if torch.allclose(g_f, e_f, atol=atol, rtol=rtol):
        return
    error = (g_f - e_f).abs()
    bad = error > atol + rtol * e_f.abs()
    worst = _index(int(error.argmax()), g.shape)
    lines.append(
        f"{what}: {int(bad.sum())} of {g.numel()} entries differ; largest difference "
        f"{error.max().item():.3g} at index {worst}: got {_fmt(g[worst].item())}, "
        f"expected {_fmt(e[worst].item())}"
    )
    lines += ["hint: " + h for h in _value_hints(g_f, e_f, atol, rtol, variants, factors)]
    lines += ["hint: " + h for h in _region_hint(bad, regions, advice, "wrong entries")]
    zero_got = (g_f == 0) & (e_f != 0) & bad
    if zero_got.any() and bool((zero_got == bad).all()):
        lines.append(
            f"hint: every wrong entry of yours is exactly 0 where the answer is not ({int(bad.sum())})"
        )
    leak = (e_f == 0) & (g_f != 0) & bad
    if leak.any() and bool((leak == bad).all()):
        lines.append(
            f"hint: every wrong entry is non-zero where the answer is exactly 0 ({int(bad.sum())}): "
            "something that should be masked or zeroed is not"
        )
    raise Mismatch("\n".join(lines))


def _value_hints(
    g: torch.Tensor,
    e: torch.Tensor,
    atol: float,
    rtol: float,
    variants: dict[str, Callable[[], object]] | None,
    factors: dict[str, float] | None,
) -> list[str]:
    hints = []
    loose = dict(atol=max(atol, 1e-6), rtol=max(rtol, 1e-5))
    matches = []
    for name, make in (variants or {}).items():
        try:
            candidate = make()
        except Exception:  # a variant that does not apply to these inputs
            continue
        if isinstance(candidate, torch.Tensor) and _close(g, candidate.detach().double().cpu(), **loose):
            matches.append(name)
    if matches:
        return ["your result equals " + ", which here is also ".join(matches)]
    if e.dim() >= 2 and e.shape[-1] == e.shape[-2] and e.shape[-1] > 1:
        if _close(g, e.transpose(-1, -2), **loose):
            hints.append("your result equals the answer transposed (last two axes swapped)")
            return hints
    denominator = float((e * e).sum())
    if denominator > 0:
        ratio = float((g * e).sum()) / denominator
        if abs(ratio - 1) > 1e-3 and abs(ratio) > 1e-12 and _close(g, ratio * e, **loose):
            named = ""
            for label, value in (factors or {}).items():
                if math.isclose(ratio, value, rel_tol=1e-3):
                    named = f" = {label}"
            hints.append(f"your result is the answer times a constant {ratio:.6g}{named}")
            return hints
    offset = g - e
    if offset.numel() > 1 and float(offset.std()) < max(atol, 1e-9) * 10 and abs(float(offset.mean())) > atol:
        hints.append(f"your result is the answer plus a constant {float(offset.mean()):.6g}")
    return hints


def compare_exact(
    got: object,
    expected: torch.Tensor,
    what: str = "result",
    *,
    variants: dict[str, Callable[[], torch.Tensor]] | None = None,
    regions: dict[str, torch.Tensor] | None = None,
    advice: dict[str, str] | None = None,
) -> None:
    """Raise :class:`Mismatch` unless ``got`` equals the bool or integer tensor ``expected`` exactly."""
    if not isinstance(got, torch.Tensor):
        raise Mismatch(
            f"{what}: expected a torch.Tensor of shape {tuple(expected.shape)}, got {_describe(got)}"
        )
    if expected.dtype == torch.bool and got.dtype != torch.bool:
        hint = ""
        if got.shape == expected.shape and torch.equal(got != 0, expected):
            hint = (
                " (the True/False pattern is right: return it as a bool tensor, e.g. with `>` or `.bool()`)"
            )
        raise Mismatch(f"{what}: expected a bool tensor, got dtype {got.dtype}{hint}")
    if expected.dtype != torch.bool and (got.is_floating_point() or got.dtype == torch.bool):
        raise Mismatch(f"{what}: expected integers ({expected.dtype}), got dtype {got.dtype}")
    if got.shape != expected.shape:
        lines = [f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"]
        if got.dim() >= 2 and got.shape == expected.transpose(-1, -2).shape:
            lines.append("hint: your result has the last two axes swapped")
        for name, make in (variants or {}).items():
            try:
                if make().shape == got.shape:
                    lines.append(f"hint: your shape is that of {name}")
                    break
            except Exception:
                continue
        raise Mismatch("\n".join(lines))
    got_cmp = got.to(expected.dtype) if expected.dtype != torch.bool else got
    if torch.equal(got_cmp, expected):
        return
    wrong = got_cmp != expected
    first = _index(int(wrong.flatten().nonzero()[0]), expected.shape)
    lines = [
        f"{what}: {int(wrong.sum())} of {expected.numel()} entries differ, first at index {first}: "
        f"got {got_cmp[first].item()}, expected {expected[first].item()}"
    ]
    matched = False
    for name, make in (variants or {}).items():
        try:
            candidate = make()
        except Exception:
            continue
        if (
            isinstance(candidate, torch.Tensor)
            and candidate.shape == got.shape
            and torch.equal(got_cmp, candidate.to(got_cmp.dtype))
        ):
            lines.append(f"hint: your result equals {name}")
            matched = True
            break
    if not matched and expected.dim() >= 2 and expected.shape[-1] == expected.shape[-2]:
        if torch.equal(got_cmp, expected.transpose(-1, -2)):
            lines.append("hint: your result equals the answer transposed (rows are queries, columns keys)")
    if expected.dtype == torch.bool:
        extra, missing = int((got_cmp & ~expected).sum()), int((~got_cmp & expected).sum())
        if extra and not missing:
            lines.append(f"hint: yours allows {extra} entries too many and none too few")
        elif missing and not extra:
            lines.append(f"hint: yours misses {missing} entries that should be allowed, and adds none")
    lines += ["hint: " + h for h in _region_hint(wrong, regions, advice, "wrong entries")]
    raise Mismatch("\n".join(lines))


def compare_number(
    got: object,
    expected: float,
    what: str = "result",
    *,
    rel: float = 1e-9,
    integer: bool = False,
    variants: dict[str, float] | None = None,
    factors: dict[str, float] | None = None,
) -> None:
    """Raise :class:`Mismatch` unless ``got`` is a number equal to ``expected`` (to ``rel``; exactly
    when ``integer``), naming the variant (a named wrong value) or the factor it matches."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        raise Mismatch(f"{what}: expected a number, got {_describe(got)}")
    if integer:
        if isinstance(got, float) and not got.is_integer():
            raise Mismatch(
                f"{what}: expected a whole number ({int(expected)}), got {got!r}: "
                "counts and byte sizes have no fractional part"
            )
        if int(got) == int(expected):
            return
    elif math.isclose(float(got), float(expected), rel_tol=rel, abs_tol=1e-300):
        return
    lines = [f"{what}: got {_fmt(float(got))}, expected {_fmt(float(expected))}"]
    matches = [
        name
        for name, value in (variants or {}).items()
        if math.isclose(float(got), float(value), rel_tol=max(rel, 1e-9), abs_tol=1e-12)
    ]
    if matches:
        lines.append("hint: your value equals " + ", which here is also ".join(matches))
        raise Mismatch("\n".join(lines))
    if expected and got:
        ratio = float(got) / float(expected)
        for label, value in (factors or {}).items():
            if math.isclose(ratio, value, rel_tol=1e-6):
                lines.append(f"hint: yours is the answer times {label}")
                break
        else:
            if abs(ratio - round(ratio)) < 1e-9 and round(ratio) > 1:
                lines.append(f"hint: yours is exactly {round(ratio)} times the answer")
            elif abs(1 / ratio - round(1 / ratio)) < 1e-9 and round(1 / ratio) > 1:
                lines.append(f"hint: yours is exactly 1/{round(1 / ratio)} of the answer")
    raise Mismatch("\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# Running a checker.


def _user_line(error: BaseException) -> str:
    """``line N: <source>`` of the last frame of the reader's code in the traceback (not torch's)."""
    frames = traceback.extract_tb(error.__traceback__)
    torch_dir = str(Path(torch.__file__).resolve().parent)
    here = str(Path(__file__).resolve().parent)
    for frame in reversed(frames):
        if not frame.filename.startswith((torch_dir, here)) and not frame.filename.startswith(sys.prefix):
            return f"line {frame.lineno} of {frame.name}: {(frame.line or '').strip()}"
    return ""


def _raised_by_stub(error: NotImplementedError) -> bool:
    """Was this NotImplementedError raised by the reader's own code (the stub), not by a library?"""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return True
    last = frames[-1].filename
    return not last.startswith(str(Path(torch.__file__).resolve().parent))


def _time_limit() -> float:
    try:
        return float(os.environ.get(TIME_LIMIT_ENV, DEFAULT_TIME_LIMIT))
    except ValueError:
        return DEFAULT_TIME_LIMIT


def _new_seed() -> int:
    fixed = os.environ.get(SEED_ENV)
    if fixed:
        return int(fixed)
    return secrets.randbelow(2**31)


def run_checker(
    exercise: Exercise,
    cases: Callable[[Draw], Iterable[Case]],
    functions: Callable | Sequence[Callable],
    seed: int | None = None,
) -> Outcome:
    """Run every case of ``exercise`` on the reader's function(s); return the :class:`Outcome`."""
    functions = tuple(functions) if isinstance(functions, (tuple, list)) else (functions,)
    seed = _new_seed() if seed is None else int(seed)
    label = f"Exercise {exercise.id} ({exercise.checker})"
    names = ", ".join(getattr(f, "__name__", "your_function") for f in functions)
    replay = f"replay: {exercise.checker}({names}, seed={seed})"
    started = time.perf_counter()
    outcome = Outcome(exercise.id, exercise.checker, "pass", "", seed)

    def finish(status: str, message: str) -> Outcome:
        outcome.status, outcome.message = status, message
        outcome.seconds = time.perf_counter() - started
        return outcome

    for fn in functions:
        if not callable(fn):
            return finish("fail", f"✘ {label}: expected a function, got {_describe(fn)}")
    try:
        all_cases = list(cases(Draw(seed)))
    except Exception as error:  # pragma: no cover - a checker bug, reported rather than hidden
        return finish(
            "error", f"✘ {label}: the checker could not build its cases ({error!r}); please report it"
        )
    outcome.cases_total = len(all_cases)
    deadline = _time_limit()
    for number, case in enumerate(all_cases, start=1):
        where = f'case {number} of {len(all_cases)}, "{case.name}"'
        args = _copy(case.args) if case.copy_args else case.args
        kwargs = _copy(case.kwargs) if case.copy_args else case.kwargs
        remaining = deadline - (time.perf_counter() - started)
        fn = functions[case.target]
        described = case.describe_inputs()  # before the call, which may change list arguments in place
        target, call_args = (fn, args) if case.call is None else (case.call, (fn, *args))
        counts: dict = {}
        try:
            with warnings.catch_warnings(record=True):  # a warning on stderr would fail an nbgrader cell
                warnings.simplefilter("always")
                got = guarded_call(
                    target,
                    call_args,
                    kwargs,
                    rules=exercise.rules,
                    checker=exercise.checker,
                    time_limit=max(remaining, 0.001),
                    max_elements=case.max_elements,
                    counts=counts,
                )
        except NotImplementedError as error:
            if _raised_by_stub(error):
                return finish("not implemented", f"✘ {label}: not implemented yet")
            return finish(
                "error",
                f"✘ {label}: on {where} your function raised NotImplementedError from PyTorch: {error}\n"
                f"  inputs: {described}\n  {replay}",
            )
        except Refused as refusal:
            return finish("refused", f"✘ {label}: refused — {refusal.message}")
        except TooLarge as large:
            return finish(
                "fail",
                f"✘ {label}: wrong on {where}\n  inputs: {described}\n"
                f"  your function built a tensor of {large.elements:,} elements (shape {large.shape}, from "
                f"{large.op}); this case allows at most {large.limit:,}"
                + (f"\n  hint: {case.too_large}" if case.too_large else "")
                + f"\n  {replay}",
            )
        except ExerciseTimeout:
            return finish(
                "timeout",
                f"✘ {label}: on {where} your function ran past the time limit of {deadline:g} s "
                f"(an endless loop?)\n  inputs: {described}\n  {replay}",
            )
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # the reader's code raised: say where, on which inputs
            line = _user_line(error)
            return finish(
                "error",
                f"✘ {label}: on {where} your function raised {type(error).__name__}: {error}\n"
                + (f"  at {line}\n" if line else "")
                + f"  inputs: {described}\n  {replay}",
            )
        calls = counts.get("torch_calls", 0)
        if case.max_torch_calls is not None and calls > case.max_torch_calls:
            return finish(
                "fail",
                f"✘ {label}: on {where}: your function made {calls} PyTorch calls, more than the "
                f"{case.max_torch_calls} this case allows"
                + (f": {case.too_many_calls}" if case.too_many_calls else "")
                + f"\n  inputs: {described}\n  {replay}",
            )
        expected = case.expected() if callable(case.expected) else case.expected
        try:
            if got is None and expected is not None:
                raise Mismatch("your function returned None: is a `return` missing?")
            (case.compare or _default_compare)(got, expected)
        except Mismatch as mismatch:
            details = "\n".join("  " + line for line in str(mismatch).splitlines())
            return finish(
                "fail",
                f"✘ {label}: wrong on {where}\n  inputs: {described}\n{details}\n  {replay}",
            )
        outcome.cases_run = number
    return finish("pass", f"✔ Exercise {exercise.id} — {exercise.title}: all {len(all_cases)} cases pass")


def _default_compare(got: object, expected: object) -> None:
    if isinstance(expected, torch.Tensor):
        compare(got, expected)
    elif isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise Mismatch(f"expected a tuple of {len(expected)} values, got {_describe(got)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            _default_compare_named(g, e, f"item {i}")
    else:
        compare_number(got, expected)


def _default_compare_named(got: object, expected: object, what: str) -> None:
    if isinstance(expected, torch.Tensor):
        compare(got, expected, what)
    else:
        compare_number(got, expected, what)


def _record(outcome: Outcome, fn: Callable) -> None:
    RESULTS[outcome.exercise] = outcome
    if outcome:
        _PASSED_FUNCTIONS[outcome.exercise] = fn
    else:
        _PASSED_FUNCTIONS.pop(outcome.exercise, None)
    log = os.environ.get(GRADE_LOG_ENV)
    if log:
        try:
            with open(log, "a", encoding="utf-8") as file:
                file.write(json.dumps(outcome.as_json()) + "\n")
        except OSError:  # pragma: no cover - grading without a writable log only loses the record
            pass


def checker(
    exercise_id: str,
    *,
    title: str,
    points: int = 1,
    kind: str = "build",
    task: str | None = None,
    forbid: Iterable[str] = (),
    allow: Iterable[str] = (),
    fallback: str | None = None,
    processes_from: Iterable[str] = (),
) -> Callable[[Callable[[Draw], Iterable[Case]]], Callable[..., None]]:
    """Turn a case generator into the checker a notebook calls, and register the exercise.

    ``forbid``: names of PyTorch functions that do this task whole (``"elu"``); ``allow``: qualified
    ``course_lib`` names the solution may call; ``fallback``: ``"module:attr"`` of the library
    function :func:`use_mine_or_library` returns while the exercise is unsolved; ``processes_from``:
    directories whose code may start a process during the call (a kernel compiler, see
    :class:`~course_lib.exercises.guard.Rules`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KINDS}")

    def wrap(cases: Callable[[Draw], Iterable[Case]]) -> Callable[..., None]:
        exercise = Exercise(
            id=exercise_id,
            kind=kind,
            title=title,
            points=points,
            checker=cases.__name__,
            module=cases.__module__,
            rules=Rules(
                task=task or title,
                torch_names=frozenset(forbid),
                allow=frozenset(allow),
                processes_from=frozenset(processes_from),
            ),
            fallback=fallback,
        )

        def check(
            *functions: Callable, seed: int | None = None, record: bool = True, raise_on_failure: bool = False
        ) -> None:
            outcome = run_checker(exercise, cases, functions, seed)
            if record:
                _record(outcome, functions[0] if len(functions) == 1 else functions)
            stream = sys.stdout if outcome else sys.stderr
            print(outcome.message, file=stream)
            stream.flush()
            if raise_on_failure and not outcome:
                raise ExerciseFailed(outcome.message)

        def run(*functions: Callable, seed: int | None = None) -> Outcome:
            """Run the checker and return its :class:`Outcome` without printing or recording."""
            return run_checker(exercise, cases, functions, seed)

        check.__name__ = check.__qualname__ = cases.__name__
        check.__module__ = cases.__module__
        check.__doc__ = cases.__doc__
        check.run = run
        check.exercise = exercise
        check.cases = cases
        if exercise_id in EXERCISES and EXERCISES[exercise_id].checker != exercise.checker:
            raise ValueError(f"exercise {exercise_id} is registered twice")
        EXERCISES[exercise_id] = exercise
        return check

    return wrap


def declare(exercise_id: str, *, kind: str, title: str, points: int = 0) -> Exercise:
    """Register a *predict* or *explain* exercise, which has no checker: a prediction is feedback (see
    :mod:`.predictions`), an explanation is graded by hand against the teacher's model answer. The
    grader lists them without scoring them."""
    if kind not in ("predict", "explain"):
        raise ValueError(f"kind={kind!r} must be 'predict' or 'explain' (build exercises use @checker)")
    # The declaring module names the notebook (ch04b's declarations live in 04b_serving).
    module = sys._getframe(1).f_globals.get("__name__", "")
    exercise = Exercise(id=exercise_id, kind=kind, title=title, points=points, checker="", module=module)
    if exercise_id in EXERCISES and EXERCISES[exercise_id] != exercise:
        raise ValueError(f"exercise {exercise_id} is registered twice")
    EXERCISES[exercise_id] = exercise
    return exercise


# ---------------------------------------------------------------------------------------------------


def _import(reference: str) -> Callable:
    module_name, _, attribute = reference.partition(":")
    import importlib

    obj = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def use_mine_or_library(mine: Callable, exercise_id: str) -> Callable:
    """``mine`` if it passed exercise ``exercise_id``'s checker in this session, else the library's
    function with the same contract (so later cells run either way); says which in one line."""
    exercise = EXERCISES.get(exercise_id)
    if exercise is None:
        raise ValueError(f"exercise_id={exercise_id!r} is not an exercise of the course")
    if _PASSED_FUNCTIONS.get(exercise_id) is mine:
        return mine
    if exercise.fallback is None:
        raise ValueError(f"exercise {exercise_id} has no library fallback")
    fallback = _import(exercise.fallback)
    status = RESULTS[exercise_id].status if exercise_id in RESULTS else "not checked"
    print(f"(exercise {exercise_id} is {status}: the cells below use the library's {fallback.__name__})")
    return fallback
