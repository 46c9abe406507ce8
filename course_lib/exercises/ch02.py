"""Checkers for notebook 02: the arithmetic intensity of a GEMM, and the roofline."""

from __future__ import annotations

import math
from collections.abc import Callable

from .common import ExerciseFailed, run_cases

__all__ = ["check_gemm_intensity", "check_roofline"]


def _close(got: object, expected: float, case: str, rel: float = 1e-9) -> None:
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        raise ExerciseFailed(f"{case}: expected a number, got {type(got).__name__}")
    if not math.isclose(float(got), expected, rel_tol=rel):
        raise ExerciseFailed(f"{case}: got {float(got):.6g}, expected {expected:.6g}")


def check_gemm_intensity(fn: Callable[..., float]) -> None:
    """``fn(M, N, K, bytes_per_element)``: FLOPs per byte of ``(M, K) @ (K, N)``, every matrix
    read or written once: ``2 M N K / ((M K + K N + M N) * bytes_per_element)``."""

    def case(M, N, K, size):
        # Counted term by term: M*N outputs, each a K-term dot product (K multiplies, K adds).
        flops = M * N * K * 2
        moved = (M * K + K * N + M * N) * size
        return lambda: _close(fn(M, N, K, size), flops / moved, f"M={M}, N={N}, K={K}, {size} bytes")

    shapes = [(4096, 4096, 4096, 2), (1, 4096, 4096, 2), (4096, 1, 4096, 2), (128, 256, 64, 4), (1, 1, 1, 1)]
    run_cases("check_gemm_intensity", [(f"{s}", case(*s)) for s in shapes])


def check_roofline(fn: Callable[[float, float, float], float]) -> None:
    """``fn(intensity, peak_flops, bandwidth)``: attainable FLOP/s, the lower of the two roofs."""

    def case(intensity, peak, bandwidth):
        expected = peak if intensity * bandwidth >= peak else intensity * bandwidth
        side = "compute-bound" if intensity * bandwidth >= peak else "memory-bound"
        return lambda: _close(
            fn(intensity, peak, bandwidth),
            expected,
            f"intensity {intensity} FLOP/byte, peak {peak:.3g} FLOP/s, bandwidth {bandwidth:.3g} B/s "
            f"({side})",
        )

    points = [
        (1.0, 989.4e12, 3.35e12),
        (1000.0, 989.4e12, 3.35e12),
        (153.0, 312e12, 2.039e12),
        (0.0, 1e12, 1e11),
    ]
    run_cases("check_roofline", [(f"{p}", case(*p)) for p in points])
