"""Checkers for notebook 08: the ring merge step, the MQAR accuracy metric, a hybrid stack's cache bill, an
MQAR evaluation by distance; and the chapter's predict and explain exercises."""

from __future__ import annotations

import torch

from ..recall import IGNORE, MQARTask, mqar_batch
from .common import Case, Draw, Mismatch, checker, compare, compare_number, declare

__all__ = ["check_ring_merge", "check_answer_accuracy", "check_hybrid_cache_bytes", "check_mqar_evaluation"]

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


# ---------------------------------------------------------------------------------------------------
# 8.4: evaluating a model on MQAR, overall and by the distance from the key to its query.


class _ToyRecaller(torch.nn.Module):
    """A stand-in for a trained MQAR model, cheap and deterministic: it answers a query with the value of
    the queried key, except that it forgets a pair more often the farther back it is; in training mode it
    also gets every third position wrong (as dropout would change its answers). It counts its calls and
    those made with gradients on, so the checker can tell how it was run."""

    def __init__(self, vocab_size: int, num_pairs: int):
        super().__init__()
        self.vocab_size, self.num_pairs = vocab_size, num_pairs
        self.strength = torch.nn.Parameter(torch.tensor(5.0))
        self.calls = self.calls_with_grad = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.calls_with_grad += int(torch.is_grad_enabled())
        B, T = inputs.shape
        n, first_value = self.num_pairs, (self.vocab_size - 1) // 2 + 1
        keys, values = inputs[:, 0 : 2 * n : 2], inputs[:, 1 : 2 * n : 2]
        match = inputs[:, :, None] == keys[:, None, :]  # (B, T, n): which pair's key sits at t
        match[:, : 2 * n] = False  # the pairs themselves are not queries
        found, pair = match.any(-1), match.int().argmax(-1)
        position = torch.arange(T)[None, :]
        distance = position - 2 * pair
        noise = ((inputs.sum(1, keepdim=True) * 7 + position * 13) % 97).double() / 97
        forgotten = noise < distance.double() / T
        if self.training:
            forgotten = forgotten | (position % 3 == 0)
        right = values.gather(1, pair)
        wrong = (right - first_value + 1) % (self.vocab_size - first_value) + first_value
        answer = torch.where(found & ~forgotten, right, torch.where(found, wrong, torch.zeros_like(right)))
        return torch.nn.functional.one_hot(answer, self.vocab_size).to(self.strength.dtype) * self.strength


def _mqar_evaluation(model, batches, num_pairs, edges, *, training=False, distance_from=0, per_batch=False,
                     closed=False, count_ignore=False):  # fmt: skip
    """The reference evaluation (model in eval mode, no gradients), or one named mistake, for hints."""
    was = model.training
    model.train(training)
    right, distances, per_batch_scores = [], [], []
    with torch.no_grad():
        for inputs, targets in batches:
            guesses = model(inputs).argmax(-1)
            if count_ignore:
                right.append((guesses == targets).flatten())
                per_batch_scores.append(float(right[-1].double().mean()))
                distances.append(torch.zeros(right[-1].numel(), dtype=torch.long))
                continue
            rows, positions = (targets != IGNORE).nonzero(as_tuple=True)
            hits = guesses[rows, positions] == targets[rows, positions]
            keys = inputs[:, 0 : 2 * num_pairs : 2]
            pair = (keys[rows] == inputs[rows, positions][:, None]).int().argmax(-1)
            right.append(hits)
            distances.append(positions - (2 * pair + distance_from if distance_from >= 0 else 2 * num_pairs))
            per_batch_scores.append(float(hits.double().mean()))
    model.train(was)
    right, distances = torch.cat(right).double(), torch.cat(distances)
    accuracy = sum(per_batch_scores) / len(per_batch_scores) if per_batch else float(right.mean())
    by_distance = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (
            (distances > low) & (distances <= high) if closed else (distances >= low) & (distances < high)
        )
        by_distance.append(float(right[inside].mean()) if inside.any() else None)
    return accuracy, by_distance


@checker(
    "8.4",
    title="an MQAR evaluation",
    points=2,
    task="the evaluation",
    allow=("course_lib.exercises.ch08._ToyRecaller",),
)
def check_mqar_evaluation(draw: Draw):
    """``fn(model, batches, num_pairs, edges) -> (accuracy, by_distance)``: run ``model`` (logits (B, T, V)
    from tokens (B, T)) on every MQAR batch ``(inputs, targets)`` in eval mode without gradients, leaving
    it in the mode it was in; ``accuracy`` over all answers of all batches; ``by_distance[i]`` the accuracy
    of the answers whose distance (query position minus the position 2i of its key) lies in
    ``[edges[i], edges[i + 1])``, or None when no answer does."""
    for name, vocab, n, T, sizes, edges, training in [
        ("three batches of different sizes", 32, 4, draw.int(20, 28), [draw.int(2, 4), draw.int(6, 9), 5],
         [0, 4, 8, 16, 32], True),
        ("one batch, an empty first bin", draw.choice([24, 40]), 3, draw.int(12, 18), [draw.int(3, 6)],
         [0, 2, 6, 10, 100], True),
        ("longer sequences, more pairs", 64, draw.int(6, 10), draw.int(60, 90), [4, draw.int(2, 3)],
         [0, 16, 32, 64, 128, 256], True),
        ("a model already in eval mode", 32, 4, 24, [3, 7], [0, 8, 24], False),
    ]:  # fmt: skip
        task = MQARTask(vocab_size=vocab, num_pairs=n, seq_len=T)
        generator = torch.Generator().manual_seed(draw.int(0, 2**30))
        batches = [mqar_batch(task, size, generator=generator) for size in sizes]
        yield _mqar_case(f"{name}: vocab {vocab}, {n} pairs, T={T}, batch sizes {sizes}", vocab, n, batches,
                         edges, training)  # fmt: skip


def _mqar_case(name, vocab, n, batches, edges, training) -> Case:
    model = _ToyRecaller(vocab, n)
    model.train(training)
    reference = _ToyRecaller(vocab, n)

    def variant(**mistake):
        return _mqar_evaluation(reference, batches, n, edges, **mistake)

    accuracy_variants = {
        "the mean of per-batch accuracies (batches of different sizes must not weigh the same)": variant(
            per_batch=True
        )[0],
        "the model's accuracy in training mode: call model.eval() before evaluating": variant(training=True)[
            0
        ],
        "the accuracy over every position, IGNORE ones included": variant(count_ignore=True)[0],
    }
    bin_variants = {
        "distances measured from the value (2i + 1), not from the key (2i)": variant(distance_from=1)[1],
        "distances measured from the end of the pairs, not from the key": variant(distance_from=-1)[1],
        "bins (low, high] instead of [low, high)": variant(closed=True)[1],
        "the bins of the model in training mode: call model.eval() before evaluating": variant(training=True)[
            1
        ],
    }

    def judge(got, expected):
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Mismatch(f"expected a pair (accuracy, by_distance), got {type(got).__name__}")
        accuracy, by_distance = got
        if model.calls == 0:
            raise Mismatch("the model was never called: run model(inputs) on every batch")
        if model.calls_with_grad:
            raise Mismatch(
                f"{model.calls_with_grad} of the model's {model.calls} calls ran with gradients on: evaluate "
                "under torch.no_grad() (or torch.inference_mode()), which keeps no graph and no activations"
            )
        if model.training != training:
            raise Mismatch(
                f"the model was {'in training' if training else 'in eval'} mode before your function and is "
                f"{'in training' if model.training else 'in eval'} mode after it: leave it in the mode you "
                "found it (was_training = model.training; ...; model.train(was_training))"
            )
        compare_number(
            accuracy,
            expected[0],
            "accuracy",
            rel=1e-9,
            variants={k: v for k, v in accuracy_variants.items() if abs(v - expected[0]) > 1e-12},
        )
        if not isinstance(by_distance, (list, tuple)) or len(by_distance) != len(edges) - 1:
            raise Mismatch(
                f"by_distance: expected a list of {len(edges) - 1} entries (one per bin of edges {edges}), "
                f"got {by_distance!r}"
            )
        got_bins = [None if b is None else float(b) for b in by_distance]
        named = [
            label
            for label, wrong in bin_variants.items()
            if not _same_bins(wrong, expected[1]) and _same_bins(got_bins, wrong)
        ]
        if named:
            raise Mismatch(
                f"by_distance: {got_bins} differs from {expected[1]}\n"
                f"hint: yours equals {', which here is also '.join(named)}"
            )
        if not _same_bins(got_bins, expected[1]):
            hint = ""
            if any(e is None and g is not None for g, e in zip(got_bins, expected[1])):
                hint = "\nhint: a bin that holds no answer has no accuracy: return None for it (not 0 or NaN)"
            raise Mismatch(f"by_distance: got {got_bins}, expected {expected[1]} (edges {edges}){hint}")

    return Case(
        name,
        (model, batches, n, list(edges)),
        expected=lambda: _mqar_evaluation(reference, batches, n, edges),
        compare=judge,
        inputs=["model", "batches", "num_pairs", "edges"],
    )


def _same_bins(got: list, expected: list) -> bool:
    if len(got) != len(expected):
        return False
    for g, e in zip(got, expected):
        if (g is None) != (e is None):
            return False
        if g is not None and (g != g or abs(g - e) > 1e-9):
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# Predict and explain.

declare("8.5", kind="predict", title="the busiest rank of a causal ring")
declare("8.6", kind="explain", title="when a hybrid stack is the right choice", points=2)
