"""Checkers for notebook 05: a dilated mask, a block layout to a token mask, the StreamingLLM keep
set, and the number of layers a causal window needs to connect a sequence."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sparse import block_sparse_mask, dilated_mask, layers_to_connect, sliding_window_mask, streaming_keep
from .common import ExerciseFailed, compare, run_cases

__all__ = ["check_dilated_mask", "check_block_layout_to_mask", "check_streaming_keep", "check_window_layers"]


def check_dilated_mask(fn: Callable[[int, int, int], torch.Tensor]) -> None:
    """``fn(T, window, dilation)`` must return the causal ``(T, T)`` bool mask in which query ``i``
    sees keys ``i, i - dilation, ..., i - (window - 1) * dilation`` (those that exist)."""

    def case(T, window, dilation):
        expected = dilated_mask(T, window, dilation)
        return lambda: compare(
            fn(T, window, dilation), expected, f"T={T}, window={window}, dilation={dilation}"
        )

    cases = [(8, 3, 2), (10, 4, 3), (6, 1, 2), (7, 3, 1), (5, 8, 2), (1, 2, 2)]
    run_cases("check_dilated_mask", [(f"T, window, dilation = {c}", case(*c)) for c in cases])


def check_block_layout_to_mask(fn: Callable[[torch.Tensor, int, int], torch.Tensor]) -> None:
    """``fn(layout, block_size, T)`` must expand a ``(ceil(T/b), ceil(T/b))`` bool layout to the
    ``(T, T)`` token mask: entry ``[a, c]`` switches on queries ``a*b ..`` x keys ``c*b ..``,
    and a last, partial block is cropped to ``T``."""
    generator = torch.Generator().manual_seed(5)

    def case(T, block_size):
        blocks = -(-T // block_size)
        layout = torch.rand(blocks, blocks, generator=generator) < 0.4
        layout[0, -1] = True  # a corner tile, so an off-by-one in the cropping shows
        expected = block_sparse_mask(layout, block_size, T, T)
        return lambda: compare(fn(layout.clone(), block_size, T), expected, f"T={T}, block_size={block_size}")

    cases = [(8, 2), (12, 4), (10, 4), (7, 3), (5, 8), (6, 1)]
    run_cases("check_block_layout_to_mask", [(f"T, block_size = {c}", case(*c)) for c in cases])


def check_streaming_keep(fn: Callable[[int, int, int], torch.Tensor]) -> None:
    """``fn(seq_len, budget, num_sinks)`` must return the sorted int64 indices StreamingLLM keeps:
    the first ``num_sinks`` tokens and the newest ``budget - num_sinks``; everything when
    ``budget >= seq_len``."""

    def case(seq_len, budget, num_sinks):
        expected = streaming_keep(seq_len, budget, num_sinks=num_sinks)

        def check():
            got = fn(seq_len, budget, num_sinks)
            what = f"seq_len={seq_len}, budget={budget}, num_sinks={num_sinks}"
            if isinstance(got, torch.Tensor) and got.is_floating_point():
                raise ExerciseFailed(f"{what}: indices must be integers, got dtype {got.dtype}")
            compare(got, expected, what, atol=0, rtol=0)

        return check

    cases = [(20, 8, 4), (100, 10, 2), (16, 4, 4), (10, 6, 0), (5, 8, 4), (12, 12, 3)]
    run_cases("check_streaming_keep", [(f"seq_len, budget, num_sinks = {c}", case(*c)) for c in cases])


def check_window_layers(fn: Callable[[int, int], int]) -> None:
    """``fn(T, window)`` must return how many layers of a causal sliding window (``window >= 2``)
    it takes until the last token has heard from the first (counted by
    :func:`course_lib.sparse.layers_to_connect` on the mask)."""

    def case(T, window):
        expected = layers_to_connect(sliding_window_mask(T, window))

        def check():
            got = fn(T, window)
            if isinstance(got, bool) or not isinstance(got, int):
                raise ExerciseFailed(f"T={T}, window={window}: expected an int, got {type(got).__name__}")
            if got != expected:
                raise ExerciseFailed(f"T={T}, window={window}: got {got} layers, expected {expected}")

        return check

    cases = [(16, 4), (64, 8), (10, 2), (33, 5), (8, 16), (2, 2)]
    run_cases("check_window_layers", [(f"T, window = {c}", case(*c)) for c in cases])
