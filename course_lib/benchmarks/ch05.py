"""Chapter 05's benchmark: a sliding-window mask given to dense kernels vs a kernel that skips it.

    python -m course_lib.bench sparse                       # T = 1024 .. 16384, window 256
    python -m course_lib.bench sparse --lengths 1024 4096

One sequence, 2 heads (so dense T x T scores still fit in memory at T = 16384), D = 64, causal
window of 256 keys. The kernels and their inputs are the study
:mod:`course_lib.studies.sparse_kernels`; the mask is built outside the timed call (it is an
input), so every method is charged only for its own work.
"""

from __future__ import annotations

import torch

from ..studies.sparse_kernels import HEAD_DIM, HEADS, REFERENCE, WINDOW, sparse_methods

__all__ = ["SUITES", "WINDOW", "sparse_suite"]


def sparse_suite(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *, window: int = WINDOW
):
    """Causal sliding window: dense attention with the mask vs the banded kernel vs a block band vs SDPA.

    One sequence, 2 heads, D = 64, window 256; T = 1024 .. 16384. Reference: SDPA with the mask.
    The kernels are those of :func:`course_lib.studies.sparse_kernels.sparse_methods`.
    """
    return sparse_methods(device, dtype, window=window), REFERENCE, [1024, 2048, 4096, 8192, 16384]


sparse_suite.shape = {"B": 1, "H": HEADS, "D": HEAD_DIM, "window": WINDOW}
SUITES = {"sparse": sparse_suite}
