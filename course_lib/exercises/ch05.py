"""Checkers for notebook 05: a dilated mask, a block layout to a token mask, the StreamingLLM keep set,
and the number of layers a causal window needs to connect a sequence."""

from __future__ import annotations

import math

import torch

from .common import Case, Draw, Mismatch, checker, compare_exact, compare_number

__all__ = ["check_dilated_mask", "check_block_layout_to_mask", "check_streaming_keep", "check_window_layers"]


def _dilated(
    T: int, window: int, dilation: int, *, causal: bool = True, span: int | None = None
) -> torch.Tensor:
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    if not causal:
        distance = distance.abs()
    span = (window - 1) * dilation if span is None else span
    return (distance >= 0) & (distance % dilation == 0) & (distance <= span)


@checker(
    "5.1",
    title="a dilated mask",
    points=1,
    task="the dilated mask",
    fallback="course_lib.sparse:dilated_mask",
)
def check_dilated_mask(draw: Draw):
    """``fn(T, window, dilation)``: the causal (T, T) bool mask where query i sees keys i, i - r, ...,
    i - (window - 1) r that exist."""
    for name, T, window, dilation in [
        ("a typical pattern", draw.int(8, 16), draw.int(2, 4), draw.int(2, 3)),
        ("window 1: only the query itself", draw.int(4, 9), 1, draw.int(2, 4)),
        ("dilation 1: a plain sliding window", draw.int(5, 12), draw.int(2, 5), 1),
        ("a window longer than the sequence", draw.int(3, 6), draw.int(7, 9), 2),
        ("T = 1", 1, draw.int(1, 3), draw.int(1, 3)),
    ]:
        variants = {
            "the pattern in both directions (not causal)": lambda T=T, w=window, r=dilation: _dilated(
                T, w, r, causal=False
            ),
            "keys up to window - 1 positions back, not window - 1 *kept* keys back": (
                lambda T=T, w=window, r=dilation: _dilated(T, w, r, span=w - 1)
            ),
            "a plain sliding window (the dilation ignored)": lambda T=T, w=window: _dilated(T, w, 1),
        }

        def judge(got, expected, variants=variants, name=f"T={T}, window={window}, dilation={dilation}"):
            compare_exact(got, expected, f"mask ({name})", variants=variants)

        yield Case(
            f"{name}: T={T}, window={window}, dilation={dilation}",
            (T, window, dilation),
            expected=_dilated(T, window, dilation),
            compare=judge,
            inputs=["T", "window", "dilation"],
        )


@checker("5.2", title="from a block layout to a token mask", points=1, task="the block-layout expansion")
def check_block_layout_to_mask(draw: Draw):
    """``fn(layout, block_size, T)``: expand a (ceil(T/b), ceil(T/b)) bool layout to the (T, T) token mask,
    cropping the last, partial blocks."""
    for name, T, block_size in [
        ("b divides T", (b := draw.choice([2, 3, 4])) * draw.int(2, 4), b),
        ("b does not divide T", draw.not_multiple(7, 19, 4), 4),
        ("another ragged size", draw.not_multiple(5, 14, 3), 3),
        ("one block larger than T", draw.int(2, 5), 8),
        ("blocks of one token", draw.int(3, 7), 1),
    ]:
        blocks = -(-T // block_size)
        layout = draw.rand(blocks, blocks) < 0.45
        layout[0, -1] = True  # a corner tile, so an off-by-one in the cropping shows
        expected = layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:T, :T]
        variants = {
            "the layout tiled (repeat) instead of each entry blown up (repeat_interleave)": (
                lambda layout=layout, b=block_size, T=T: layout.repeat(b, b)[:T, :T]
            ),
            "the layout transposed": lambda layout=layout, b=block_size, T=T: layout.T.repeat_interleave(
                b, 0
            ).repeat_interleave(b, 1)[:T, :T],
            "the mask not cropped to T x T": lambda layout=layout, b=block_size: layout.repeat_interleave(
                b, 0
            ).repeat_interleave(b, 1),
        }

        def judge(got, expected, variants=variants, label=f"T={T}, block_size={block_size}"):
            compare_exact(got, expected, f"token mask ({label})", variants=variants)

        yield Case(
            f"{name}: T={T}, block_size={block_size}",
            (layout, block_size, T),
            expected=expected,
            compare=judge,
            inputs=["layout", "block_size", "T"],
        )


def _streaming(seq_len: int, budget: int, num_sinks: int) -> torch.Tensor:
    if budget >= seq_len:
        return torch.arange(seq_len)
    recent = budget - num_sinks
    return torch.cat([torch.arange(num_sinks), torch.arange(seq_len - recent, seq_len)])


@checker(
    "5.3",
    title="the StreamingLLM keep set",
    points=1,
    task="the StreamingLLM keep set",
    fallback="course_lib.sparse:streaming_keep",
)
def check_streaming_keep(draw: Draw):
    """``fn(seq_len, budget, num_sinks)``: the sorted int64 indices kept: the first ``num_sinks`` and the
    newest ``budget - num_sinks``; all of them when ``budget >= seq_len``."""
    for name, seq_len, budget, sinks in [
        ("a typical budget", draw.int(30, 90), draw.int(8, 20), draw.int(1, 4)),
        ("no sinks", draw.int(10, 40), draw.int(3, 9), 0),
        ("every kept entry a sink", draw.int(10, 30), (s := draw.int(2, 6)), s),
        ("the budget covers the cache", (n := draw.int(3, 9)), n + draw.int(0, 4), min(2, n)),
        ("one entry over budget", (m := draw.int(6, 12)), m - 1, draw.int(1, 3)),
    ]:
        variants = {
            "the newest budget entries (the sinks forgotten)": lambda n=seq_len, b=budget: torch.arange(
                max(0, n - b), n
            ),
            "the sinks plus the newest budget entries (num_sinks too many)": (
                lambda n=seq_len, b=budget, s=sinks: torch.cat(
                    [torch.arange(s), torch.arange(max(s, n - b), n)]
                )
            ),
        }

        def judge(
            got, expected, variants=variants, label=f"seq_len={seq_len}, budget={budget}, sinks={sinks}"
        ):
            if (
                isinstance(got, torch.Tensor)
                and got.dim() == 1
                and got.numel() > 1
                and not bool((got[1:] > got[:-1]).all())
            ):
                raise Mismatch(f"{label}: the indices must be sorted and distinct, got {got.tolist()}")
            compare_exact(got, expected, f"kept indices ({label})", variants=variants)

        yield Case(
            f"{name}: seq_len={seq_len}, budget={budget}, num_sinks={sinks}",
            (seq_len, budget, sinks),
            expected=_streaming(seq_len, budget, sinks),
            compare=judge,
            inputs=["seq_len", "budget", "num_sinks"],
        )


@checker("5.4", title="layers for a causal window", points=1, task="the layer count")
def check_window_layers(draw: Draw):
    """``fn(T, window)``: how many layers of a causal sliding window (window >= 2, counting the query itself)
    until the last of T tokens has heard from the first: ceil((T - 1) / (window - 1))."""
    for name, T, window in [
        ("a long sequence, a short window", draw.int(40, 200), draw.int(3, 9)),
        ("window 2: one step back per layer", draw.int(5, 30), 2),
        ("T - 1 a multiple of window - 1", (w := draw.int(3, 6)) + (w - 1) * draw.int(2, 5), w),
        ("a window longer than the sequence", draw.int(2, 8), draw.int(9, 20)),
        ("T = 2", 2, draw.int(2, 5)),
    ]:
        expected = math.ceil((T - 1) / (window - 1))
        variants = {
            "ceil(T / window)": math.ceil(T / window),
            "floor((T - 1) / (window - 1)) (rounded down)": (T - 1) // (window - 1),
            "ceil((T - 1) / window) (the query counted as a step)": math.ceil((T - 1) / window),
            "ceil(T / (window - 1))": math.ceil(T / (window - 1)),
        }

        def judge(got, expected, variants=variants, label=f"T={T}, window={window}"):
            if isinstance(got, bool) or not isinstance(got, (int, torch.Tensor)):
                raise Mismatch(f"{label}: return the number of layers as an int, got {got!r}")
            compare_number(
                got,
                expected,
                f"layers ({label})",
                integer=True,
                variants={k: v for k, v in variants.items() if v != expected},
            )

        yield Case(
            f"{name}: T={T}, window={window}",
            (T, window),
            expected=expected,
            compare=judge,
            inputs=["T", "window"],
        )
