"""Checkers for notebook 08: the ring merge step, the MQAR accuracy metric, a hybrid stack's cache bill."""

from __future__ import annotations

import torch

from ..recall import IGNORE
from .common import Case, Draw, Mismatch, checker, compare, compare_number

__all__ = ["check_ring_merge", "check_answer_accuracy", "check_hybrid_cache_bytes"]

NEG_INF = float("-inf")


@checker("8.1", title="the ring merge step", points=2, task="the ring merge")
def check_ring_merge(draw: Draw):
    """``fn(o1, lse1, o2, lse2) -> (o, lse)``: merge attention over two disjoint key blocks. ``o_i``
    (B, H, T, D_v) are normalised partial outputs, ``lse_i`` (B, H, T) their logsumexps (``-inf`` with a
    zero output where a query sees no key of the block). Must equal attention over both blocks."""
    for name, T, S1, S2, offset, empty in [
        ("two blocks of uneven size", draw.int(2, 6), draw.int(1, 4), draw.int(5, 9), 0.0, None),
        ("one key in each block", draw.int(1, 3), 1, 1, 0.0, None),
        ("logsumexps around +800", draw.int(1, 4), draw.int(2, 6), draw.int(2, 6), 800.0, None),
        ("logsumexps around -800", draw.int(1, 4), draw.int(2, 6), draw.int(2, 6), -800.0, None),
        (
            "causal: some queries see nothing in the second block",
            draw.int(3, 6),
            draw.int(2, 5),
            draw.int(2, 5),
            0.0,
            "second",
        ),
        (
            "some queries see nothing in either block",
            draw.int(3, 6),
            draw.int(2, 4),
            draw.int(2, 4),
            0.0,
            "both",
        ),
    ]:
        yield _ring_case(draw, name, T, S1, S2, offset, empty)


def _ring_case(draw, name, T, S1, S2, offset, empty) -> Case:
    D_v = draw.choice([3, 5])
    scores = offset + draw.randn(1, 2, T, S1 + S2, scale=2.0)
    allowed = torch.ones(T, S1 + S2, dtype=torch.bool)
    if empty == "second":
        allowed[: T // 2 + 1, S1:] = False
    elif empty == "both":
        allowed[0] = False
        allowed[-1, S1:] = False
    masked = scores.masked_fill(~allowed, NEG_INF)
    v = draw.randn(1, 2, S1 + S2, D_v)

    def part(lo, hi):
        piece = masked[..., lo:hi]
        lse = torch.logsumexp(piece, -1)
        weights = torch.exp(piece - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        return weights @ v[:, :, lo:hi], lse

    o1, lse1 = part(0, S1)
    o2, lse2 = part(S1, S1 + S2)
    o, lse = part(0, S1 + S2)
    nothing = ~allowed.any(-1).expand(1, 2, T)
    regions = {
        "in queries that see no key in either block": nothing,
        "in queries whose logsumexps exceed 700 in size": torch.maximum(
            lse1.masked_fill(torch.isinf(lse1), 0.0).abs(), lse2.masked_fill(torch.isinf(lse2), 0.0).abs()
        )
        > 700,
        "in queries that see no key in one of the blocks": (torch.isinf(lse1) | torch.isinf(lse2)) & ~nothing,
    }
    advice = {
        list(regions)[0]: "both lse are -inf: the merged output is 0 and the merged lse -inf, not NaN",
        list(regions)[1]: "exp(lse) overflows (or underflows to 0/0): weigh o_i by exp(lse_i - lse) with the "
        "merged lse = logaddexp(lse1, lse2)",
        list(regions)[2]: "a block with lse = -inf must get weight 0",
    }
    variants = {
        "the plain average (o1 + o2) / 2": lambda: (o1 + o2) / 2,
        "o weighted by the block sizes instead of the softmax mass": lambda: (S1 * o1 + S2 * o2) / (S1 + S2),
    }

    def judge(got, expected):
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Mismatch(f"expected a pair (o, lse), got {type(got).__name__}")
        compare(
            got[0],
            expected[0],
            "merged output",
            atol=1e-10,
            rtol=1e-9,
            regions=regions,
            advice=advice,
            variants=variants,
        )
        compare(got[1], expected[1], "merged lse", atol=1e-10, rtol=1e-10, regions=regions, advice=advice)

    return Case(
        f"{name}: T={T}, blocks of {S1} and {S2} keys",
        (o1, lse1, o2, lse2),
        expected=(o, lse),
        compare=judge,
        inputs=["o1", "lse1", "o2", "lse2"],
    )


@checker(
    "8.2",
    title="the MQAR metric",
    points=1,
    task="the accuracy",
    fallback="course_lib.recall:answer_accuracy",
)
def check_answer_accuracy(draw: Draw):
    """``fn(logits, targets) -> float``: the fraction of answer positions (targets != IGNORE = -100) where
    the arg-max of ``logits`` (B, T, V) equals the target, over all answers of the batch."""
    for name, B, T, V, counts in [
        ("the same number of answers per row", draw.int(2, 4), 16, draw.int(5, 12), "same"),
        ("uneven numbers of answers per row", 3, draw.int(12, 24), draw.int(5, 12), "uneven"),
        ("a row without any answer", 3, draw.int(8, 16), draw.int(4, 9), "empty"),
        ("one answer in the batch", 2, draw.int(4, 8), draw.int(3, 6), "one"),
    ]:
        yield _accuracy_case(draw, name, B, T, V, counts)


def _accuracy_case(draw, name, B, T, V, counts) -> Case:
    logits = draw.randn(B, T, V, dtype=torch.float32)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    guesses = logits.argmax(-1)
    per_row = {
        "same": [T // 4] * B,
        "uneven": [1, T // 2, T - 1][:B],
        "empty": [0, T // 3, 2][:B],
        "one": [1] + [0] * (B - 1),
    }[counts]
    for row, count in enumerate(per_row):
        positions = draw.permutation(T)[:count]
        for position in positions:
            right = draw.rand(()) < (0.8 if row == 0 else 0.3)
            targets[row, position] = guesses[row, position] if right else (guesses[row, position] + 1) % V
    answers = targets != IGNORE
    correct = (guesses == targets) & answers
    expected = float(correct.sum()) / float(answers.sum())
    rows = [float(correct[r].sum() / answers[r].sum()) for r in range(B) if answers[r].any()]
    variants = {
        "the mean of per-row accuracies (rows with fewer answers weigh more)": sum(rows) / len(rows),
        "the accuracy over every position, IGNORE ones included": float((guesses == targets).float().mean()),
        "the fraction of wrong answers": 1 - expected,
        "the number of right answers, not a fraction": float(correct.sum()),
    }

    def judge(got, expected):
        if isinstance(got, float) and got != got:
            raise Mismatch(
                "the accuracy is NaN: a row without answers gives 0/0 if you average row by row; "
                "divide the right answers of the whole batch by all its answers"
            )
        compare_number(
            got,
            expected,
            "accuracy",
            rel=1e-6,
            variants={k: v for k, v in variants.items() if abs(v - expected) > 1e-9},
        )

    return Case(
        f"{name}: B={B}, T={T}, V={V}, answers per row {per_row}",
        (logits, targets),
        expected=expected,
        compare=judge,
        inputs=["logits", "targets"],
    )


@checker("8.3", title="a hybrid stack's cache", points=1, task="the cache size")
def check_hybrid_cache_bytes(draw: Draw):
    """``fn(pattern, seq_len, num_heads, head_dim, window) -> int``: float32 bytes a decoder keeps after
    ``seq_len`` tokens with layer kinds ``pattern``: "full" K and V of every token, "window" of the last
    min(window, seq_len) tokens, "linear" an H x D x (D + 1) state."""
    for name, pattern, T, H, D, w in [
        (
            "windows and one full layer",
            ["window", "window", "full"],
            draw.int(1000, 9000),
            draw.choice([4, 8]),
            draw.choice([32, 64]),
            draw.int(128, 900),
        ),
        ("a sequence shorter than the window", ["window", "full"], draw.int(3, 60), 2, 16, draw.int(64, 200)),
        (
            "linear layers",
            ["linear", "window", "linear", "full"],
            draw.int(500, 3000),
            draw.choice([2, 4]),
            draw.choice([16, 48]),
            draw.int(100, 400),
        ),
        ("a single full layer, odd sizes", ["full"], draw.int(7, 99), 3, 5, 4),
    ]:
        per_kind = {"full": 2 * H * T * D, "window": 2 * H * min(w, T) * D, "linear": H * D * (D + 1)}
        expected = 4 * sum(per_kind[kind] for kind in pattern)
        variants = {
            "window layers caching every token (min(window, seq_len) forgotten)": 4
            * sum({**per_kind, "window": 2 * H * T * D}[kind] for kind in pattern),
            "window layers caching window tokens even when the sequence is shorter": 4
            * sum({**per_kind, "window": 2 * H * w * D}[kind] for kind in pattern),
            "linear states without the normaliser (H x D x D)": 4
            * sum({**per_kind, "linear": H * D * D}[kind] for kind in pattern),
            "the number of cached numbers (not bytes)": expected / 4,
            "fp16 sizes (2 bytes per number)": expected / 2,
            "keys only (values forgotten)": 4
            * sum({**per_kind, "full": H * T * D, "window": H * min(w, T) * D}[kind] for kind in pattern),
        }

        def judge(got, expected, variants=variants):
            compare_number(
                got,
                expected,
                "cache bytes",
                integer=True,
                variants={k: v for k, v in variants.items() if v != expected},
            )

        yield Case(
            f"{name}: pattern {pattern}, seq_len={T}, H={H}, D={D}, window={w}",
            (list(pattern), T, H, D, w),
            expected=expected,
            compare=judge,
            inputs=["pattern", "seq_len", "num_heads", "head_dim", "window"],
        )
