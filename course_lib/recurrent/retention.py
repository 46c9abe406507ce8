"""RetNet's retention: linear attention with one fixed decay per head.

    S_t = gamma * S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t),   gamma = exp(g_h).

Three forms give the same numbers: the recurrent loop, the parallel form with the decay matrix
``D[t, s] = gamma^(t - s)`` (s <= t, else 0), and the chunkwise form. (RetNet, Sun et al., 2023.
The paper's layer adds xPos rotations, GroupNorm and a swish gate around this core.)
"""

from __future__ import annotations

import torch

from ..checks import check_int, check_shape, check_tensor
from ._common import (
    causal_log_decay,
    check_log_gate,
    check_recurrent_inputs,
    chunk_gated_scan,
    run_form,
    zero_state,
)
from .runner import read_state, run_recurrence

__all__ = ["retnet_gammas", "retention_decay_matrix", "retention"]


def retnet_gammas(num_heads: int) -> torch.Tensor:
    """The multi-scale decays of RetNet, ``gamma_h = 1 - 2^(-5 - h)`` for h = 0 .. H-1 (float64).

    Head 0 forgets fastest (gamma = 1 - 1/32, memory of about 32 tokens); each next head halves the
    forgetting rate. Pass ``torch.log(retnet_gammas(H))`` as the log decay ``g`` of :func:`retention`.
    """
    num_heads = check_int(num_heads, "num_heads", min=1)
    return 1.0 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))


def retention_decay_matrix(g: torch.Tensor, T: int) -> torch.Tensor:
    """The decay matrix ``D`` of shape (H, T, T): ``D[h, t, s] = exp(g_h (t - s))`` for s <= t, else 0."""
    check_tensor(g, "g", ndim=1, floating=True)
    T = check_int(T, "T", min=1)
    check_log_gate(g, "g")
    steps = torch.arange(T, device=g.device, dtype=g.dtype)
    return causal_log_decay(g[:, None] * steps).exp()


def _retention_recurrent(q, k, v, g, scale, state):
    """Naive reference: decay S by gamma_h, write k v^T, read S^T (scale q). g (H,)."""
    gamma = g.exp()[None, :, None, None]
    return run_recurrence(
        q.shape[2],
        state,
        decay=lambda t, S: gamma * S,
        write=lambda t, S: k[:, :, t, :, None] * v[:, :, t, None, :],
        read=lambda t, S: read_state(q[:, :, t] * scale, S),
    )


def _retention_parallel(q, k, v, g, scale, initial_state):
    """Parallel form: ``O = (scale * Q K^T * D) V`` plus the decayed read of the initial state."""
    T = q.shape[2]
    decay_matrix = retention_decay_matrix(g, T)  # (H, T, T)
    o = (scale * q @ k.transpose(-1, -2) * decay_matrix) @ v
    # The state after T steps sums every key with its decay to the end: row T-1 of D.
    state = torch.einsum("hs,bhsk,bhsv->bhkv", decay_matrix[:, -1], k, v)
    steps = torch.arange(1, T + 1, device=q.device, dtype=q.dtype)
    start_decay = (g[:, None] * steps).exp()  # (H, T): gamma^(t + 1)
    o = o + (scale * q * start_decay[None, :, :, None]) @ initial_state
    state = state + start_decay[None, :, -1, None, None] * initial_state
    return o, state


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Retention with a fixed per-head decay ``exp(g)``.

    q, k: (B, H, T, D_k); v: (B, H, T, D_v); g: (H,) log decays, <= 0 (see :func:`retnet_gammas`).
    form: "recurrent" (token loop), "parallel" (decay matrix, O(T^2)) or "chunk".
    initial_state: (B, H, D_k, D_v) or None. Returns o (B, H, T, D_v) in q's dtype, and the final
    state (float32, or float64 for float64 inputs) when ``output_final_state``.
    """
    B, H, T, D_k, D_v, scale = check_recurrent_inputs(
        q,
        k,
        v,
        form=form,
        forms=("recurrent", "parallel", "chunk"),
        chunk_size=chunk_size,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    check_tensor(g, "g", ndim=1, floating=True)
    check_shape(g, "g", (H,), names="H")
    check_log_gate(g, "g")
    forms = {
        "recurrent": lambda q, k, v, g, S: _retention_recurrent(q, k, v, g, scale, S),
        "parallel": lambda q, k, v, g, S: _retention_parallel(q, k, v, g, scale, S),
        "chunk": lambda q, k, v, g, S: chunk_gated_scan(
            q * scale, k, v, g[None, :, None, None].expand(B, H, T, 1), chunk_size, S
        ),
    }
    state = zero_state(q, D_k, D_v, initial_state)
    return run_form(forms, form, (q, k, v, g), state, value_dim=D_v, output_final_state=output_final_state)
