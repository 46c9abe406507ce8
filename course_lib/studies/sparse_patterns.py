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
    moba_mask,
    nsa_masks,
    sliding_window_mask,
    strided_mask,
)

__all__ = ["PATTERNS", "routing_inputs", "pattern_mask", "NSA_BRANCHES", "nsa_branch_map"]

PATTERNS = ("window", "dilated", "strided", "fixed", "global+local", "bigbird", "block", "nsa", "moba")


def routing_inputs(T: int, *, head_dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded queries and keys ``(1, 1, T, head_dim)`` for the patterns that read the content (NSA, MoBA).

    Each token is a random unit-scale vector, so which blocks a query prefers is arbitrary but
    fixed by ``seed``: the gallery shows the *shape* of a content-chosen selection, not a trained one.
    """
    T = check_int(T, "T", min=0)
    head_dim = check_int(head_dim, "head_dim", min=1)
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    q, k = torch.randn(2, 1, 1, T, head_dim, generator=generator)
    return q, k


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
    top_k: int = 2,
) -> torch.Tensor:
    """The ``(T, T)`` mask of one gallery pattern, built by the library's mask builders.

    ``window``: local and dilated windows, the local part of global+local and NSA's window.
    ``dilation``: the dilated pattern. ``stride``: strided and fixed (Sparse Transformers).
    ``num_globals``: global tokens of global+local (the first ones, like a CLS token) and global
    blocks of BigBird. ``random_blocks`` and ``block_size``: BigBird (window of 3 blocks) and
    "block", a block-diagonal layout plus ``random_blocks`` random blocks per row (both seeded by
    ``seed``). ``block_size`` and ``top_k`` are also the key blocks and the blocks chosen per
    query of the two trainable patterns, which choose from the content of :func:`routing_inputs`
    (seeded by ``seed``) and are always causal:

    - "moba": :func:`course_lib.sparse.moba_mask`, the ``top_k`` blocks with the best mean key,
      the query's own block always among them;
    - "nsa": the keys NSA reads at full resolution, the ``top_k`` selected blocks
      (:func:`course_lib.sparse.nsa_masks`; the first block and the query's own forced once
      ``top_k >= 2``, scored by compressed blocks of ``block_size`` every ``block_size / 2`` keys)
      and the window of ``window`` keys. Its third branch, the compressed keys, covers the
      whole past coarsely and is not a token mask.
    """
    check_choice(pattern, "pattern", PATTERNS)
    T = check_int(T, "T", min=1)
    window = check_int(window, "window", min=1)
    dilation = check_int(dilation, "dilation", min=1)
    stride = check_int(stride, "stride", min=1)
    num_globals = check_int(num_globals, "num_globals", min=0)
    random_blocks = check_int(random_blocks, "random_blocks", min=0)
    block_size = check_int(block_size, "block_size", min=1)
    top_k = check_int(top_k, "top_k", min=1)
    check_bool(causal, "causal")
    if pattern == "moba":
        q, k = routing_inputs(T, seed=seed)
        return moba_mask(q, k, block_size=block_size, top_k=top_k)[0, 0]
    if pattern == "nsa":
        q, k = routing_inputs(T, seed=seed)
        masks = nsa_masks(
            q, k, block_size=block_size, num_selected=top_k, window=window, compress_block=block_size,
            compress_stride=max(1, block_size // 2), num_initial_blocks=1 if top_k >= 2 else 0,
            num_local_blocks=1,
        )  # fmt: skip
        return masks["selected"][0, 0] | masks["window"]
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


NSA_BRANCHES = ("not read", "compressed only", "selected block", "window", "selected and window")


def nsa_branch_map(
    T: int,
    *,
    block_size: int = 8,
    num_selected: int = 3,
    window: int = 8,
    compress_block: int = 8,
    compress_stride: int = 4,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Which of NSA's branches reads each (query, key) pair, on :func:`routing_inputs`: ``(T, T)`` long.

    Values index :data:`NSA_BRANCHES`: 0 not read at all; 1 only through the compressed branch (the
    key lies in a compression block wholly before the query, seen as part of one mean key); 2 in a
    selected block; 3 in the window; 4 in both. From :func:`course_lib.sparse.nsa_masks`.
    """
    T = check_int(T, "T", min=1)
    q, k = routing_inputs(T, seed=seed)
    masks = nsa_masks(
        q, k, block_size=block_size, num_selected=num_selected, window=window, compress_block=compress_block,
        compress_stride=compress_stride, num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
    )  # fmt: skip
    # A key is seen coarsely when a visible compression block (T, N_c) covers it.
    starts = torch.arange(masks["compressed"].shape[1]) * compress_stride
    covers = (torch.arange(T)[None, :] >= starts[:, None]) & (
        torch.arange(T)[None, :] < starts[:, None] + compress_block
    )
    compressed = (masks["compressed"].float() @ covers.float()) > 0
    selected, in_window = masks["selected"][0, 0], masks["window"]
    branch = compressed.long()
    branch = torch.where(selected, 2, branch)
    branch = torch.where(in_window, 3, branch)
    return torch.where(selected & in_window, 4, branch)
