"""Checkers for notebook 08: the ring merge step, the MQAR accuracy metric, a hybrid stack's cache bill."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..recall import IGNORE, answer_accuracy
from ..specialized import mixer_cost
from ..standard import attention
from .common import ExerciseFailed, compare, run_cases

__all__ = ["check_ring_merge", "check_answer_accuracy", "check_hybrid_cache_bytes"]

F64 = torch.float64


def _partial(q, k, v):
    """Normalised attention of q to one key block and its logsumexp (the ring's per-step result)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def check_ring_merge(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``fn(o1, lse1, o2, lse2) -> (o, lse)``: merge attention over two disjoint key blocks.

    o_i ``(B, H, T, D_v)`` are normalised partial outputs, lse_i ``(B, H, T)`` their logsumexps.
    The merged result must equal attention over both blocks at once; extreme logits included.
    """
    generator = torch.Generator().manual_seed(8)

    def case(T, S1, S2, spread):
        q = torch.randn(1, 2, T, 8, generator=generator, dtype=F64) * spread
        k = torch.randn(1, 2, S1 + S2, 8, generator=generator, dtype=F64) * spread
        v = torch.randn(1, 2, S1 + S2, 5, generator=generator, dtype=F64)
        o1, lse1 = _partial(q, k[:, :, :S1], v[:, :, :S1])
        o2, lse2 = _partial(q, k[:, :, S1:], v[:, :, S1:])
        expected = attention(q, k, v)
        expected_lse = torch.logsumexp(q @ k.transpose(-1, -2) * 8**-0.5, -1)

        def check():
            result = fn(o1, lse1, o2, lse2)
            if not isinstance(result, tuple) or len(result) != 2:
                raise ExerciseFailed("check_ring_merge: return a pair (o, lse)")
            compare(
                result[0],
                expected,
                f"merged output (T={T}, blocks {S1}+{S2}, logit scale {spread})",
                atol=1e-8,
            )
            compare(result[1], expected_lse, f"merged lse (T={T}, blocks {S1}+{S2})", atol=1e-8)

        return f"T={T}, blocks {S1}+{S2}, scale {spread}", check

    run_cases("check_ring_merge", [case(4, 3, 5, 1.0), case(1, 1, 1, 1.0), case(6, 4, 4, 30.0)])


def check_answer_accuracy(fn: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
    """``fn(logits, targets) -> float``: fraction of answer positions (targets != IGNORE = -100)
    where the arg-max of logits ``(B, T, V)`` equals the target."""
    generator = torch.Generator().manual_seed(9)

    def case(B, T, V, answers):
        logits = torch.randn(B, T, V, generator=generator)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        positions = torch.rand(B, T, generator=generator).argsort(-1)[:, :answers]
        guesses = logits.argmax(-1)
        truth = torch.randint(0, V, (B, answers), generator=generator)
        truth[:, ::2] = guesses.gather(1, positions)[:, ::2]  # about half of them right
        targets.scatter_(1, positions, truth)
        expected = answer_accuracy(logits, targets)

        def check():
            got = fn(logits, targets)
            got = float(got.item() if isinstance(got, torch.Tensor) else got)
            if abs(got - expected) > 1e-6:
                hint = " (did you count the IGNORE positions too?)" if abs(got - expected) > 0.05 else ""
                raise ExerciseFailed(
                    f"check_answer_accuracy: B={B}, T={T}: got {got:.4f}, expected {expected:.4f}{hint}"
                )

        return f"B={B}, T={T}", check

    run_cases("check_answer_accuracy", [case(2, 16, 10, 4), case(3, 32, 20, 7), case(1, 5, 3, 1)])


def check_hybrid_cache_bytes(fn: Callable[..., int]) -> None:
    """``fn(pattern, seq_len, num_heads, head_dim, window) -> int``: float32 bytes a decoder keeps
    after ``seq_len`` tokens with layer kinds ``pattern`` ("full": K and V of every token, "window":
    of the last ``window`` tokens, "linear": an H x D x (D + 1) state)."""

    def expected(pattern, T, H, D, w):
        return sum(mixer_cost(kind, T, num_heads=H, head_dim=D, window=w).cache_bytes for kind in pattern)

    def case(pattern, T, H, D, w):
        def check():
            got = fn(list(pattern), T, H, D, w)
            want = expected(pattern, T, H, D, w)
            if int(got) != want:
                raise ExerciseFailed(
                    f"check_hybrid_cache_bytes: pattern {pattern}, T={T}, H={H}, D={D}, window={w}: "
                    f"got {got}, expected {want}"
                )

        return f"{pattern}", check

    run_cases(
        "check_hybrid_cache_bytes",
        [
            case(("window", "window", "full"), 4096, 8, 64, 512),
            case(("full",), 10, 2, 16, 4),
            case(("linear", "window", "linear", "full"), 1000, 4, 32, 2048),
        ],
    )
