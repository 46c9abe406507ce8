"""Chapter 05's kernels that skip work, as timing methods: a sliding-window mask given to dense
kernels vs kernels that never compute the masked pairs.

:func:`sparse_methods` builds, for a causal window of ``window`` keys on one sequence of
:data:`HEADS` heads of :data:`HEAD_DIM`, one builder per kernel for :func:`course_lib.measure.sweep`
(``build(T)`` makes the inputs and returns the zero-argument call to measure). The mask is built
outside the timed call (it is an input), so every method is charged only for its own work.
Chapter 05's timing widget and the ``sparse`` benchmark suite measure them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..measure import random_qkv
from ..sparse import block_sparse_attention, sliding_window_attention, sliding_window_mask
from ..standard import attention

__all__ = ["WINDOW", "HEADS", "HEAD_DIM", "REFERENCE", "sparse_methods"]

WINDOW = 256
HEADS = 2  # so that dense T x T scores still fit in memory at T = 16384
HEAD_DIM = 64
REFERENCE = "sdpa_masked"


def sparse_methods(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *, window: int = WINDOW
) -> dict[str, Callable[[int], Callable[[], torch.Tensor]]]:
    """Builders ``{kernel: build}`` for a causal window of ``window`` keys (the query included).

    - ``dense_masked``: :func:`course_lib.attention` with :func:`sliding_window_mask` (all T x T
      scores computed, then masked).
    - ``sliding_window``: :func:`sliding_window_attention` (O(T w): never builds T x T).
    - ``block_band``: :func:`block_sparse_attention` with blocks of ``window`` and a layout of the
      diagonal block and the one before it, causal: a slightly wider pattern (each query sees
      between ``window`` and ``2 window - 1`` keys) computed tile by tile.
    - ``sdpa_masked``: :func:`torch.nn.functional.scaled_dot_product_attention` with the mask
      (:data:`REFERENCE`).
    """
    window = check_int(window, "window", min=1)

    def inputs(T: int):
        return random_qkv(T, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)

    def dense_masked(T: int):
        q, k, v = inputs(T)
        mask = sliding_window_mask(T, window, device=device)
        return lambda: attention(q, k, v, mask)

    def sliding_window(T: int):
        q, k, v = inputs(T)
        return lambda: sliding_window_attention(q, k, v, window)

    def block_band(T: int):
        q, k, v = inputs(T)
        blocks = -(-T // window)
        rows = torch.arange(blocks, device=device)
        layout = (rows[:, None] - rows[None, :] >= 0) & (rows[:, None] - rows[None, :] <= 1)
        return lambda: block_sparse_attention(q, k, v, layout, window, causal=True)

    def sdpa_masked(T: int):
        q, k, v = inputs(T)
        mask = sliding_window_mask(T, window, device=device)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    methods = {
        "dense_masked": dense_masked,
        "sliding_window": sliding_window,
        "block_band": block_band,
        "sdpa_masked": sdpa_masked,
    }
    return methods
