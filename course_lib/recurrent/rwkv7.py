"""RWKV-7 ("Goose"): the generalised delta rule, with a vector decay and an in-context learning rate.

RWKV-7 keeps, per head, a state ``wkv`` of shape (D_v, D_k) and multiplies it on the right by a
diagonal-plus-rank-one transition before writing:

    wkv_t = wkv_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,        o_t = wkv_t r_t,

with column vectors w_t, a_t, b_t, k_t, r_t (D_k,) and v_t (D_v,). RWKV-7 chooses ``a = -kappa``
and ``b = kappa * alpha``: kappa the L2-normalised "removal" key, alpha in (0, 1) per key dimension
the in-context learning rate; so ``diag(w) - kappa (kappa * alpha)^T`` decays every key dimension
by its own w and removes part of what is stored along kappa. (RWKV-7 "Goose" with Expressive
Dynamic State Evolution, Peng et al., 2025.)

In the course's layout the state is the transpose, S = wkv^T of shape (D_k, D_v). Transposing
both sides, ``(wkv M)^T = M^T wkv^T`` and ``(v k^T)^T = k v^T``, gives

    S_t = (diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * r_t):

decay first (a full D_k x D_k transition, not just a diagonal), then write, then read, like every
method of the chapter. The delta rule is the case ``w = 1, a = -k, b = beta k`` with the written key
``beta k``: ``(I - beta k k^T) S + beta k v^T``; Gated DeltaNet multiplies the transition by
exp(g); ``a = b = 0`` is GLA. :func:`rwkv7_delta_rule_inputs` builds those arguments.

The chunk form generalises the delta rule's WY representation. Within a chunk write
``c_t = w_1 + ... + w_t`` (log decays, per key dimension) and ``u_t = a_t^T S_{t-1}`` (what the
low-rank part reads, a D_v row). Unrolling the diagonal decay,

    S_t = exp(c_t) S_0 + sum_{s<=t} exp(c_t - c_s) (b_s u_s^T + k_s v_s^T),

so the u_t depend on each other through a unit lower-triangular system, solved once per chunk:

    (I - A_ab) U = A_ak V + (a * exp(c_{t-1})) S_0,
    A_xy[t, s] = sum_d x_td y_sd exp(c_{t-1,d} - c_{s,d})   for s < t.

Then the outputs and the next chunk's state are matrix products. Every exponent is a sum of log
decays over an interval, <= 0, so nothing overflows however strong the forgetting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int, check_shape, check_tensor
from ._common import check_log_gate, check_recurrent_inputs, run_form, zero_state
from .layers import HeadRMSNorm, _merge_heads, _Mixer, _split_heads
from .runner import read_state, run_recurrence

__all__ = ["rwkv7", "rwkv7_delta_rule_inputs", "RWKV7Mixer"]


def _rwkv7_recurrent(r, k, v, w, a, b, scale, state):
    """Naive reference: S <- diag(exp(w_t)) S + b_t (a_t^T S), then write k_t v_t^T, read S^T (scale r_t)."""
    return run_recurrence(
        r.shape[2],
        state,
        decay=lambda t, S: (
            w[:, :, t, :, None].exp() * S + b[:, :, t, :, None] * read_state(a[:, :, t], S)[:, :, None]
        ),
        write=lambda t, S: k[:, :, t, :, None] * v[:, :, t, None, :],
        read=lambda t, S: read_state(r[:, :, t] * scale, S),
    )


def _relative_decay(c_to: torch.Tensor, c_from: torch.Tensor, strict: bool) -> torch.Tensor:
    """``exp(c_to[t, d] - c_from[s, d])`` for s <= t (s < t when ``strict``), else 0: (..., C, C, D_k).

    The exponent is masked before the exponential, so the (positive) entries above the diagonal
    never overflow; the kept ones are sums of log decays over an interval, <= 0.
    """
    C = c_to.shape[-2]
    keep = torch.ones(C, C, dtype=torch.bool, device=c_to.device).tril(-1 if strict else 0)
    exponent = c_to[..., :, None, :] - c_from[..., None, :, :]
    return exponent.masked_fill(~keep[:, :, None], float("-inf")).exp()


def _decayed_products(x: torch.Tensor, y: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """``sum_d x_td y_sd decay[t, s, d]``: (..., C, D_k) twice and (..., C, C, D_k) -> (..., C, C)."""
    return torch.einsum("...td,...sd,...tsd->...ts", x, y, decay)


def _rwkv7_one_chunk(q, k, v, w, a, b, S):
    """One chunk of the WY form: q (already scaled), k, w, a, b (B, H, C, D_k); v (B, H, C, D_v)."""
    c = w.cumsum(dim=2)  # log decay from the chunk start to step t, inclusive
    c_before = F.pad(c, (0, 0, 1, 0))[:, :, :-1]  # ... to step t - 1: what S_{t-1} has seen
    read_before = _relative_decay(c_before, c, strict=True)  # how u_t = a_t^T S_{t-1} sees step s < t
    read_now = _relative_decay(c, c, strict=False)  # how o_t = S_t^T q_t sees step s <= t
    A_ab, A_ak = _decayed_products(a, b, read_before), _decayed_products(a, k, read_before)
    identity = torch.eye(q.shape[2], dtype=q.dtype, device=q.device)
    # U = (I - A_ab)^{-1} (A_ak V + (a * exp(c_before)) S_0): every u_t = a_t^T S_{t-1} at once.
    U = torch.linalg.solve_triangular(
        identity - A_ab, A_ak @ v + (a * c_before.exp()) @ S, upper=False, unitriangular=True
    )
    o = (q * c.exp()) @ S + _decayed_products(q, b, read_now) @ U + _decayed_products(q, k, read_now) @ v
    to_end = (c[:, :, -1:] - c).exp()  # decay from each step to the chunk's end
    S = (
        c[:, :, -1, :, None].exp() * S
        + (b * to_end).transpose(-1, -2) @ U
        + (k * to_end).transpose(-1, -2) @ v
    )
    return o, S


def _rwkv7_chunk(q, k, v, w, a, b, chunk_size, state):
    """Chunk by chunk, the state carried; the (C, C, D_k) temporaries of one chunk at a time."""
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        steps = slice(start, start + chunk_size)
        o, state = _rwkv7_one_chunk(*(x[:, :, steps] for x in (q, k, v, w, a, b)), state)
        outputs.append(o)
    return torch.cat(outputs, dim=2), state


def rwkv7(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The generalised delta rule: ``S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T``,
    ``o_t = S_t^T (scale r_t)``.

    r, k: (B, H, T, D_k); v: (B, H, T, D_v); w: (B, H, T, D_k) log decays <= 0; a, b: (B, H, T, D_k)
    the rank-one part of the transition (RWKV-7: a = -kappa, b = kappa * alpha). RWKV itself uses
    no scale: pass ``scale=1.0``. form "recurrent" or "chunk"; initial_state (B, H, D_k, D_v) or
    None. Returns o (B, H, T, D_v) in r's dtype, plus the final state when ``output_final_state``.
    """
    check_tensor(r, "r", ndim=4, floating=True)
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
    for name, x in (("w", w), ("a", a), ("b", b)):
        check_tensor(x, name, ndim=4, floating=True)
        check_shape(x, name, (B, H, T, D_k), names="B, H, T, D_k")
        if x.device != r.device:
            raise ValueError(f"{name} must be on {r.device} like r, got {x.device}")
    check_log_gate(w, "w")
    for name, x in (("a", a), ("b", b)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} must be finite")
    forms = {
        "recurrent": lambda r, k, v, w, a, b, S: _rwkv7_recurrent(r, k, v, w, a, b, scale, S),
        "chunk": lambda r, k, v, w, a, b, S: _rwkv7_chunk(r * scale, k, v, w, a, b, chunk_size, S),
    }
    state = zero_state(r, D_k, D_v, initial_state)
    return run_form(
        forms, form, (r, k, v, w, a, b), state, value_dim=D_v, output_final_state=output_final_state
    )


def rwkv7_delta_rule_inputs(
    k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The ``k, w, a, b`` for which :func:`rwkv7` is the delta rule (g None) or Gated DeltaNet.

    k: (B, H, T, D_k); beta: (B, H, T) write strengths; g: (B, H, T) log decays or None. Returns the
    written key ``beta k``, ``w = g`` on every key dimension (0 without g), ``a = -k`` and
    ``b = exp(g) beta k``, so that ``diag(exp(w)) + b a^T = exp(g) (I - beta k k^T)``.
    """
    check_tensor(k, "k", ndim=4, floating=True)
    check_tensor(beta, "beta", ndim=3, floating=True)
    check_shape(beta, "beta", k.shape[:3], names="B, H, T")
    g = torch.zeros_like(beta) if g is None else g
    check_tensor(g, "g", ndim=3, floating=True)
    check_shape(g, "g", k.shape[:3], names="B, H, T")
    written = beta[..., None] * k
    return {"k": written, "w": g[..., None].expand_as(k), "a": -k, "b": g.exp()[..., None] * written}


def _low_rank(d_in: int, rank: int, d_out: int) -> tuple[nn.Linear, nn.Linear]:
    """The two factors of a low-rank projection d_in -> rank -> d_out (RWKV's "LoRA" MLPs)."""
    return nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False)


class RWKV7Mixer(_Mixer):
    """RWKV-7 time mixing around :func:`rwkv7`.

    Each branch sees the token shift ``x + mu * (x_{t-1} - x_t)`` with its own learned ``mu``. Then
    r, k, v are projections; the log decay is ``w = -exp(-1/2) * sigmoid(w_0 + W_2 tanh(W_1 x))``, so
    each step keeps at least exp(-0.61) = 0.55 of the state; the in-context learning rate is
    ``alpha = sigmoid(a_0 + A_2 A_1 x)``; the removal key ``kappa`` is k scaled by a learned ``k_k``
    and L2-normalised per head; the written key is ``k * (1 + (alpha - 1) k_a)``. The core runs with
    a = -kappa, b = kappa * alpha and no scale; the output is the per-head RMSNorm plus the bonus
    ``((r * k * r_k) summed per head) v``, times a low-rank gate, through ``o_proj``. Left out:
    the value residual across layers (v mixed with the first layer's v) and the data-dependent
    token-shift mix; RWKV's GroupNorm is an RMSNorm here. Forms: "chunk" (default), "recurrent".
    """

    def __init__(self, d_model, num_heads, *, chunk_size=64, head_dim=None, low_rank=None, form="chunk"):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form)
        width = self.num_heads * self.head_dim
        self.low_rank = rank = (
            max(8, d_model // 8) if low_rank is None else check_int(low_rank, "low_rank", min=1)
        )
        self.shift_mix = nn.Parameter(torch.full((6, d_model), 0.5))  # r, w, k, v, a, g
        self.r_proj = nn.Linear(d_model, width, bias=False)
        self.k_proj = nn.Linear(d_model, width, bias=False)
        self.v_proj = nn.Linear(d_model, width, bias=False)
        self.o_proj = nn.Linear(width, d_model, bias=False)
        self.decay_down, self.decay_up = _low_rank(d_model, rank, width)
        self.alpha_down, self.alpha_up = _low_rank(d_model, rank, width)
        self.gate_down, self.gate_up = _low_rank(d_model, rank, width)
        with torch.no_grad():
            for up in (self.decay_up, self.alpha_up):
                up.weight.mul_(0.1)  # a small data-dependent part around the biases at the start
        # w_0 from -6.5 to -1.5: per-step decays from about 0.999 to 0.90 (RWKV-7's spread).
        self.decay_base = nn.Parameter(torch.linspace(-6.5, -1.5, width))
        self.alpha_base = nn.Parameter(torch.zeros(width))
        self.k_k = nn.Parameter(torch.full((width,), 0.85))
        self.k_a = nn.Parameter(torch.ones(width))
        self.r_k = nn.Parameter(torch.full((self.num_heads, self.head_dim), 0.1))
        self.norm = HeadRMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, *, form: str | None = None) -> torch.Tensor:
        form = self._check(x, form)
        H = self.num_heads
        previous = F.pad(x, (0, 0, 1, 0))[:, :-1]  # x_{t-1}, zeros before the first token
        xr, xw, xk, xv, xa, xg = (x + mu * (previous - x) for mu in self.shift_mix)
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        w = -math.exp(-0.5) * torch.sigmoid(self.decay_base + self.decay_up(torch.tanh(self.decay_down(xw))))
        alpha = torch.sigmoid(self.alpha_base + self.alpha_up(self.alpha_down(xa)))
        gate = self.gate_up(torch.sigmoid(self.gate_down(xg)))
        kappa = F.normalize(_split_heads(k * self.k_k, H), dim=-1)
        k = k * (1 + (alpha - 1) * self.k_a)
        r, k, v, w, alpha = (_split_heads(t, H) for t in (r, k, v, w, alpha))
        o = rwkv7(r, k, v, w, -kappa, kappa * alpha, scale=1.0, form=form, chunk_size=self.chunk_size)
        bonus = (r * k * self.r_k[:, None, :]).sum(-1, keepdim=True) * v
        return self.o_proj(_merge_heads(self.norm(o) + bonus) * gate)
