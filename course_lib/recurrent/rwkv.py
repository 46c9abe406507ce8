"""RWKV-6 ("Finch"): per-dimension data-dependent decay, read before the write, plus a bonus.

With receptance r_t (the query), log decays w_t <= 0 per key dimension and a per-head bonus u,

    o_t = S_{t-1}^T (scale * r_t) + scale * (r_t * u) . k_t  v_t,
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T.

Unlike the other methods the token reads the state *before* its own write, and sees its own
key-value pair only through the bonus u. Apart from that it is GLA: the read of S_{t-1} is GLA's
read at step t-1, so the chunk form runs GLA on the sequence shifted by one step. (Eagle and Finch:
RWKV with Matrix-Valued States and Dynamic Recurrence, Peng et al., 2024. RWKV itself uses no
scale: pass ``scale=1.0``; in RWKV-6, w = -exp(raw decay).)
"""

from __future__ import annotations

import torch

from ..checks import check_shape, check_tensor
from ._common import check_log_gate, check_recurrent_inputs, chunk_gated_scan, run_form, zero_state
from .runner import read_state, run_recurrence

__all__ = ["rwkv6"]


def _rwkv6_recurrent(r, k, v, w, u, scale, state):
    """Naive reference: read S_{t-1} and the bonus first, then decay and write."""

    def key_value(t):
        return k[:, :, t, :, None] * v[:, :, t, None, :]

    return run_recurrence(
        r.shape[2],
        state,
        read_first=True,
        read=lambda t, S: read_state(r[:, :, t] * scale, S + u[None, :, :, None] * key_value(t)),
        decay=lambda t, S: w[:, :, t, :, None].exp() * S,
        write=lambda t, S: key_value(t),
    )


def _rwkv6_chunk(r, k, v, w, u, scale, chunk_size, state):
    """GLA on a sequence with one empty step in front: step j reads S_{j-1} with query r_j."""
    B, H, T, D_k = r.shape
    shift = (0, 0, 1, 0)  # one step of zeros in front of keys, values and log decays
    queries = torch.nn.functional.pad(r * scale, (0, 0, 0, 1))  # r_j at step j, nothing at step T
    keys, values, gates = (torch.nn.functional.pad(x, shift) for x in (k, v, w))
    o, state = chunk_gated_scan(queries, keys, values, gates, chunk_size, state)
    bonus = (r * scale * u[None, :, None, :] * k).sum(-1, keepdim=True) * v
    return o[:, :, :T] + bonus, state


def rwkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RWKV-6 time mixing core.

    r, k: (B, H, T, D_k); v: (B, H, T, D_v); w: (B, H, T, D_k) log decays <= 0; u: (H, D_k) bonus.
    form "recurrent" or "chunk"; initial_state (B, H, D_k, D_v) or None. Returns o (B, H, T, D_v)
    in r's dtype, plus the final state when ``output_final_state``.
    """
    B, H, T, D_k, D_v, scale = check_recurrent_inputs(
        r,
        k,
        v,
        form=form,
        forms=("recurrent", "chunk"),
        chunk_size=chunk_size,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        query_name="r",
    )
    check_tensor(w, "w", ndim=4, floating=True)
    check_shape(w, "w", (B, H, T, D_k), names="B, H, T, D_k")
    check_log_gate(w, "w")
    check_tensor(u, "u", ndim=2, floating=True)
    check_shape(u, "u", (H, D_k), names="H, D_k")
    forms = {
        "recurrent": lambda r, k, v, w, u, S: _rwkv6_recurrent(r, k, v, w, u, scale, S),
        "chunk": lambda r, k, v, w, u, S: _rwkv6_chunk(r, k, v, w, u, scale, chunk_size, S),
    }
    state = zero_state(r, D_k, D_v, initial_state)
    return run_form(forms, form, (r, k, v, w, u), state, value_dim=D_v, output_final_state=output_final_state)
