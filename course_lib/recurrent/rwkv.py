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

from ..checks import check_attention_inputs, check_shape, check_tensor
from ._common import check_log_gate, check_options, check_scale, check_state, chunk_gated_scan, compute_dtype

__all__ = ["rwkv6"]


def _rwkv6_recurrent(r, k, v, w, u, scale, state):
    """Naive reference: read S_{t-1} and the bonus, then decay and write."""
    outputs = []
    for t in range(r.shape[2]):
        key_value = k[:, :, t, :, None] * v[:, :, t, None, :]
        read = state + u[None, :, :, None] * key_value
        outputs.append(torch.einsum("bhk,bhkv->bhv", r[:, :, t] * scale, read))
        state = w[:, :, t, :, None].exp() * state + key_value
    return torch.stack(outputs, dim=2), state


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
    B, H, T, S, D_k, D_v = check_attention_inputs(r, k, v)
    if S != T:
        raise ValueError(f"k must have the same length T={T} as r, got k {tuple(k.shape)}")
    check_options(form, chunk_size, output_final_state, ("recurrent", "chunk"))
    check_tensor(w, "w", ndim=4, floating=True)
    check_shape(w, "w", (B, H, T, D_k), names="B, H, T, D_k")
    check_log_gate(w, "w")
    check_tensor(u, "u", ndim=2, floating=True)
    check_shape(u, "u", (H, D_k), names="H, D_k")
    scale = check_scale(scale, D_k)
    check_state(initial_state, (B, H, D_k, D_v), r.device)

    input_dtype, dtype = r.dtype, compute_dtype(r)
    r, k, v, w, u = (x.to(dtype) for x in (r, k, v, w, u))
    state = r.new_zeros(B, H, D_k, D_v) if initial_state is None else initial_state.to(dtype)
    if form == "recurrent":
        o, state = _rwkv6_recurrent(r, k, v, w, u, scale, state)
    else:
        o, state = _rwkv6_chunk(r, k, v, w, u, scale, chunk_size, state)
    o = o.to(input_dtype)
    return (o, state) if output_final_state else o
