"""Checkers for notebook 03: merging softmax statistics, one FA2 tile update, combining split-KV
partials, and counting the tiles causal attention skips.

Expected values are computed from their definitions on whole rows (dense softmax, logsumexp),
not from the library's tiled code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .common import ExerciseFailed, compare, run_cases

__all__ = ["check_merge_softmax_stats", "check_fa2_step", "check_combine_partials", "check_causal_skips"]


def _pair(got: object, case: str, count: int = 2) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != count:
        raise ExerciseFailed(f"{case}: expected a tuple of {count} tensors, got {type(got).__name__}")
    return tuple(got)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(x - max)) of each row, from the definition; an empty row gives (-inf, 0)."""
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype), torch.zeros(
            x.shape[:-1], dtype=x.dtype
        )
    row_max = x.amax(-1)
    return row_max, torch.exp(x - row_max.unsqueeze(-1)).sum(-1)


def check_merge_softmax_stats(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``fn(m_a, l_a, m_b, l_b) -> (m, l)``: the max and the sum of ``exp(x - m)`` over two pieces
    of each row, from each piece's own max ``m_x`` and sum ``l_x = sum(exp(x - m_x))``."""
    generator = torch.Generator().manual_seed(30)

    def case(rows, n_a, n_b, spread):
        x = spread * torch.randn(rows, n_a + n_b, generator=generator, dtype=torch.float64)
        a, b = x[:, :n_a], x[:, n_a:]

        def check():
            m, l = _pair(fn(*_stats(a), *_stats(b)), f"pieces of {n_a} and {n_b}")
            expected_max, expected_sum = _stats(x)
            compare(m, expected_max, f"merged max, pieces of {n_a} and {n_b}")
            compare(l, expected_sum, f"merged sum, pieces of {n_a} and {n_b} (rescaled to the new max?)")

        return check

    cases = [(4, 3, 5, 1.0), (3, 1, 1, 1.0), (2, 6, 2, 30.0), (5, 0, 4, 1.0)]
    run_cases(
        "check_merge_softmax_stats",
        [(f"rows={r}, pieces {a}+{b}, spread {s}", case(r, a, b, s)) for r, a, b, s in cases],
    )


def check_fa2_step(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """``fn(q_block, k_block, v_block, row_max, row_sum, acc) -> (row_max, row_sum, acc)``: one FA2
    inner step. ``q_block`` is already scaled; the state describes the keys seen so far: ``row_max``
    their max score, ``row_sum`` the sum of ``exp(s - row_max)``, ``acc`` the unnormalised
    ``sum exp(s - row_max) v``. After the step the state must describe both key blocks."""
    generator = torch.Generator().manual_seed(31)

    def case(rows, seen, new, D, spread, first):
        q = spread * torch.randn(rows, D, generator=generator, dtype=torch.float64)
        k = torch.randn(seen + new, D, generator=generator, dtype=torch.float64)
        v = torch.randn(seen + new, D, generator=generator, dtype=torch.float64)

        def state(keys, values):
            scores = q @ keys.T
            row_max, row_sum = _stats(scores)
            if keys.shape[0] == 0:
                return row_max, row_sum, torch.zeros(rows, D, dtype=torch.float64)
            return row_max, row_sum, torch.exp(scores - row_max.unsqueeze(-1)) @ values

        def check():
            before = state(k[:seen], v[:seen])
            got = _pair(fn(q, k[seen:], v[seen:], *before), "the step", 3)
            expected = state(k, v)
            label = "first step (state -inf, 0, 0)" if first else f"{seen} keys seen, {new} new"
            for name, g, e in zip(("row_max", "row_sum", "acc"), got, expected):
                compare(g, e, f"{label}: {name}")

        return check

    cases = [
        (4, 5, 3, 8, 1.0, False),
        (2, 0, 4, 3, 1.0, True),
        (3, 6, 6, 4, 6.0, False),
        (1, 2, 1, 1, 1.0, False),
    ]
    run_cases(
        "check_fa2_step",
        [(f"rows={c[0]}, seen={c[1]}, new={c[2]}, D={c[3]}", case(*c)) for c in cases],
    )


def check_combine_partials(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``fn(outputs, lses) -> (o, lse)``: combine attention over disjoint key splits. ``outputs[i]``
    ``(B, H, T, D_v)`` is split i's normalised output and ``lses[i]`` ``(B, H, T)`` its logsumexp
    (``-inf`` and zeros for a split with no keys). Must equal attention over all keys."""
    generator = torch.Generator().manual_seed(32)

    def case(T, S, splits, empty):
        q = torch.randn(1, 2, T, 8, generator=generator, dtype=torch.float64)
        k = torch.randn(1, 2, S, 8, generator=generator, dtype=torch.float64)
        v = torch.randn(1, 2, S, 5, generator=generator, dtype=torch.float64)
        scores = q @ k.transpose(-2, -1) / math.sqrt(8)
        bounds = torch.linspace(0, S, splits + 1).round().long().tolist()
        outputs, lses = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            piece = scores[..., start:end]
            outputs.append(torch.softmax(piece, -1) @ v[:, :, start:end])
            lses.append(torch.logsumexp(piece, -1))
        if empty:
            outputs.append(torch.zeros(1, 2, T, 5, dtype=torch.float64))
            lses.append(torch.full((1, 2, T), float("-inf"), dtype=torch.float64))

        def check():
            o, lse = _pair(fn(outputs, lses), f"{splits} splits")
            compare(o, torch.softmax(scores, -1) @ v, f"T={T}, S={S}, {splits} splits: output")
            compare(lse, torch.logsumexp(scores, -1), f"T={T}, S={S}, {splits} splits: logsumexp")

        return check

    cases = [(1, 64, 4, False), (3, 10, 2, False), (1, 7, 7, False), (2, 12, 3, True)]
    run_cases(
        "check_combine_partials",
        [
            (f"T={t}, S={s}, splits={n}" + (" + an empty split" if e else ""), case(t, s, n, e))
            for t, s, n, e in cases
        ],
    )


def check_causal_skips(fn: Callable[[int, int, int, int], int]) -> None:
    """``fn(T, S, block_q, block_k)``: how many (Q block, K block) tiles causal attention skips
    because no query in the tile may see any key in it (query i sees keys j <= i + S - T)."""

    def case(T, S, block_q, block_k):
        def check():
            rows = torch.arange(T).unsqueeze(1)
            cols = torch.arange(S).unsqueeze(0)
            allowed = cols <= rows + (S - T)
            expected = 0
            for q0 in range(0, T, block_q):
                for k0 in range(0, S, block_k):
                    expected += not bool(allowed[q0 : q0 + block_q, k0 : k0 + block_k].any())
            got = fn(T, S, block_q, block_k)
            if isinstance(got, bool) or not isinstance(got, int):
                raise ExerciseFailed(
                    f"T={T}, S={S}, blocks {block_q}x{block_k}: expected an int, got {got!r}"
                )
            if got != expected:
                raise ExerciseFailed(
                    f"T={T}, S={S}, blocks {block_q}x{block_k}: got {got}, expected {expected}"
                )

        return check

    cases = [
        (1024, 1024, 64, 64),
        (16, 16, 4, 4),
        (10, 10, 3, 4),
        (8, 20, 4, 4),
        (100, 100, 128, 128),
        (64, 64, 16, 8),
    ]
    run_cases("check_causal_skips", [(f"{c}", case(*c)) for c in cases])
