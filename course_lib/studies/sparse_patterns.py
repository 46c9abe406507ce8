"""Chapter 05's gallery of sparse patterns: the ``(T, T)`` mask of each, built by the library's
mask builders (the mask explorer and the chapter's figures)."""

from __future__ import annotations

import torch

from ..checks import check_bool, check_choice, check_int
from ..sparse import (
    bigbird_layout,
    bigbird_mask,
    block_sparse_mask,
    dilated_mask,
    global_local_mask,
    sliding_window_mask,
    strided_mask,
)

__all__ = ["PATTERNS", "pattern_mask"]

PATTERNS = ("window", "dilated", "strided", "fixed", "global+local", "bigbird", "block")


def pattern_mask(
    pattern: str,
    T: int,
    *,
    window: int = 4,
    dilation: int = 2,
    stride: int = 8,
    num_globals: int = 1,
    random_blocks: int = 1,
    block_size: int = 8,
    causal: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """The ``(T, T)`` mask of one gallery pattern, built by the library's mask builders.

    ``window``: local and dilated windows and the local part of global+local. ``dilation``: the
    dilated pattern. ``stride``: strided and fixed (Sparse Transformers). ``num_globals``: global
    tokens of global+local (the first ones, like a CLS token) and global blocks of BigBird.
    ``random_blocks`` and ``block_size``: BigBird (window of 3 blocks) and "block", a
    block-diagonal layout plus ``random_blocks`` random blocks per row (both seeded by ``seed``).
    """
    check_choice(pattern, "pattern", PATTERNS)
    T = check_int(T, "T", min=1)
    window = check_int(window, "window", min=1)
    dilation = check_int(dilation, "dilation", min=1)
    stride = check_int(stride, "stride", min=1)
    num_globals = check_int(num_globals, "num_globals", min=0)
    random_blocks = check_int(random_blocks, "random_blocks", min=0)
    block_size = check_int(block_size, "block_size", min=1)
    check_bool(causal, "causal")
    if pattern == "window":
        return sliding_window_mask(T, window, causal=causal)
    if pattern == "dilated":
        return dilated_mask(T, window, dilation, causal=causal)
    if pattern in ("strided", "fixed"):
        return strided_mask(T, stride, pattern=pattern, causal=causal)
    if pattern == "global+local":
        return global_local_mask(T, window, list(range(min(num_globals, T))), causal=causal)
    if pattern == "bigbird":
        return bigbird_mask(
            T, block_size, global_blocks=num_globals, random_blocks=random_blocks, causal=causal, seed=seed
        )
    layout = bigbird_layout(
        -(-T // block_size),
        window_blocks=1,
        global_blocks=0,
        random_blocks=random_blocks,
        causal=causal,
        seed=seed,
    )
    mask = block_sparse_mask(layout, block_size, T, T)
    return mask & torch.ones(T, T, dtype=torch.bool).tril() if causal else mask
