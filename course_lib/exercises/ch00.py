"""Checker for notebook 00: a first exercise, to learn how exercises and checkers work."""

from __future__ import annotations

import torch

from .common import Case, Draw, checker, compare

__all__ = ["check_softmax"]

SOFTMAX_SHORTCUTS = ("softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax", "softmin")


def _softmax_case(name: str, x: torch.Tensor) -> Case:
    # exp overflows above ~709 in float64 and ~88 in float32.
    limit = 709.0 if x.dtype == torch.float64 else 88.0
    row_max = x.amax(-1, keepdim=True) if x.numel() else x
    regions = {
        f"in rows whose largest logit exceeds {limit:g}, where exp() overflows": (row_max > limit).expand_as(
            x
        ),
        "in rows whose logits are all far below the tensor's overall maximum": (
            (row_max < x.max() - limit).expand_as(x) if x.numel() else torch.zeros_like(x, dtype=torch.bool)
        ),
    }
    advice = {
        list(regions)[0]: "subtract each row's maximum before exp (softmax(x) = softmax(x - c))",
        list(regions)[1]: "shift each row by its own maximum, not by one maximum for the whole tensor",
    }
    variants = {
        "a softmax over the first axis instead of the last": lambda: torch.softmax(x, 0),
        "exp(x) divided by the sum over the whole tensor, not over each row": lambda: (
            torch.exp(x - x.max()) / torch.exp(x - x.max()).sum()
        ),
    }

    def judge(got, expected):
        compare(
            got,
            expected,
            "softmax",
            atol=1e-6 if x.dtype == torch.float32 else 1e-12,
            rtol=1e-5 if x.dtype == torch.float32 else 1e-9,
            variants=variants,
            regions=regions,
            advice=advice,
        )

    return Case(name, (x,), expected=lambda: torch.softmax(x, -1), compare=judge, inputs=["x"])


@checker(
    "0.1", title="a softmax that does not overflow", points=1, task="the softmax", forbid=SOFTMAX_SHORTCUTS
)
def check_softmax(draw: Draw):
    """``softmax(x)`` over the last dimension, for any shape, with logits that overflow ``exp``."""
    yield _softmax_case(f"a vector of {(n := draw.int(3, 9))}", draw.randn(n))
    rows, cols = draw.int(2, 6), draw.int(2, 9)
    yield _softmax_case(f"a ({rows}, {cols}) matrix, row by row", draw.randn(rows, cols, scale=3.0))
    yield _softmax_case("a (2, 3, 5) tensor", draw.randn(2, 3, 5))
    big = 1000.0 + draw.randn(draw.int(2, 4), draw.int(3, 7), scale=2.0)
    yield _softmax_case("logits around 1000, where exp() overflows", big)
    yield _softmax_case("logits around -1000, where exp() underflows to 0", -big)
    mixed = draw.randn(4, draw.int(3, 8))
    mixed[0] += 800.0
    yield _softmax_case("rows on very different scales (one row near 800, the others near 0)", mixed)
    yield _softmax_case("float32 logits around 100", (100.0 + draw.randn(3, 6)).float())
    yield _softmax_case("a single element", draw.randn(1))
