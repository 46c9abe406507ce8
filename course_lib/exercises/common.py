"""What every checker shares: running cases, comparing tensors, reporting the result."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class ExerciseFailed(AssertionError):
    """The reader's function gave a wrong answer (or raised) on one of the checker's cases."""


def compare(
    got: object, expected: torch.Tensor, case: str, *, atol: float = 1e-5, rtol: float = 1e-4
) -> None:
    """Raise :class:`ExerciseFailed` unless ``got`` is a tensor close to ``expected``."""
    if not isinstance(got, torch.Tensor):
        raise ExerciseFailed(f"{case}: expected a torch.Tensor, got {type(got).__name__}")
    if got.shape != expected.shape:
        raise ExerciseFailed(f"{case}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if expected.dtype == torch.bool:
        if got.dtype != torch.bool:
            raise ExerciseFailed(f"{case}: expected a bool tensor, got dtype {got.dtype}")
        wrong = (got != expected).nonzero()
        if len(wrong):
            where = tuple(wrong[0].tolist())
            raise ExerciseFailed(
                f"{case}: {len(wrong)} entries differ, first at {where}: got {bool(got[where])}, "
                f"expected {bool(expected[where])}"
            )
        return
    got_cmp, expected_cmp = got.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(got_cmp).all():
        raise ExerciseFailed(f"{case}: the result contains NaN or inf")
    if not torch.allclose(got_cmp, expected_cmp, atol=atol, rtol=rtol):
        error = (got_cmp - expected_cmp).abs()
        where = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
        raise ExerciseFailed(
            f"{case}: largest difference {error.max().item():.3g} at index {where}: "
            f"got {got_cmp[where].item():.6g}, expected {expected_cmp[where].item():.6g}"
        )


def run_cases(name: str, cases: Iterable[tuple[str, Callable[[], None]]]) -> None:
    """Run each ``(description, check)``; print a pass line or raise on the first failure."""
    count = 0
    for description, check in cases:
        try:
            check()
        except ExerciseFailed:
            raise
        except NotImplementedError:
            raise ExerciseFailed(f"{name}: not implemented yet — write your solution above") from None
        except Exception as error:  # the reader's code raised: say where, keep the cause
            raise ExerciseFailed(f"{name}, {description}: your function raised {error!r}") from error
        count += 1
    print(f"✔ {name}: all {count} cases pass")
