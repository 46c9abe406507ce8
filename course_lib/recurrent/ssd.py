"""Mamba-2's state-space duality (SSD): a selective SSM that is also masked attention.

For one head with input x_t (P,), step dt_t > 0 (after softplus), scalar A < 0 and input-dependent
B_t, C_t (N,), the state h_t (N, P) follows

    h_t = exp(A dt_t) h_{t-1} + B_t (dt_t x_t)^T,        y_t = h_t^T C_t.

Unrolled, ``y = (L * C B^T) (dt x)`` with ``L[t, s] = exp(A (dt_{s+1} + ... + dt_t))``: the
quadratic, attention-like form. It is scalar-gated linear attention under the mapping

    q = C,  k = B,  v = dt * x,  g = A * dt,  scale = 1.

The chunked SSD algorithm mixes both: quadratic inside chunks, the recurrence between them.
(Transformers are SSMs, Dao and Gu, 2024. The full layer, :class:`~course_lib.recurrent.Mamba2Mixer`,
adds the skip ``D * x``, the gate ``silu(z)`` and a norm around this core.)
"""

from __future__ import annotations

import torch

from ..checks import check_shape, check_tensor
from ._common import check_form_options, check_per_step, check_state, pad_time, run_form, zero_state
from .runner import run_recurrence

__all__ = ["segsum", "ssd"]


def segsum(x: torch.Tensor) -> torch.Tensor:
    """``(..., T)`` -> ``(..., T, T)`` with ``out[t, s] = x_{s+1} + ... + x_t`` for s <= t, -inf above.

    Summing the entries themselves (not subtracting two cumulative sums) keeps small segments exact
    even when the total is huge, so ``exp(segsum(A * dt))`` is the decay matrix L.
    """
    T = x.shape[-1]
    strictly_below = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    rows = x[..., :, None].expand(*x.shape, T).masked_fill(~strictly_below, 0.0)
    out = rows.cumsum(dim=-2)  # out[t, s] = sum over r in (s, t] of x_r
    below = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~below, float("-inf"))


def _ssd_recurrent(x, dt, A, B, C, state):
    """Naive reference: the selective SSM one step at a time, through the runner of chapter 07."""
    return run_recurrence(
        x.shape[2],
        state,
        decay=lambda t, h: (A[None, :] * dt[:, :, t]).exp()[..., None, None] * h,
        write=lambda t, h: B[:, :, t, :, None] * (dt[:, :, t, None, None] * x[:, :, t, None, :]),
        read=lambda t, h: torch.einsum("bhn,bhnp->bhp", C[:, :, t], h),
    )


def _ssd_quadratic(x, dt, A, B, C, initial_state):
    """The attention-like form ``y = (L * C B^T) (dt x)``, O(T^2)."""
    log_decay = A[None, :, None] * dt  # (batch, H, T)
    L = segsum(log_decay).exp()
    y = (L * (C @ B.transpose(-1, -2))) @ (dt[..., None] * x)
    to_end = L[..., -1, :]  # decay from each step to the last one
    state = torch.einsum("bhs,bhsn,bhsp->bhnp", to_end, B, dt[..., None] * x)
    from_start = log_decay.cumsum(dim=-1).exp()  # (batch, H, T)
    y = y + (C * from_start[..., None]) @ initial_state
    state = state + from_start[..., -1, None, None] * initial_state
    return y, state


def _ssd_chunked(x, dt, A, B, C, chunk_size, initial_state):
    """The chunked SSD algorithm in four steps (all chunks at once, then a scan over chunk states)."""
    batch, H, T, P = x.shape
    size = min(chunk_size, T)
    x, B, C = (pad_time(t, size) for t in (x, B, C))
    dt = pad_time(dt[..., None], size)[..., 0]
    chunks = x.shape[2] // size
    x, B, C = (t.reshape(batch, H, chunks, size, t.shape[-1]) for t in (x, B, C))
    log_decay = (A[None, :, None] * dt).reshape(batch, H, chunks, size)
    xdt = x * dt.reshape(batch, H, chunks, size, 1)
    cumulative = log_decay.cumsum(dim=-1)

    # 1. inside each chunk: the quadratic form
    y_diagonal = (segsum(log_decay).exp() * (C @ B.transpose(-1, -2))) @ xdt
    # 2. each chunk's contribution to the state at its end
    to_end = (cumulative[..., -1:] - cumulative).exp()
    chunk_states = torch.einsum("bhcs,bhcsn,bhcsp->bhcnp", to_end, B, xdt)
    # 3. states between chunks: a scalar-decay recurrence over chunks, itself a segsum over chunk totals
    chunk_states = torch.cat([initial_state[:, :, None], chunk_states], dim=2)  # (batch, H, chunks + 1, N, P)
    totals = torch.nn.functional.pad(cumulative[..., -1], (1, 0))  # (batch, H, chunks + 1)
    states = torch.einsum("bhij,bhjnp->bhinp", segsum(totals).exp(), chunk_states)
    incoming, final_state = states[:, :, :-1], states[:, :, -1]
    # 4. read the incoming state of each chunk, decayed to every position in it
    y_off = torch.einsum("bhcsn,bhcnp,bhcs->bhcsp", C, incoming, cumulative.exp())
    y = (y_diagonal + y_off).reshape(batch, H, chunks * size, P)[:, :, :T]
    return y, final_state


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's SSD layer core.

    x: (B, H, T, P); dt: (B, H, T), >= 0 (already through softplus); A: (H,), < 0;
    B, C: (B, H, T, N). form: "recurrent", "parallel" (the quadratic attention-like O(T^2) form) or "chunk".
    No extra scale. initial_state (B, H, N, P) or None. Returns y (B, H, T, P) in x's dtype, plus
    the final state when ``output_final_state``.
    """
    check_tensor(x, "x", ndim=4, floating=True)
    batch, H, T, P = x.shape
    check_form_options(form, ("recurrent", "parallel", "chunk"), chunk_size, output_final_state)
    check_per_step(dt, "dt", x)
    check_tensor(A, "A", ndim=1, floating=True)
    check_shape(A, "A", (H,), names="H")
    check_tensor(B, "B", ndim=4, floating=True)
    check_shape(B, "B", (batch, H, T, None), names="B, H, T, N")
    check_tensor(C, "C", ndim=4, floating=True)
    check_shape(C, "C", B.shape, names="B, H, T, N")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
    if not bool(torch.isfinite(A).all()) or bool((A >= 0).any()):
        raise ValueError(f"A must be finite and < 0 (a decay exp(A dt) < 1), got {A.tolist()}")
    if not bool(torch.isfinite(dt).all()) or bool((dt < 0).any()):
        raise ValueError("dt must be finite and >= 0 (a step size after softplus)")
    N = B.shape[-1]
    check_state(initial_state, (batch, H, N, P), x.device)
    forms = {
        "recurrent": _ssd_recurrent,
        "parallel": _ssd_quadratic,
        "chunk": lambda x, dt, A, B, C, h: _ssd_chunked(x, dt, A, B, C, chunk_size, h),
    }
    state = zero_state(x, N, P, initial_state)
    return run_form(forms, form, (x, dt, A, B, C), state, value_dim=P, output_final_state=output_final_state)
