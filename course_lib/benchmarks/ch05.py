"""Chapter 05's benchmark: a sliding-window mask given to dense kernels vs a kernel that skips it.

    python -m course_lib.bench sparse                       # T = 1024 .. 16384, window 256
    python -m course_lib.bench sparse --lengths 1024 4096

One sequence, 2 heads (so dense T x T scores still fit in memory at T = 16384), D = 64, causal
window of 256 keys. The mask is built outside the timed
call (it is an input), so every method is charged only for its own work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..measure import random_qkv
from ..sparse import block_sparse_attention, sliding_window_attention, sliding_window_mask
from ..standard import attention

__all__ = ["SUITES", "WINDOW", "sparse_suite"]

WINDOW = 256
HEADS = 2


def sparse_suite(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *, window: int = WINDOW
):
    """Causal sliding window: dense attention with the mask vs the banded kernel vs a block band vs SDPA.

    One sequence, 2 heads, D = 64, window 256; T = 1024 .. 16384. Reference: SDPA with the mask.

    - ``dense_masked``: :func:`course_lib.attention` with :func:`sliding_window_mask` (all T x T
      scores computed, then masked).
    - ``sliding_window``: :func:`sliding_window_attention` (O(T w): never builds T x T).
    - ``block_band``: :func:`block_sparse_attention` with blocks of ``window`` and a layout of the
      diagonal block and the one before it, causal: a slightly wider pattern (each query sees
      between ``window`` and ``2 window - 1`` keys) computed tile by tile.
    - ``sdpa_masked``: :func:`torch.nn.functional.scaled_dot_product_attention` with the mask
      (the reference).
    """
    window = check_int(window, "window", min=1)

    def inputs(T: int):
        return random_qkv(T, heads=HEADS, device=device, dtype=dtype)

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
    return methods, "sdpa_masked", [1024, 2048, 4096, 8192, 16384]


sparse_suite.shape = {"B": 1, "H": HEADS, "D": 64, "window": WINDOW}
SUITES = {"sparse": sparse_suite}
