"""Gated linear recurrences (chapter 07): one state, decayed, written and read at every token.

Every entry runs its library function in the chunk form by default (``form="recurrent"`` is the
naive reference) and decodes one token with one recurrent step from its fixed-size state.
"""

from __future__ import annotations

import math

import torch

from ..recurrent import (
    HGRN2Mixer,
    HGRNMixer,
    Mamba1Mixer,
    RWKV7Mixer,
    delta_rule,
    gated_delta_rule,
    gla,
    hgrn,
    hgrn2,
    mlstm,
    retention,
    retnet_gammas,
    rwkv6,
    rwkv7,
    selective_scan,
    ssd,
    ttt_linear,
    ttt_mlp,
)
from ..recurrent.layers import (
    DeltaNetMixer,
    GatedDeltaNetMixer,
    GLAMixer,
    Mamba2Mixer,
    MLSTMMixer,
    RetNetMixer,
    RWKV6Mixer,
    TTTLinearMixer,
)
from . import builders, costs
from .core import Gates, Geometry, Mechanism, register

CHUNK = 64
TTT_HIDDEN = 2  # TTT-MLP's hidden width, in multiples of D_k


def _matrix_state(T, g, **_):
    return g.heads * g.head_dim * g.dv


def _chunk_cost(delta=False):
    return lambda phase, T, g: costs.chunked(phase, T, g, chunk=CHUNK, delta=delta)


def _recurrent(name, *, call, inputs, gates, delta=False, options=None, **fields):
    """A recurrent entry with the chapter's shared defaults (chunk form, state decoding, chunk cost)."""
    return register(
        Mechanism(
            name=name,
            family="linear",
            chapter=7,
            inputs=inputs,
            call=call,
            options={"form": "chunk", "chunk_size": CHUNK, **(options or {})},
            forms=fields.pop("forms", ("recurrent", "chunk")),
            decode="state",
            state_numbers=fields.pop("state_numbers", _matrix_state),
            cost=fields.pop("cost", _chunk_cost(delta)),
            gates=gates,
            **fields,
        )
    )


def _with(extra):
    """Inputs: q, k, v plus ``extra(T, g, generator)``."""
    return lambda T, g, generator: {**builders.qkv(T, g, generator), **extra(T, g, generator)}


def _unit_keys_with(extra):
    return lambda T, g, generator: {**builders.qkv(T, g, generator, unit_keys=True), **extra(T, g, generator)}


def _per_step(g, T):
    return (g.batch, g.heads, T)


_recurrent(
    "retnet",
    title="RetNet",
    summary="a fixed decay per head (multi-scale): forget, no select",
    reference="Retentive Network, Sun et al., 2023",
    function=retention,
    inputs=_with(lambda T, g, gen: {"g": torch.log(retnet_gammas(g.heads))}),
    call=lambda x, **o: retention(x["q"], x["k"], x["v"], x["g"], **o),
    static_inputs=("g",),
    trainable=("q", "k", "v"),
    gates=Gates(forget="fixed"),
    mixer=RetNetMixer,
)

_recurrent(
    "gla",
    title="GLA",
    summary="a data-dependent forget gate per key dimension",
    reference="Gated Linear Attention Transformers with Hardware-Efficient Training, Yang et al., 2024",
    function=gla,
    inputs=_with(lambda T, g, gen: {"g": builders.log_gates(gen, g.batch, g.heads, T, g.head_dim)}),
    call=lambda x, **o: gla(x["q"], x["k"], x["v"], x["g"], **o),
    trainable=("q", "k", "v", "g"),
    gates=Gates(forget="vector"),
    mixer=GLAMixer,
)

_recurrent(
    "mamba2",
    title="Mamba-2 (SSD)",
    summary="a scalar decay exp(A dt) per head; dt also scales the write: forget + select",
    reference="Transformers are SSMs (Mamba-2), Dao and Gu, 2024",
    function=ssd,
    inputs=lambda T, g, gen: {
        "C": builders.normal(gen, g.batch, g.heads, T, g.n),
        "B": builders.normal(gen, g.batch, g.heads, T, g.n),
        "x": builders.normal(gen, g.batch, g.heads, T, g.dv),
        "dt": builders.step_sizes(gen, *_per_step(g, T)),
        "A": builders.decay_rates(g.heads),
    },
    call=lambda x, **o: ssd(x["x"], x["dt"], x["A"], x["B"], x["C"], **o),
    static_inputs=("A",),
    trainable=("C", "B", "x", "dt", "A"),
    state_numbers=lambda T, g, **_: g.heads * g.n * g.dv,
    gates=Gates(forget="scalar", select="dt"),
    mixer=Mamba2Mixer,
    # The layer widens to expand * d_model = 2 d_model channels, split into heads of P = 2 d / H,
    # with a state of N = 16 per channel.
    mixer_geometry=lambda d_model, num_heads: Geometry(
        heads=num_heads, head_dim=16, value_dim=2 * d_model // num_heads, state_size=16
    ),
)

_recurrent(
    "mlstm",
    title="mLSTM (xLSTM)",
    summary="exponential input gate, sigmoid forget gate, a normaliser state",
    reference="xLSTM: Extended Long Short-Term Memory, Beck et al., 2024",
    function=mlstm,
    inputs=_with(
        lambda T, g, gen: {
            "i": builders.normal(gen, *_per_step(g, T)),
            "f": builders.log_gates(gen, *_per_step(g, T)),
        }
    ),
    call=lambda x, **o: mlstm(x["q"], x["k"], x["v"], x["i"], x["f"], **o),
    trainable=("q", "k", "v", "i", "f"),
    state_numbers=lambda T, g, **_: g.heads * (g.head_dim * g.dv + g.head_dim + 1),
    gates=Gates(forget="scalar", select="exp(i)"),
    mixer=MLSTMMixer,
)

_recurrent(
    "deltanet",
    title="DeltaNet",
    summary="the delta rule: write the error of the current read-out, scaled by beta",
    reference="Linear Transformers Are Secretly Fast Weight Programmers, Schlag, Irie and Schmidhuber, "
    "2021; Parallelizing Linear Transformers with the Delta Rule, Yang et al., 2024",
    function=delta_rule,
    inputs=_unit_keys_with(lambda T, g, gen: {"beta": builders.strengths(gen, *_per_step(g, T))}),
    call=lambda x, **o: delta_rule(x["q"], x["k"], x["v"], x["beta"], **o),
    trainable=("q", "k", "v", "beta"),
    delta=True,
    gates=Gates(select="beta", write="delta"),
    mixer=DeltaNetMixer,
)

_recurrent(
    "gated_deltanet",
    title="Gated DeltaNet",
    summary="a scalar forget gate in front of the delta rule",
    reference="Gated Delta Networks, Yang, Kautz and Hatamizadeh, 2025",
    function=gated_delta_rule,
    inputs=_unit_keys_with(
        lambda T, g, gen: {
            "g": builders.log_gates(gen, *_per_step(g, T)),
            "beta": builders.strengths(gen, *_per_step(g, T)),
        }
    ),
    call=lambda x, **o: gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **o),
    trainable=("q", "k", "v", "g", "beta"),
    delta=True,
    gates=Gates(forget="scalar", select="beta", write="delta"),
    mixer=GatedDeltaNetMixer,
)

_recurrent(
    "ttt_linear",
    title="TTT-Linear",
    summary="the state is a linear model trained online on (k, v), one step per mini-batch",
    reference="Learning to (Learn at Test Time), Sun et al., 2024",
    function=ttt_linear,
    inputs=_unit_keys_with(lambda T, g, gen: {"lr": builders.strengths(gen, *_per_step(g, T))}),
    call=lambda x, **o: ttt_linear(x["q"], x["k"], x["v"], x["lr"], **o),
    options={"mini_batch_size": 16},
    trainable=("q", "k", "v", "lr"),
    delta=True,
    gates=Gates(select="lr", write="delta"),
    mixer=TTTLinearMixer,
)


def _ttt_mlp_call(
    x, *, form="chunk", chunk_size=None, initial_state=None, output_final_state=False, **options
):
    """TTT-MLP needs starting weights: small seeded ones when no state is carried in, the same for
    every sequence of the batch (a sequence's output does not depend on its place in the batch)."""
    q = x["q"]
    if initial_state is None:
        B, H, _, D_k = q.shape
        generator = torch.Generator().manual_seed(0)
        hidden = TTT_HIDDEN * D_k
        W1 = torch.randn(1, H, D_k, hidden, generator=generator, device="cpu") * D_k**-0.5
        W2 = torch.randn(1, H, hidden, x["v"].shape[-1], generator=generator, device="cpu") * hidden**-0.5
        initial_state = (W1.to(q).expand(B, -1, -1, -1), W2.to(q).expand(B, -1, -1, -1))
    return ttt_mlp(
        q, x["k"], x["v"], x["lr"], initial_state, form=form, output_final_state=output_final_state, **options
    )


_recurrent(
    "ttt_mlp",
    title="TTT-MLP",
    summary="the state is a two-layer MLP trained online: a nonlinear memory",
    reference="Learning to (Learn at Test Time), Sun et al., 2024",
    function=ttt_mlp,
    # Inner learning rates a tenth of TTT-Linear's: a step of ~0.5 on the two-layer MLP overshoots,
    # and its outputs grew to 1e6 by T = 64 and to NaN by T = 128 (H = 4, D = 64).
    inputs=_unit_keys_with(lambda T, g, gen: {"lr": 0.1 * builders.strengths(gen, *_per_step(g, T))}),
    call=_ttt_mlp_call,
    options={"mini_batch_size": 16},
    trainable=("q", "k", "v", "lr"),
    state_numbers=lambda T, g, **_: g.heads * TTT_HIDDEN * g.head_dim * (g.head_dim + g.dv),
    cost=None,
    gates=Gates(select="lr", write="delta"),
)

_recurrent(
    "rwkv6",
    title="RWKV-6",
    summary="per-dimension data-dependent decay, read before the write, a bonus for the current token",
    reference="Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence, Peng et al., 2024",
    function=rwkv6,
    inputs=_with(
        lambda T, g, gen: {
            "w": builders.log_gates(gen, g.batch, g.heads, T, g.head_dim),
            "u": builders.normal(gen, g.heads, g.head_dim),
        }
    ),
    call=lambda x, **o: rwkv6(x["q"], x["k"], x["v"], x["w"], x["u"], **o),
    static_inputs=("u",),
    trainable=("q", "k", "v", "w", "u"),
    gates=Gates(forget="vector"),
    mixer=RWKV6Mixer,
)


# --- chapter 07's second round: Mamba-1's selective scan, HGRN, HGRN-2, RWKV-7 ---------------------


def _selective_scan_inputs(T, g, gen):
    """S6 in mamba_ssm's layout: H * D_v channels, each its own SSM with a state of N."""
    channels = g.heads * g.dv
    return {
        "u": builders.normal(gen, g.batch, channels, T),
        "delta": builders.step_sizes(gen, g.batch, channels, T),
        "A": -torch.arange(1, g.n + 1, dtype=builders.F64).expand(channels, g.n).clone(),
        "B": builders.normal(gen, g.batch, g.n, T),
        "C": builders.normal(gen, g.batch, g.n, T),
        "D": torch.ones(channels, dtype=builders.F64),
        "z": builders.normal(gen, g.batch, channels, T),
    }


def _selective_scan_call(x, **options):
    """The scan on (batch, channels, L), returned as one head of all channels, (batch, 1, L, channels)."""
    result = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], **options)
    out, state = result if isinstance(result, tuple) else (result, None)
    out = out.transpose(1, 2).unsqueeze(1)  # Mamba-1 has no heads: every channel is its own SSM
    return out if state is None else (out, state)


_recurrent(
    "mamba1",
    title="Mamba-1 (S6)",
    summary="a selective scan: a diagonal decay exp(delta A) per channel and state entry, no matmuls",
    reference="Mamba: Linear-Time Sequence Modeling with Selective State Spaces, Gu and Dao, 2023",
    function=selective_scan,
    inputs=_selective_scan_inputs,
    call=_selective_scan_call,
    forms=("recurrent", "scan", "chunk"),
    static_inputs=("A", "D"),
    trainable=("u", "delta", "A", "B", "C", "D", "z"),
    state_numbers=lambda T, g, **_: g.heads * g.dv * g.n,
    gates=Gates(forget="vector", select="delta"),
    mixer=Mamba1Mixer,
    mixer_geometry=lambda d_model, num_heads: Geometry(
        heads=1, head_dim=16, value_dim=2 * d_model, state_size=16
    ),
)


_recurrent(
    "hgrn",
    title="HGRN",
    summary="an element-wise gated RNN, h = f h + (1 - f) c, its forget gate bounded below by depth",
    reference="Hierarchically Gated Recurrent Neural Network for Sequence Modeling, Qin, Yang, Zhong, 2023",
    function=hgrn,
    inputs=lambda T, g, gen: {
        "x": builders.normal(gen, g.batch, g.heads, T, g.dv),
        "g": builders.log_gates(gen, g.batch, g.heads, T, g.dv),
    },
    call=lambda x, **o: hgrn(x["x"], x["g"], **o),
    forms=("recurrent", "scan", "chunk"),
    trainable=("x", "g"),
    state_numbers=lambda T, g, **_: g.heads * g.dv,  # a vector per head: no outer-product state
    cost=None,
    gates=Gates(forget="vector", select="1 - f"),
    mixer=HGRNMixer,
)

_recurrent(
    "hgrn2",
    title="HGRN-2",
    summary="HGRN with an outer-product state: the key is 1 - f, so forgetting and writing are tied",
    reference="HGRN2: Gated Linear RNNs with State Expansion, Qin et al., 2024",
    function=hgrn2,
    inputs=lambda T, g, gen: {
        "q": builders.normal(gen, g.batch, g.heads, T, g.head_dim),
        "v": builders.normal(gen, g.batch, g.heads, T, g.dv),
        "g": builders.log_gates(gen, g.batch, g.heads, T, g.head_dim),
    },
    call=lambda x, **o: hgrn2(x["q"], x["v"], x["g"], **o),
    trainable=("q", "v", "g"),
    gates=Gates(forget="vector", select="1 - f"),
    mixer=HGRN2Mixer,
)


def _rwkv7_inputs(T, g, gen):
    """RWKV-7's own parametrisation: a = -kappa (unit), b = kappa * alpha, decays in (-e^-1/2, 0)."""
    x = builders.qkv(T, g, gen)
    kappa = torch.nn.functional.normalize(builders.normal(gen, g.batch, g.heads, T, g.head_dim), dim=-1)
    alpha = builders.strengths(gen, g.batch, g.heads, T, g.head_dim)
    w = -math.exp(-0.5) * builders.strengths(gen, g.batch, g.heads, T, g.head_dim)
    return {**x, "w": w, "a": -kappa, "b": kappa * alpha}


_recurrent(
    "rwkv7",
    title="RWKV-7",
    summary="the generalised delta rule: vector decay plus a low-rank in-context update",
    reference='RWKV-7 "Goose" with Expressive Dynamic State Evolution, Peng et al., 2025',
    function=rwkv7,
    inputs=_rwkv7_inputs,
    call=lambda x, **o: rwkv7(x["q"], x["k"], x["v"], x["w"], x["a"], x["b"], **o),
    trainable=("q", "k", "v", "w", "a", "b"),
    delta=True,
    gates=Gates(forget="vector", select="in-context rate", write="delta"),
    mixer=RWKV7Mixer,
)
