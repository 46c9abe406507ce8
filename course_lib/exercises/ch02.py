"""Checkers for notebook 02: the arithmetic intensity of a GEMM, and the roofline."""

from __future__ import annotations

from .common import Case, Draw, checker, compare_number

__all__ = ["check_gemm_intensity", "check_roofline"]


def _gemm_case(M: int, N: int, K: int, size: int, name: str) -> Case:
    flops = 2 * M * N * K  # M*N outputs, each a K-term dot product: K multiplies and K adds
    moved = (M * K + K * N + M * N) * size
    variants = {
        "M*N*K FLOPs over the bytes (a multiply-add is 2 FLOPs)": M * N * K / moved,
        "FLOPs over the bytes of A and B only (the output C is written too)": flops
        / ((M * K + K * N) * size),
        "FLOPs per element, not per byte (times bytes_per_element missing)": flops / (M * K + K * N + M * N),
        "bytes over FLOPs (the ratio upside down)": moved / flops,
    }

    def judge(got, expected):
        compare_number(got, expected, "intensity", rel=1e-12, variants=variants)

    return Case(
        name,
        (M, N, K, size),
        expected=flops / moved,
        compare=judge,
        inputs=["M", "N", "K", "bytes_per_element"],
    )


@checker("2.1", title="the intensity of a GEMM", points=1, task="the GEMM's intensity")
def check_gemm_intensity(draw: Draw):
    """``fn(M, N, K, bytes_per_element)``: FLOPs per byte of ``(M, K) @ (K, N)``, each matrix moved once."""
    for name, (M, N, K) in [
        ("a large square GEMM", (2 ** draw.int(10, 13),) * 3),
        ("a GEMV (N = 1)", (draw.int(1000, 8000), 1, draw.int(1000, 8000))),
        ("one token (M = 1)", (1, draw.int(1000, 8000), draw.int(1000, 8000))),
        ("an uneven shape", (draw.int(3, 300), draw.int(3, 300), draw.int(3, 300))),
        ("the smallest GEMM (1, 1, 1)", (1, 1, 1)),
    ]:
        yield _gemm_case(M, N, K, draw.choice([1, 2, 4]), name)


@checker("2.2", title="the roofline", points=1, task="the roofline", fallback="course_lib.hardware:roofline")
def check_roofline(draw: Draw):
    """``fn(intensity, peak_flops, bandwidth)``: attainable FLOP/s, the lower of the two roofs."""
    peak, bandwidth = draw.float(50e12, 2000e12), draw.float(0.5e12, 5e12)
    ridge = peak / bandwidth
    for name, intensity in [
        ("memory-bound (left of the ridge)", draw.float(0.1, 0.5) * ridge),
        ("compute-bound (right of the ridge)", draw.float(2.0, 50.0) * ridge),
        ("exactly at the ridge point", ridge),
        ("zero intensity", 0.0),
        ("one FLOP per byte", 1.0),
    ]:
        expected = min(peak, intensity * bandwidth)
        variants = {
            "the higher roof (max instead of min)": max(peak, intensity * bandwidth),
            "intensity x bandwidth without the compute roof": intensity * bandwidth,
            "the compute roof alone": peak,
            "intensity x peak": intensity * peak,
        }

        def judge(got, expected, variants=variants):
            compare_number(
                got,
                expected,
                "attainable FLOP/s",
                rel=1e-12,
                variants={k: v for k, v in variants.items() if v != expected},
            )

        yield Case(
            name,
            (intensity, peak, bandwidth),
            expected=expected,
            compare=judge,
            inputs=["intensity", "peak_flops", "bandwidth"],
        )
