"""Token mixers built on the recurrent cores: one ``nn.Module`` per method, one interface for all.

Every mixer is built as ``Mixer(d_model, num_heads, *, chunk_size=64, **method_options)`` and maps
``x`` of shape (B, T, d_model) to (B, T, d_model), causally. Inside, each one

1. projects the input to queries, keys and values (one set per head);
2. optionally runs a short causal depthwise convolution over time (kernel 4, then SiLU), as
   Mamba-2, DeltaNet and Gated DeltaNet do, so each token sees a few neighbours before the
   recurrence starts;
3. computes its gates from the input: log forget gates through ``logsigmoid`` (or
   ``-exp(A) * softplus`` for the Mamba-2 style decays), write strengths beta through ``sigmoid``,
   step sizes dt through ``softplus``; keys of the delta-rule family are L2-normalised;
4. runs the core (:func:`retention`, :func:`gla`, :func:`ssd`, ...) in ``form="chunk"`` (default)
   or ``form="recurrent"`` — the two forms give the same numbers;
5. normalises each head's output (RMSNorm), applies the method's output gate if it has one, and
   projects back to ``d_model``.

``forward(x, *, form=None)`` overrides the form chosen at construction. ``MIXERS`` maps a short
name to each class. The layers keep only what distinguishes the methods; the papers add details
left out here (RetNet's xPos rotations, TTT's inner LayerNorm and residual, RWKV's channel mix),
which the docstrings name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_divisible, check_float, check_int, check_tensor
from .delta_rule import delta_rule, gated_delta_rule
from .gla import gla
from .mlstm import mlstm
from .retention import retention, retnet_gammas
from .rwkv import rwkv6
from .ssd import ssd
from .ttt import ttt_linear

__all__ = [
    "ShortConvolution",
    "HeadRMSNorm",
    "QKVMixer",
    "RetNetMixer",
    "GLAMixer",
    "Mamba2Mixer",
    "MLSTMMixer",
    "DeltaNetMixer",
    "GatedDeltaNetMixer",
    "TTTLinearMixer",
    "RWKV6Mixer",
    "MIXERS",
]

FORMS = ("chunk", "recurrent")


# --- shared pieces ---------------------------------------------------------------------------


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time, then SiLU: (B, T, C) -> (B, T, C).

    Output t mixes inputs t - kernel_size + 1 .. t of the same channel (zeros before the start).
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = check_int(kernel_size, "kernel_size", min=1)
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        return F.silu(self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2))


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned gain: each head's output separately."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H * D) -> (B, H, T, D)."""
    B, T, width = x.shape
    return x.view(B, T, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H * D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


class _Mixer(nn.Module):
    """What every mixer shares: argument checks, head sizes, the form and the input check."""

    def __init__(self, d_model: int, num_heads: int, chunk_size: int, head_dim: int | None, form: str):
        super().__init__()
        self.d_model = check_int(d_model, "d_model", min=1)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        self.chunk_size = check_int(chunk_size, "chunk_size", min=1)
        if head_dim is None:
            check_divisible(d_model, "d_model", num_heads, "num_heads")
            head_dim = d_model // num_heads
        self.head_dim = check_int(head_dim, "head_dim", min=1)
        self.form = check_choice(form, "form", FORMS)

    def _check(self, x: object, form: str | None) -> str:
        check_tensor(x, "x", ndim=3, floating=True)
        assert isinstance(x, torch.Tensor)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")
        return self.form if form is None else check_choice(form, "form", FORMS)

    def extra_repr(self) -> str:
        sizes = f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}"
        return f"{sizes}, form={self.form!r}"


class QKVMixer(_Mixer):
    """Mixers with q, k, v projections (optionally through a short convolution), a per-head output
    norm, an optional output gate and an output projection. Subclasses supply ``_core``."""

    normalize_qk = False  # the delta-rule family L2-normalises queries and keys
    output_gate = "silu"  # "silu" (swish gate), "sigmoid" or None

    def __init__(self, d_model, num_heads, chunk_size, head_dim, form, conv_size):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form)
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, width, bias=False)
        self.k_proj = nn.Linear(d_model, width, bias=False)
        self.v_proj = nn.Linear(d_model, width, bias=False)
        self.conv_size = check_int(conv_size, "conv_size", min=0)
        self.conv = ShortConvolution(3 * width, conv_size) if conv_size > 0 else None
        self.gate_proj = nn.Linear(d_model, width, bias=False) if self.output_gate else None
        self.norm = HeadRMSNorm(self.head_dim)
        self.o_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor, *, form: str | None = None) -> torch.Tensor:
        form = self._check(x, form)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if self.conv is not None:
            qkv = self.conv(qkv)
        q, k, v = (_split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        if self.normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        o = self.norm(self._core(x, q, k, v, form))
        o = _merge_heads(o)
        if self.gate_proj is not None:
            gate = self.gate_proj(x)
            o = o * (F.silu(gate) if self.output_gate == "silu" else torch.sigmoid(gate))
        return self.o_proj(o)

    def _core(self, x, q, k, v, form):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


_QKVMixer = QKVMixer  # the earlier private name, kept as an alias for one release


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, H, T): one gate value per head and token."""
    return x.transpose(1, 2)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


# --- the mixers ------------------------------------------------------------------------------


class RetNetMixer(QKVMixer):
    """Multi-scale retention (RetNet): one fixed decay per head, ``gamma_h = 1 - 2^(-5-h)``.

    No data-dependent gate: the decays are a buffer, not parameters. Output: per-head norm, swish
    gate, projection. (The paper also rotates q and k with xPos; left out.)
    Options: ``head_dim``, ``conv_size`` (default 0), ``form``.
    """

    def __init__(self, d_model, num_heads, *, chunk_size=64, head_dim=None, conv_size=0, form="chunk"):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form, conv_size)
        self.register_buffer("log_decay", torch.log(retnet_gammas(self.num_heads)).float())

    def _core(self, x, q, k, v, form):
        return retention(q, k, v, self.log_decay.to(q.dtype), form=form, chunk_size=self.chunk_size)


class GLAMixer(QKVMixer):
    """Gated Linear Attention: a data-dependent forget gate per key dimension.

    ``g = logsigmoid(W_2 W_1 x + b) / gate_normalizer`` with a low-rank ``W_2 W_1`` (rank
    ``gate_rank``, 16 in the paper) and the paper's normaliser 16, which keeps the gates near 1
    (slow forgetting) at initialisation. Output: per-head norm, swish gate, projection.
    """

    def __init__(
        self,
        d_model,
        num_heads,
        *,
        chunk_size=64,
        head_dim=None,
        conv_size=0,
        gate_rank=16,
        gate_normalizer=16.0,
        form="chunk",
    ):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form, conv_size)
        gate_rank = check_int(gate_rank, "gate_rank", min=1)
        self.gate_normalizer = check_float(gate_normalizer, "gate_normalizer", min=0.0, min_open=True)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, self.num_heads * self.head_dim, bias=True)

    def _core(self, x, q, k, v, form):
        g = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_normalizer
        return gla(q, k, v, _split_heads(g, self.num_heads), form=form, chunk_size=self.chunk_size)


class MLSTMMixer(QKVMixer):
    """xLSTM's mLSTM: exponential input gate, sigmoid forget gate, normaliser state.

    ``i = W_i x + b_i`` (pre-activation, the gate is exp(i)), ``f = logsigmoid(W_f x + b_f)`` with
    the forget biases initialised between 3 and 6 (remember by default), one of each per head.
    Output: per-head norm, sigmoid output gate, projection. Options: ``conv_size`` (default 4).
    """

    output_gate = "sigmoid"

    def __init__(self, d_model, num_heads, *, chunk_size=64, head_dim=None, conv_size=4, form="chunk"):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form, conv_size)
        self.input_gate = nn.Linear(d_model, self.num_heads)
        self.forget_gate = nn.Linear(d_model, self.num_heads)
        with torch.no_grad():
            self.input_gate.bias.zero_()
            self.forget_gate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))

    def _core(self, x, q, k, v, form):
        i = _per_head(self.input_gate(x))
        f = _per_head(F.logsigmoid(self.forget_gate(x)))
        return mlstm(q, k, v, i, f, form=form, chunk_size=self.chunk_size)


class DeltaNetMixer(QKVMixer):
    """DeltaNet: the delta rule with ``beta = sigmoid(W_beta x)`` per head and token.

    q, k and v pass through a short convolution (kernel ``conv_size``, default 4) with SiLU; q and
    k are L2-normalised so that ``I - beta k k^T`` never expands the state. Output: per-head RMSNorm
    and projection (no output gate, as in the paper's default).
    """

    normalize_qk = True
    output_gate = None

    def __init__(self, d_model, num_heads, *, chunk_size=64, head_dim=None, conv_size=4, form="chunk"):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form, conv_size)
        self.beta_proj = nn.Linear(d_model, self.num_heads)

    def _core(self, x, q, k, v, form):
        beta = _per_head(torch.sigmoid(self.beta_proj(x)))
        return delta_rule(q, k, v, beta, form=form, chunk_size=self.chunk_size)


class GatedDeltaNetMixer(QKVMixer):
    """Gated DeltaNet: DeltaNet with a Mamba-2 style scalar decay per head and token.

    ``g = -exp(A_log) * softplus(W_a x + dt_bias)`` (log decay <= 0), ``beta = sigmoid(W_beta x)``;
    short convolution and L2-normalised q, k as in DeltaNet. Output: per-head RMSNorm, swish gate,
    projection.
    """

    normalize_qk = True

    def __init__(self, d_model, num_heads, *, chunk_size=64, head_dim=None, conv_size=4, form="chunk"):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form, conv_size)
        H = self.num_heads
        self.beta_proj = nn.Linear(d_model, H)
        self.decay_proj = nn.Linear(d_model, H, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, H)))
        # dt = softplus(. + dt_bias) starts log-spaced in [0.001, 0.1], as in Mamba-2.
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), H))
        self.dt_bias = nn.Parameter(_inverse_softplus(dt))

    def _core(self, x, q, k, v, form):
        beta = _per_head(torch.sigmoid(self.beta_proj(x)))
        g = _per_head(-self.A_log.exp() * F.softplus(self.decay_proj(x) + self.dt_bias))
        return gated_delta_rule(q, k, v, g, beta, form=form, chunk_size=self.chunk_size)


class TTTLinearMixer(QKVMixer):
    """TTT-Linear: the state is a linear model trained online on ``||W^T k - v||^2 / 2``.

    Inner learning rates ``lr = base_lr * sigmoid(W_lr x)`` per head and token; one gradient step
    per mini-batch of ``mini_batch_size`` tokens (16 in the paper; ``chunk_size`` must be a multiple
    of it). q and k are L2-normalised, which keeps a step with lr <= 1 from overshooting. (The
    paper wraps W in LayerNorm and a residual; left out, so with mini-batch 1 this is DeltaNet.)
    Output: per-head RMSNorm, swish gate, projection.
    """

    normalize_qk = True

    def __init__(
        self,
        d_model,
        num_heads,
        *,
        chunk_size=64,
        head_dim=None,
        conv_size=4,
        mini_batch_size=16,
        base_lr=1.0,
        form="chunk",
    ):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form, conv_size)
        self.mini_batch_size = check_int(mini_batch_size, "mini_batch_size", min=1)
        check_divisible(self.chunk_size, "chunk_size", self.mini_batch_size, "mini_batch_size")
        self.base_lr = check_float(base_lr, "base_lr", min=0.0)
        self.lr_proj = nn.Linear(d_model, self.num_heads)

    def _core(self, x, q, k, v, form):
        lr = _per_head(self.base_lr * torch.sigmoid(self.lr_proj(x)))
        return ttt_linear(
            q, k, v, lr, mini_batch_size=self.mini_batch_size, form=form, chunk_size=self.chunk_size
        )


class RWKV6Mixer(QKVMixer):
    """RWKV-6 time mixing: token shift, per-dimension data-dependent decay, a bonus for the current token.

    Each branch (r, k, v, decay, gate) sees ``x + mu * (x_{t-1} - x_t)`` (the token shift, with a
    learned ``mu`` per branch and channel); the log decay is ``w = -exp(w_0 + W_2 tanh(W_1 x))`` per
    key dimension; ``u`` (H, D_k) is the bonus. No scale (RWKV uses none). Output: per-head norm,
    swish gate, projection. (RWKV-6 also makes the token-shift mix data dependent; here it is static.)
    """

    def __init__(self, d_model, num_heads, *, chunk_size=64, head_dim=None, decay_rank=32, form="chunk"):
        super().__init__(d_model, num_heads, chunk_size, head_dim, form, conv_size=0)
        decay_rank = check_int(decay_rank, "decay_rank", min=1)
        width = self.num_heads * self.head_dim
        self.shift_mix = nn.Parameter(torch.full((5, d_model), 0.5))
        self.decay_down = nn.Linear(d_model, decay_rank, bias=False)
        self.decay_up = nn.Linear(decay_rank, width, bias=False)
        with torch.no_grad():
            self.decay_up.weight.mul_(0.1)  # a small data-dependent part around w_0 at the start
        # exp(w_0) from e^-6 to e^-1: per-step decays exp(-exp(w_0)) from about 0.998 to 0.69.
        self.decay_base = nn.Parameter(torch.linspace(-6.0, -1.0, width))
        self.bonus = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))

    def forward(self, x: torch.Tensor, *, form: str | None = None) -> torch.Tensor:
        form = self._check(x, form)
        previous = F.pad(x, (0, 0, 1, 0))[:, :-1]  # x_{t-1}, zeros before the first token
        xr, xk, xv, xw, xg = (x + mu * (previous - x) for mu in self.shift_mix)
        branches = ((self.q_proj, xr), (self.k_proj, xk), (self.v_proj, xv))
        r, k, v = (_split_heads(project(t), self.num_heads) for project, t in branches)
        inner = (self.decay_base + self.decay_up(torch.tanh(self.decay_down(xw)))).clamp(max=10.0)
        w = _split_heads(-inner.exp(), self.num_heads)
        o = rwkv6(r, k, v, w, self.bonus.to(r.dtype), form=form, chunk_size=self.chunk_size, scale=1.0)
        o = _merge_heads(self.norm(o)) * F.silu(self.gate_proj(xg))
        return self.o_proj(o)


class Mamba2Mixer(_Mixer):
    """Mamba-2: the SSD core with input-dependent B, C and dt, a scalar A per head.

    ``in_proj`` makes z (gate), x, B, C (shared by all heads, one group) and dt from the input;
    x, B, C pass through the short convolution (kernel ``conv_size``, default 4) with SiLU;
    ``dt = softplus(. + dt_bias)``, ``A = -exp(A_log)``. Output: ``y + D x``, then RMSNorm of
    ``y * silu(z)`` and ``out_proj``. ``expand`` (2) sets the inner width ``expand * d_model``,
    split into ``num_heads`` heads of ``head_dim = expand * d_model / num_heads`` channels;
    ``state_size`` is N (16).
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
        form="chunk",
    ):
        expand = check_int(expand, "expand", min=1)
        check_divisible(expand * d_model, "expand * d_model", num_heads, "num_heads")
        super().__init__(d_model, num_heads, chunk_size, expand * d_model // num_heads, form)
        self.state_size = check_int(state_size, "state_size", min=1)
        self.conv_size = check_int(conv_size, "conv_size", min=0)
        H, N = self.num_heads, self.state_size
        self.d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * N + H, bias=False)
        conv_width = self.d_inner + 2 * N
        self.conv = ShortConvolution(conv_width, conv_size) if conv_size > 0 else None
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, H)))
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), H))
        self.dt_bias = nn.Parameter(_inverse_softplus(dt))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = HeadRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, *, form: str | None = None) -> torch.Tensor:
        form = self._check(x, form)
        H, N, batch, T = self.num_heads, self.state_size, x.shape[0], x.shape[1]
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        if self.conv is not None:
            xbc = self.conv(xbc)
        inner, B, C = xbc.split([self.d_inner, N, N], dim=-1)
        inner = _split_heads(inner, H)  # (batch, H, T, P)
        B, C = (t[:, None].expand(batch, H, T, N) for t in (B, C))  # one group: shared by all heads
        dt = _per_head(F.softplus(dt + self.dt_bias))
        A = -self.A_log.exp()
        y = ssd(inner, dt, A, B, C, form=form, chunk_size=self.chunk_size)
        y = y + self.D[:, None, None] * inner
        y = self.norm(_merge_heads(y) * F.silu(z))
        return self.out_proj(y)


MIXERS: dict[str, type[nn.Module]] = {
    "retnet": RetNetMixer,
    "gla": GLAMixer,
    "mamba2": Mamba2Mixer,
    "mlstm": MLSTMMixer,
    "deltanet": DeltaNetMixer,
    "gated_deltanet": GatedDeltaNetMixer,
    "ttt_linear": TTTLinearMixer,
    "rwkv6": RWKV6Mixer,
}
