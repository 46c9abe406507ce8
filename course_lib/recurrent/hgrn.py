"""HGRN and HGRN-2: gated linear RNNs whose forget gates have a lower bound that grows with depth.

HGRN is an element-wise recurrence whose input gate is tied to its forget gate (a leaky average):

    h_t = f_t * h_{t-1} + (1 - f_t) * c_t,        o_t = h_t,

with f_t in (0, 1) computed from the input. Its one extra idea is a *lower bound* on f in every
layer: ``f = gamma_l + (1 - gamma_l) * sigmoid(.)``, with gamma_l growing with the depth l, so
lower layers may forget quickly (local patterns) while upper layers are forced to remember (long
range). The bounds are one cumulative softmax over the layers, first layer 0
(:func:`hgrn_lower_bounds`). (Hierarchically Gated Recurrent Neural Network for Sequence
Modeling, Qin, Yang and Zhong, 2023. The paper's recurrence is complex-valued; as in
flash-linear-attention, this one is real.) In the gate taxonomy HGRN is *forget only*: its write
strength 1 - f_t is not a separate gate.

HGRN's state is a vector, D numbers per head, which limits what it can recall. HGRN-2 expands it
into a D_k x D_v matrix without new parameters by using 1 - f_t as the key:

    S_t = diag(f_t) S_{t-1} + (1 - f_t) v_t^T,     o_t = S_t^T (scale * q_t),

which is gated linear attention with k = 1 - f, so its chunk form is GLA's
(:func:`~course_lib.recurrent._common.chunk_gated_scan`). (HGRN2: Gated Linear RNNs with State
Expansion, Qin, Yang, Sun, Shen, Li, Sun and Zhong, 2024.) Both take the forget gate in log space,
``g = log f <= 0``, like every recurrence of the course.
"""

from __future__ import annotations

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
    resolve_scale,
)
from ._common import check_log_gate, check_state, chunk_gated_scan, run_form
from .layers import HeadRMSNorm, ShortConvolution, _merge_heads, _Mixer, _split_heads
from .runner import read_state, run_recurrence
from .scan import associative_scan, chunked_scan

__all__ = ["hgrn", "hgrn2", "hgrn_forget_gate", "hgrn_lower_bounds", "HGRNMixer", "HGRN2Mixer"]


# --- the lower bounds -----------------------------------------------------------------------------


def hgrn_lower_bounds(logits: torch.Tensor) -> torch.Tensor:
    """Forget-gate lower bounds for every layer from learnable ``logits`` (num_layers, ...).

    ``p = softmax(logits)`` over the layers and the bound of layer l is ``p_1 + ... + p_l``: 0 for
    the first layer, increasing with depth, below 1 for the last. Zero logits give ``l / num_layers``.
    """
    check_tensor(logits, "logits", floating=True)
    if logits.dim() == 0 or logits.shape[0] < 1:
        raise ValueError(f"logits must have shape (num_layers, ...), got {tuple(logits.shape)}")
    p = logits.softmax(dim=0)
    return p.cumsum(dim=0) - p[0]


def hgrn_forget_gate(logits: torch.Tensor, lower_bound: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``log f`` with ``f = lower_bound + (1 - lower_bound) * sigmoid(logits)``, element-wise.

    lower_bound: a number in [0, 1) or a tensor broadcasting to ``logits``. With a bound of 0 this is
    ``logsigmoid(logits)``; with a bound gamma > 0 every ``log f >= log gamma``.
    """
    check_tensor(logits, "logits", floating=True)
    if isinstance(lower_bound, torch.Tensor):
        if not bool(((lower_bound >= 0) & (lower_bound < 1)).all()):
            raise ValueError("lower_bound must lie in [0, 1)")
    else:
        lower_bound = check_float(lower_bound, "lower_bound", min=0.0, max=1.0, max_open=True)
        if lower_bound == 0.0:
            return F.logsigmoid(logits)
        lower_bound = torch.tensor(lower_bound, dtype=logits.dtype, device=logits.device)
    # log(gamma + (1 - gamma) sigma(x)) = logaddexp(log gamma, log(1 - gamma) + logsigmoid(x)): finite
    # however negative x is. Where gamma = 0 it is logsigmoid(x); gamma is replaced by 1 inside the
    # logarithm there, so neither branch's gradient sees log(0).
    zero = lower_bound == 0
    safe = torch.where(zero, torch.ones_like(lower_bound), lower_bound)
    bounded = torch.logaddexp(torch.log(safe), torch.log1p(-safe) + F.logsigmoid(logits))
    return torch.where(zero, F.logsigmoid(logits), bounded)


# --- HGRN: the element-wise recurrence ------------------------------------------------------------


def _hgrn_recurrent(x, g, state):
    """Naive reference: decay h by f_t = exp(g_t), then write (1 - f_t) x_t; the output is h itself."""
    return run_recurrence(
        x.shape[2],
        state,
        decay=lambda t, h: g[:, :, t].exp() * h,
        write=lambda t, h: -torch.expm1(g[:, :, t]) * x[:, :, t],  # 1 - f, exact for f near 1
        read=lambda t, h: h,
    )


def _hgrn_scan(x, g, state):
    _, h = associative_scan(g, -torch.expm1(g) * x, state)
    return h, h[:, :, -1]


def _hgrn_chunk(x, g, state, chunk_size):
    return chunked_scan(g, -torch.expm1(g) * x, chunk_size, state)


def _check_options(form, forms, chunk_size, output_final_state):
    check_choice(form, "form", forms)
    check_int(chunk_size, "chunk_size", min=1)
    check_bool(output_final_state, "output_final_state")


def _check_like(t: object, name: str, like: torch.Tensor, shape, names: str) -> None:
    check_tensor(t, name, ndim=len(shape), floating=True)
    assert isinstance(t, torch.Tensor)
    check_shape(t, name, shape, names=names)
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")


def hgrn(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HGRN: ``h_t = exp(g_t) * h_{t-1} + (1 - exp(g_t)) * x_t`` element-wise; the output is h.

    x: (B, H, T, D) candidates c_t; g: (B, H, T, D) log forget gates <= 0; form "recurrent",
    "scan" (the parallel associative scan) or "chunk" (a scan per chunk, the state carried);
    initial_state (B, H, D) or None. Returns o (B, H, T, D) in x's dtype, plus the final state
    (B, H, D) in the compute dtype when ``output_final_state``.
    """
    check_tensor(x, "x", ndim=4, floating=True)
    B, H, T, D = x.shape
    _check_like(g, "g", x, x.shape, "B, H, T, D")
    check_log_gate(g, "g")
    _check_options(form, ("recurrent", "scan", "chunk"), chunk_size, output_final_state)
    if initial_state is not None:
        _check_like(initial_state, "initial_state", x, (B, H, D), "B, H, D")
    forms = {
        "recurrent": _hgrn_recurrent,
        "scan": _hgrn_scan,
        "chunk": lambda x, g, h: _hgrn_chunk(x, g, h, chunk_size),
    }
    state = x.new_zeros(B, H, D) if initial_state is None else initial_state
    return run_form(forms, form, (x, g), state, value_dim=D, output_final_state=output_final_state)


# --- HGRN-2: the state expanded to a matrix -------------------------------------------------------


def _hgrn2_recurrent(q, v, g, scale, state):
    """Naive reference: decay the rows of S by f_t, write (1 - f_t) v_t^T, read S^T (scale q_t)."""
    return run_recurrence(
        q.shape[2],
        state,
        decay=lambda t, S: g[:, :, t, :, None].exp() * S,
        write=lambda t, S: -torch.expm1(g[:, :, t, :, None]) * v[:, :, t, None, :],
        read=lambda t, S: read_state(q[:, :, t] * scale, S),
    )


def hgrn2(
    q: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HGRN-2: ``S_t = diag(f_t) S_{t-1} + (1 - f_t) v_t^T``, ``o_t = S_t^T (scale q_t)``, f = exp(g).

    q: (B, H, T, D_k); v: (B, H, T, D_v); g: (B, H, T, D_k) log forget gates <= 0 (the key is
    1 - exp(g)); form "recurrent" or "chunk"; initial_state (B, H, D_k, D_v) or None. Returns o
    (B, H, T, D_v) in q's dtype, plus the final state when ``output_final_state``.
    """
    check_tensor(q, "q", ndim=4, floating=True)
    B, H, T, D_k = q.shape
    _check_like(v, "v", q, (B, H, T, None), "B, H, T, D_v")
    D_v = v.shape[-1]
    _check_like(g, "g", q, q.shape, "B, H, T, D_k")
    check_log_gate(g, "g")
    _check_options(form, ("recurrent", "chunk"), chunk_size, output_final_state)
    scale = resolve_scale(scale, D_k)
    check_state(initial_state, (B, H, D_k, D_v), q.device)
    forms = {
        "recurrent": lambda q, v, g, S: _hgrn2_recurrent(q, v, g, scale, S),
        "chunk": lambda q, v, g, S: chunk_gated_scan(q * scale, -torch.expm1(g), v, g, chunk_size, S),
    }
    state = q.new_zeros(B, H, D_k, D_v) if initial_state is None else initial_state
    return run_form(forms, form, (q, v, g), state, value_dim=D_v, output_final_state=output_final_state)


# --- the mixers -----------------------------------------------------------------------------------


class _BoundedMixer(_Mixer):
    """The forget-gate lower bound both HGRN layers share: fixed per layer, or passed to forward."""

    def __init__(self, d_model, num_heads, chunk_size, head_dim, form, lower_bound):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form)
        self.lower_bound = check_float(lower_bound, "lower_bound", min=0.0, max=1.0, max_open=True)

    def _bound(self, lower_bound):
        return self.lower_bound if lower_bound is None else lower_bound


class HGRNMixer(_BoundedMixer):
    """HGRN's token mixer: input, forget and output projections around :func:`hgrn`.

    ``c = silu(W_i x)`` (through the short convolution, with its SiLU, when ``conv_size`` > 0),
    ``log f = hgrn_forget_gate(W_f x, lower_bound)``, the recurrence on ``expand_ratio * d_model``
    channels, then a per-head RMSNorm, the output gate ``silu(W_g x)`` and ``o_proj``. The heads
    only group the norm: the recurrence is element-wise. ``lower_bound`` is this layer's bound
    (0 for the first layer; :func:`hgrn_lower_bounds` gives a stack's); ``forward(x, lower_bound=...)``
    overrides it, so a model can learn the bounds of all its layers together.
    """

    def __init__(
        self,
        d_model,
        num_heads,
        *,
        chunk_size=64,
        lower_bound=0.0,
        expand_ratio=1,
        conv_size=0,
        form="chunk",
    ):
        expand_ratio = check_int(expand_ratio, "expand_ratio", min=1)
        d_model = check_int(d_model, "d_model", min=1)
        num_heads = check_int(num_heads, "num_heads", min=1)
        width = expand_ratio * d_model
        if width % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide expand_ratio * d_model={width}")
        super().__init__(d_model, num_heads, chunk_size, width // num_heads, form, lower_bound)
        self.width = width
        self.i_proj = nn.Linear(d_model, width, bias=False)
        self.f_proj = nn.Linear(d_model, width, bias=False)
        self.g_proj = nn.Linear(d_model, width, bias=False)
        self.conv_size = check_int(conv_size, "conv_size", min=0)
        self.conv = ShortConvolution(width, conv_size) if conv_size > 0 else None
        self.norm = HeadRMSNorm(self.head_dim)
        self.o_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor, *, form: str | None = None, lower_bound=None) -> torch.Tensor:
        form = self._check(x, form)
        i = self.i_proj(x)
        c = self.conv(i) if self.conv is not None else F.silu(i)
        g = hgrn_forget_gate(self.f_proj(x), self._bound(lower_bound))
        H = self.num_heads
        o = hgrn(_split_heads(c, H), _split_heads(g, H), form=form, chunk_size=self.chunk_size)
        return self.o_proj(_merge_heads(self.norm(o)) * F.silu(self.g_proj(x)))


class HGRN2Mixer(_BoundedMixer):
    """HGRN-2's token mixer: :func:`hgrn2` with queries, forget gates (whose complement is the key)
    and values projected from the input.

    ``q = silu(W_q x)``, ``log f = hgrn_forget_gate(W_f x, lower_bound)`` with ``key_dim`` per head
    (default ``d_model / num_heads``), ``v = W_v x``; with ``conv_size`` > 0, q and v pass through the
    short convolution (with its SiLU) instead. Output: per-head RMSNorm and ``o_proj`` (no output
    gate, as in flash-linear-attention's layer). ``lower_bound`` as in :class:`HGRNMixer`.
    """

    def __init__(
        self,
        d_model,
        num_heads,
        *,
        chunk_size=64,
        lower_bound=0.0,
        key_dim=None,
        conv_size=0,
        form="chunk",
    ):
        super().__init__(d_model, num_heads, chunk_size, None, form, lower_bound)
        self.key_dim = self.head_dim if key_dim is None else check_int(key_dim, "key_dim", min=1)
        key_width, width = self.num_heads * self.key_dim, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, key_width, bias=False)
        self.f_proj = nn.Linear(d_model, key_width, bias=False)
        self.v_proj = nn.Linear(d_model, width, bias=False)
        self.conv_size = check_int(conv_size, "conv_size", min=0)
        self.conv = ShortConvolution(key_width + width, conv_size) if conv_size > 0 else None
        self.norm = HeadRMSNorm(self.head_dim)
        self.o_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor, *, form: str | None = None, lower_bound=None) -> torch.Tensor:
        form = self._check(x, form)
        q, v = self.q_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, v = self.conv(torch.cat([q, v], dim=-1)).split([q.shape[-1], v.shape[-1]], dim=-1)
        else:
            q = F.silu(q)
        g = hgrn_forget_gate(self.f_proj(x), self._bound(lower_bound))
        H = self.num_heads
        o = hgrn2(
            _split_heads(q, H), _split_heads(v, H), _split_heads(g, H), form=form, chunk_size=self.chunk_size
        )
        return self.o_proj(_merge_heads(self.norm(o)))
