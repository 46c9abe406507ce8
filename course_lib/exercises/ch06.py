"""Checkers for notebook 06: the elu+1 feature map, one recurrent step, one chunk update."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..linear import elu_plus_one, identity_map, linear_attention
from .common import ExerciseFailed, compare, run_cases

__all__ = ["check_elu_plus_one", "check_recurrent_step", "check_chunk_update"]


def check_elu_plus_one(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``fn(x)`` must equal ``elu(x) + 1``: ``x + 1`` for ``x > 0``, ``exp(x)`` otherwise."""
    generator = torch.Generator().manual_seed(6)

    def case(x, description):
        return lambda: compare(fn(x.clone()), elu_plus_one(x), description)

    cases = [
        ("a ramp from -5 to 5", torch.linspace(-5, 5, 21, dtype=torch.float64)),
        ("Gaussian (2, 3, 7, 4)", torch.randn(2, 3, 7, 4, generator=generator, dtype=torch.float64)),
        ("very negative inputs", torch.tensor([-30.0, -100.0, -1e4, 0.0], dtype=torch.float64)),
        ("float32 input", torch.randn(5, 3, generator=generator)),
    ]
    run_cases("check_elu_plus_one", [(d, case(x, d)) for d, x in cases])


def check_recurrent_step(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """``fn(S, z, phi_q, phi_k, v) -> (S_new, z_new, o)``: one step of normalised linear attention.

    Shapes: S (B, H, D', D_v), z (B, H, D'), phi_q and phi_k (B, H, D'), v (B, H, D_v). Write
    first, then read: ``S_new = S + phi_k v^T``, ``z_new = z + phi_k``,
    ``o = phi_q^T S_new / (phi_q . z_new)``. Compared with the library's recurrent form run on one
    token from the state ``(S, z)``.
    """
    generator = torch.Generator().manual_seed(7)

    def case(B, H, D, D_v, history):
        q, k = (torch.randn(B, H, history + 1, D, generator=generator, dtype=torch.float64) for _ in range(2))
        v = torch.randn(B, H, history + 1, D_v, generator=generator, dtype=torch.float64)
        # The state after `history` earlier tokens (zeros when history == 0).
        S = torch.zeros(B, H, D, D_v, dtype=torch.float64)
        z = torch.zeros(B, H, D, dtype=torch.float64)
        if history:
            _, (S, z) = linear_attention(
                q[:, :, :history],
                k[:, :, :history],
                v[:, :, :history],
                form="recurrent",
                output_final_state=True,
            )
        expected_o, (expected_S, expected_z) = linear_attention(
            q[:, :, history:],
            k[:, :, history:],
            v[:, :, history:],
            form="recurrent",
            initial_state=(S, z),
            output_final_state=True,
            eps=1e-12,
        )

        def check():
            phi_q, phi_k = elu_plus_one(q[:, :, history]), elu_plus_one(k[:, :, history])
            result = fn(S.clone(), z.clone(), phi_q, phi_k, v[:, :, history].clone())
            if not isinstance(result, tuple) or len(result) != 3:
                raise ExerciseFailed(f"expected a tuple (S_new, z_new, o), got {type(result).__name__}")
            S_new, z_new, o = result
            label = f"B={B}, H={H}, D'={D}, D_v={D_v}, after {history} tokens"
            compare(S_new, expected_S, f"S_new ({label})")
            compare(z_new, expected_z, f"z_new ({label})")
            compare(o, expected_o[:, :, 0], f"o ({label}) — write the token into the state before reading")

        return check

    shapes = [(1, 1, 4, 4, 0), (2, 3, 4, 5, 6), (1, 2, 3, 2, 1)]
    run_cases("check_recurrent_step", [(f"shape {s}", case(*s)) for s in shapes])


def check_chunk_update(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``fn(S, phi_q, phi_k, v) -> (o, S_new)``: one chunk of causal, unnormalised linear attention.

    Shapes: S (B, H, D', D_v), phi_q and phi_k (B, H, C, D'), v (B, H, C, D_v). Query i of the
    chunk reads the state from before the chunk plus the chunk's keys j <= i:
    ``o = phi_q S + tril(phi_q phi_k^T) v`` and ``S_new = S + phi_k^T v``. Compared with the
    library (identity features, scale 1, the state passed in as ``initial_state``).
    """
    generator = torch.Generator().manual_seed(8)

    def case(B, H, C, D, D_v):
        S = torch.randn(B, H, D, D_v, generator=generator, dtype=torch.float64)
        phi_q, phi_k = (torch.rand(B, H, C, D, generator=generator, dtype=torch.float64) for _ in range(2))
        v = torch.randn(B, H, C, D_v, generator=generator, dtype=torch.float64)
        expected_o, expected_S = linear_attention(
            phi_q,
            phi_k,
            v,
            feature_map=identity_map,
            normalize=False,
            scale=1.0,
            form="recurrent",
            initial_state=S,
            output_final_state=True,
        )

        def check():
            result = fn(S.clone(), phi_q.clone(), phi_k.clone(), v.clone())
            if not isinstance(result, tuple) or len(result) != 2:
                raise ExerciseFailed(f"expected a tuple (o, S_new), got {type(result).__name__}")
            o, S_new = result
            label = f"B={B}, H={H}, C={C}, D'={D}, D_v={D_v}"
            compare(o, expected_o, f"o ({label}) — inside the chunk, query i sees keys j <= i")
            compare(S_new, expected_S, f"S_new ({label})")

        return check

    shapes = [(1, 1, 4, 3, 3), (2, 2, 5, 4, 6), (1, 3, 1, 2, 2), (1, 1, 8, 5, 3)]
    run_cases("check_chunk_update", [(f"shape {s}", case(*s)) for s in shapes])
