"""Mamba-1's selective scan (S6): a diagonal state space model whose parameters depend on the input.

Every channel d of the input u (there are D of them) runs its own SSM with a state h of N numbers,
a diagonal A_d (N,) < 0 and, per token, a step size delta_t > 0 and vectors B_t, C_t (N,) computed
from the input (the *selection*). Zero-order hold discretises A, Euler discretises B:

    h_t = exp(delta_t A_d) * h_{t-1} + delta_t u_t B_t        (element-wise over the N entries)
    y_t = C_t . h_t + D_d u_t,    then    y_t * silu(z_t).

In the course's (D_k, D_v) layout each channel is a head with N keys and one value: q = C,
k = B, v = delta u, and a log decay delta A per key dimension. So S6 is gated linear attention
(:func:`~course_lib.recurrent.gla`) with D_v = 1, one head per channel, and no scale.
(Mamba: Linear-Time Sequence Modeling with Selective State Spaces, Gu and Dao, 2023.)

Why the hardware-aware kernel never writes the state to HBM. A scan through HBM writes the
expanded state h of every step, B L D N numbers, and reads it back to contract it with C; u,
delta, z and y are B L D numbers each, B and C are B L N. So the states are N times (N = 16:
sixteen times) any input or output of the layer, and each is touched for a handful of flops: such
a scan is bound by memory traffic. Mamba's fused kernel loads u, delta, B, C into SRAM, discretises
there (exp(delta A), delta u B), scans chunk by chunk with the (D, N) state held on chip, contracts
it with C and writes only y: IO O(B L (D + N)) instead of O(B L D N). The backward recomputes the
states instead of storing them, as FlashAttention recomputes the attention matrix. Below, the
``"scan"`` form materialises every state (what the kernel avoids), the ``"chunk"`` form one
chunk's at a time.

Why Mamba-2 restricts A to a scalar per head. Here the decay exp(delta_t A_d) differs for every
(channel, state) pair, so the recurrence is element-wise: it can only be scanned, with
multiply-adds that leave tensor cores idle (a decay matrix from step s to step t would be a
(T, T, N) tensor per channel). With one scalar a per head (and one delta per head), the decay is
one number for the whole N x P state of a head, L[t, s] = exp(a (delta_{s+1} + ... + delta_t)),
and y = (L * C B^T)(delta x): a masked matrix product, computable chunk by chunk with matrix
multiplications on tensor cores (state space duality, :func:`~course_lib.recurrent.ssd`).

Three forms give the same numbers: ``"recurrent"`` (one step per token), ``"scan"`` (the parallel
associative scan of :mod:`.scan`, log depth, all states materialised) and ``"chunk"`` (the
kernel's loop: a parallel scan inside each chunk, the state carried from chunk to chunk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_shape,
    check_tensor,
    compute_dtype,
)
from ._common import run_form
from .layers import ShortConvolution, _inverse_softplus, _Mixer
from .runner import run_recurrence
from .scan import associative_scan

__all__ = ["selective_scan", "Mamba1Mixer"]

FORMS = ("recurrent", "scan", "chunk")


def _grouped(x: torch.Tensor, G: int) -> torch.Tensor:
    """(batch, D, ...) -> (batch, G, D / G, ...): the channels that share one B and C side by side."""
    return x.view(x.shape[0], G, x.shape[1] // G, *x.shape[2:])


def _s6_recurrent(du, delta, B, C, A, state):
    """Naive reference: h (batch, D, N) decayed by exp(delta_t A), written delta_t u_t B_t, read by C_t.

    B and C are (batch, G, N, L); ``B[:, :, None, :, t]`` is B_t for every channel of a group.
    """
    G = B.shape[1]
    return run_recurrence(
        du.shape[2],
        state,
        decay=lambda t, h: torch.exp(delta[:, :, t, None] * A) * h,
        write=lambda t, h: (_grouped(du[:, :, t], G) * B[:, :, None, :, t]).flatten(1, 2),
        read=lambda t, h: (_grouped(h, G) * C[:, :, None, :, t]).sum(-1, keepdim=True).flatten(1, 2),
    )


def _discretise(du, delta, B, A, steps):
    """Log decays delta A and inputs delta u B for the steps ``steps``: (batch, D, len, N) each."""
    log_decay = delta[:, :, steps, None] * A[:, None, :]
    B_steps = B[..., steps].transpose(-1, -2)[:, :, None]  # (batch, G, 1, len, N)
    write = _grouped(du[:, :, steps], B.shape[1]) * B_steps
    return log_decay, write.flatten(1, 2)


def _read(h, C, steps):
    """y_t = C_t . h_t for the steps ``steps``: h (batch, D, len, N) -> (batch, D, len, 1)."""
    C_steps = C[..., steps].transpose(-1, -2)[:, :, None]  # (batch, G, 1, len, N)
    return (_grouped(h, C.shape[1]) * C_steps).sum(-1, keepdim=True).flatten(1, 2)


def _s6_scan(du, delta, B, C, A, state):
    """Every state at once with the log-depth associative scan: memory B L D N."""
    steps = slice(None)
    log_decay, write = _discretise(du, delta, B, A, steps)
    _, h = associative_scan(log_decay, write, state)
    return _read(h, C, steps), h[:, :, -1]


def _s6_chunk(du, delta, B, C, A, state, chunk_size):
    """The fused kernel's loop: discretise one chunk, scan it from the carried state, read, move on.

    Only one chunk's expanded states (batch, D, chunk, N) exist at a time.
    """
    outputs = []
    for start in range(0, du.shape[2], chunk_size):
        steps = slice(start, start + chunk_size)
        log_decay, write = _discretise(du, delta, B, A, steps)
        _, h = associative_scan(log_decay, write, state)
        outputs.append(_read(h, C, steps))
        state = h[:, :, -1]
    return torch.cat(outputs, dim=2), state


def _check_projection(M: object, name: str, batch: int, D: int, L: int) -> torch.Tensor:
    """B or C: (batch, N, L), or grouped (batch, G, N, L) with G dividing D."""
    check_tensor(M, name, ndim=(3, 4), floating=True)
    assert isinstance(M, torch.Tensor)
    if M.dim() == 3:
        check_shape(M, name, (batch, None, L), names="batch, N, L")
        return M[:, None]
    check_shape(M, name, (batch, None, None, L), names="batch, G, N, L")
    if D % M.shape[1]:
        raise ValueError(f"{name} has G={M.shape[1]} groups, which must divide D={D}")
    return M


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    form: str = "chunk",
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's selective scan in the layout of mamba_ssm's ``selective_scan_fn``.

    u, delta: (batch, D, L); A: (D, N), entries < 0; B, C: (batch, N, L), or (batch, G, N, L)
    with G groups of D / G channels sharing them; D: (D,) skip weights or None; z: (batch, D, L)
    gate or None; delta_bias: (D,) added to delta before the optional softplus; delta must be
    >= 0 once prepared. form: "recurrent", "scan" or "chunk". initial_state: (batch, D, N) or None.
    Returns ``out`` (batch, D, L) in u's dtype, plus the last state (batch, D, N) in the compute
    dtype when ``output_final_state``.
    """
    check_tensor(u, "u", ndim=3, floating=True)
    batch, channels, L = u.shape
    check_tensor(delta, "delta", ndim=3, floating=True)
    check_shape(delta, "delta", u.shape, names="batch, D, L")
    check_tensor(A, "A", ndim=2, floating=True)
    check_shape(A, "A", (channels, None), names="D, N")
    N = A.shape[1]
    if not bool(torch.isfinite(A).all()) or bool((A >= 0).any()):
        raise ValueError("A must be finite and < 0 (a decay exp(delta A) < 1)")
    B = _check_projection(B, "B", batch, channels, L)
    C = _check_projection(C, "C", batch, channels, L)
    for name, M in (("B", B), ("C", C)):
        if M.shape[2] != N:
            raise ValueError(f"{name} must have N={N} state dims like A, got {tuple(M.shape)}")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None:
            check_tensor(vector, name, ndim=1, floating=True)
            check_shape(vector, name, (channels,), names="D")
    if z is not None:
        check_tensor(z, "z", ndim=3, floating=True)
        check_shape(z, "z", u.shape, names="batch, D, L")
    check_bool(delta_softplus, "delta_softplus")
    check_choice(form, "form", FORMS)
    chunk_size = check_int(chunk_size, "chunk_size", min=1)
    check_bool(output_final_state, "output_final_state")
    if initial_state is not None:
        check_tensor(initial_state, "initial_state", ndim=3, floating=True)
        check_shape(initial_state, "initial_state", (batch, channels, N), names="batch, D, N")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("initial_state", initial_state)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} must be on {u.device} like u, got {t.device}")

    # Prepare delta in the compute dtype (mamba_ssm does the same in float32).
    dtype = compute_dtype(u)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if not bool(torch.isfinite(delta).all()) or bool((delta < 0).any()):
        raise ValueError("delta must be finite and >= 0 (after delta_bias and softplus)")
    u_c, A, B, C = (t.to(dtype) for t in (u, A, B, C))
    du = (delta * u_c)[..., None]  # (batch, D, L, 1): the value each channel writes
    state = torch.zeros(batch, channels, N, dtype=dtype, device=u.device)
    if initial_state is not None:
        state = initial_state.to(dtype)
    forms = {
        "recurrent": lambda du, delta, B, C, h: _s6_recurrent(du, delta, B, C, A, h),
        "scan": lambda du, delta, B, C, h: _s6_scan(du, delta, B, C, A, h),
        "chunk": lambda du, delta, B, C, h: _s6_chunk(du, delta, B, C, A, h, chunk_size),
    }
    y, state = run_form(forms, form, (du, delta, B, C), state, value_dim=1, output_final_state=True)
    out = y[..., 0]
    if D is not None:
        out = out + D.to(dtype)[:, None] * u_c
    if z is not None:
        out = out * F.silu(z.to(dtype))
    out = out.to(u.dtype)
    return (out, state) if output_final_state else out


class Mamba1Mixer(_Mixer):
    """The Mamba block's mixer, as the paper builds it around the selective scan.

    ``in_proj`` makes x and z (``d_inner = expand * d_model`` channels each); x passes through a
    short causal depthwise convolution (kernel ``conv_size``) and SiLU; ``x_proj`` makes, per token,
    a low-rank step (rank ``dt_rank``, default ceil(d_model / 16)), B and C (``state_size`` N each,
    shared by all channels); ``dt_proj`` lifts the step to every channel, and softplus of it plus
    ``dt_proj.bias`` is delta. Then the selective scan with A = -exp(A_log) and the D skip, the gate
    silu(z), and ``out_proj``. Initialisation as in Mamba: A = -(1, 2, ..., N) for every channel,
    and a bias that makes delta start log-uniform in [dt_min, dt_max] = [1e-3, 0.1] (here on a
    deterministic log-spaced grid over the channels).

    Mamba-1 has no heads: every channel is its own SSM. ``num_heads`` is accepted for the common
    mixer interface and not used. Forms: "chunk" (default) or "recurrent".
    """

    def __init__(
        self,
        d_model,
        num_heads,
        *,
        chunk_size=64,
        state_size=16,
        expand=2,
        conv_size=4,
        dt_rank=None,
        dt_min=1e-3,
        dt_max=0.1,
        form="chunk",
    ):
        expand = check_int(expand, "expand", min=1)
        d_model = check_int(d_model, "d_model", min=1)
        super().__init__(d_model, num_heads, chunk_size, expand * d_model, form)
        self.d_inner = expand * d_model
        self.state_size = N = check_int(state_size, "state_size", min=1)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else check_int(dt_rank, "dt_rank", min=1)
        self.conv_size = check_int(conv_size, "conv_size", min=0)
        dt_min = check_float(dt_min, "dt_min", min=0.0, min_open=True)
        dt_max = check_float(dt_max, "dt_max", min=dt_min)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv = ShortConvolution(self.d_inner, conv_size) if conv_size > 0 else None
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        with torch.no_grad():
            bound = self.dt_rank**-0.5  # Mamba's "random" dt_proj init keeps the variance of delta
            self.dt_proj.weight.uniform_(-bound, bound)
            dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), self.d_inner))
            self.dt_proj.bias.copy_(_inverse_softplus(dt))
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
        )
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, *, form: str | None = None) -> torch.Tensor:
        form = self._check(x, form)
        inner, z = self.in_proj(x).chunk(2, dim=-1)  # (batch, T, d_inner) each
        inner = self.conv(inner) if self.conv is not None else F.silu(inner)
        dt, B, C = self.x_proj(inner).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # the bias is added inside the scan, before softplus
        y = selective_scan(
            inner.transpose(1, 2),
            delta.transpose(1, 2),
            -self.A_log.exp(),
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D,
            z.transpose(1, 2),
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            form=form,
            chunk_size=self.chunk_size,
        )
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, state_size={self.state_size}, "
            f"dt_rank={self.dt_rank}, form={self.form!r}"
        )
