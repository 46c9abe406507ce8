"""Checkers for notebook 07: one GLA step, the delta-rule update, RetNet's decay matrix, SSD as GLA."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..recurrent import delta_rule, gla, retention_decay_matrix, ssd
from .common import ExerciseFailed, compare, run_cases

__all__ = ["check_gla_step", "check_delta_rule_step", "check_retention_decay_matrix", "check_ssd_as_gla"]

F64 = torch.float64


def check_gla_step(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``fn(state, q, k, v, g, scale) -> (new_state, o)`` for one head and one token.

    state (D_k, D_v); q, k, g (D_k,) with g the log forget gate; v (D_v,). Decay first, then write,
    then read: ``S' = diag(exp(g)) S + k v^T``, ``o = S'^T (scale * q)``. Compared with the library's
    ``gla`` run for one token from ``state``.
    """
    generator = torch.Generator().manual_seed(7)

    def case(D_k, D_v, scale, strong):
        state = torch.randn(D_k, D_v, generator=generator, dtype=F64)
        q, k, g = (torch.randn(D_k, generator=generator, dtype=F64) for _ in range(3))
        g = -g.abs() * (20.0 if strong else 0.3)
        v = torch.randn(D_v, generator=generator, dtype=F64)
        expected_o, expected_state = gla(
            q[None, None, None],
            k[None, None, None],
            v[None, None, None],
            g[None, None, None],
            scale=scale,
            initial_state=state[None, None],
            output_final_state=True,
        )

        def check():
            result = fn(state.clone(), q, k, v, g, scale)
            if not isinstance(result, tuple) or len(result) != 2:
                raise ExerciseFailed("check_gla_step: return a pair (new_state, o)")
            compare(result[0], expected_state[0, 0], f"new state (D_k={D_k}, D_v={D_v})", atol=1e-8)
            compare(
                result[1], expected_o[0, 0, 0], f"output o (D_k={D_k}, D_v={D_v}, scale={scale:g})", atol=1e-8
            )

        return check

    cases = [(4, 4, 0.5, False), (8, 3, 1.0, False), (5, 6, 8**-0.5, True)]
    run_cases("check_gla_step", [(f"D_k={c[0]}, D_v={c[1]}", case(*c)) for c in cases])


def check_delta_rule_step(fn: Callable[..., torch.Tensor]) -> None:
    """``fn(state, k, v, beta) -> new_state``: ``S + beta k (v - S^T k)^T`` for state (D_k, D_v),
    k (D_k,), v (D_v,) and a float beta. Compared with the library's ``delta_rule`` for one token."""
    generator = torch.Generator().manual_seed(8)

    def case(D_k, D_v, beta, unit):
        state = torch.randn(D_k, D_v, generator=generator, dtype=F64)
        k = torch.randn(D_k, generator=generator, dtype=F64)
        k = k / k.norm() if unit else k
        v = torch.randn(D_v, generator=generator, dtype=F64)
        betas = torch.full((1, 1, 1), beta, dtype=F64)
        _, expected = delta_rule(
            k[None, None, None],
            k[None, None, None],
            v[None, None, None],
            betas,
            initial_state=state[None, None],
            output_final_state=True,
        )
        return lambda: compare(
            fn(state.clone(), k, v, beta), expected[0, 0], f"beta={beta}, D_k={D_k}, D_v={D_v}"
        )

    cases = [(4, 4, 1.0, True), (6, 3, 0.3, True), (5, 7, 0.8, False), (3, 3, 0.0, True)]
    run_cases("check_delta_rule_step", [(f"beta={c[2]}", case(*c)) for c in cases])


def check_retention_decay_matrix(fn: Callable[[float, int], torch.Tensor]) -> None:
    """``fn(gamma, T) -> D`` (T, T) with ``D[t, s] = gamma^(t - s)`` for s <= t and 0 above the diagonal."""

    def case(gamma, T):
        expected = retention_decay_matrix(torch.tensor([math.log(gamma)], dtype=F64), T)[0]
        return lambda: compare(fn(gamma, T), expected, f"gamma={gamma}, T={T}", atol=1e-10, rtol=1e-8)

    cases = [(0.5, 4), (0.96875, 7), (0.99609375, 1), (0.9, 12)]
    run_cases("check_retention_decay_matrix", [(f"gamma={g}, T={T}", case(g, T)) for g, T in cases])


def check_ssd_as_gla(fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
    """``fn(x, dt, A, B, C) -> (q, k, v, g)`` such that ``gla(q, k, v, g, scale=1.0)`` equals
    ``ssd(x, dt, A, B, C)``; g must have GLA's shape (batch, H, T, N): one log gate per key dimension."""
    generator = torch.Generator().manual_seed(9)

    def case(batch, H, T, P, N):
        x = torch.randn(batch, H, T, P, generator=generator, dtype=F64)
        dt = torch.nn.functional.softplus(torch.randn(batch, H, T, generator=generator, dtype=F64))
        A = -torch.rand(H, generator=generator, dtype=F64) * 2 - 0.1
        B, C = (torch.randn(batch, H, T, N, generator=generator, dtype=F64) for _ in range(2))
        expected = ssd(x, dt, A, B, C)

        def check():
            result = fn(x, dt, A, B, C)
            if not isinstance(result, tuple) or len(result) != 4:
                raise ExerciseFailed("check_ssd_as_gla: return a tuple (q, k, v, g)")
            q, k, v, g = result
            if not isinstance(g, torch.Tensor) or g.shape != B.shape:
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ExerciseFailed(
                    f"check_ssd_as_gla: g must have shape {tuple(B.shape)} (batch, H, T, N), got {shape}"
                )
            compare(
                gla(q, k, v, g, scale=1.0),
                expected,
                f"gla(mapping) vs ssd, shape {(batch, H, T, P, N)}",
                atol=1e-8,
            )

        return check

    cases = [(1, 1, 5, 3, 4), (2, 3, 11, 4, 2)]
    run_cases("check_ssd_as_gla", [(f"shape {c}", case(*c)) for c in cases])
