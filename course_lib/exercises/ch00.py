"""Checker for notebook 00: a first exercise to learn how checkers work."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .common import compare, run_cases

__all__ = ["check_softmax"]


def check_softmax(softmax: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``softmax(x)`` over the last dim must equal ``torch.softmax(x, -1)``, large inputs included."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "a vector of 5": torch.randn(5, generator=generator, dtype=torch.float64),
        "a (3, 7) matrix, row by row": torch.randn(3, 7, generator=generator, dtype=torch.float64),
        "large logits (1000, 1001, 1002) that overflow exp()": torch.tensor([1000.0, 1001.0, 1002.0]),
        "a single element": torch.tensor([3.0]),
    }
    cases = [
        (name, lambda x=x, name=name: compare(softmax(x.clone()), torch.softmax(x, dim=-1), name))
        for name, x in inputs.items()
    ]
    run_cases("check_softmax", cases)
