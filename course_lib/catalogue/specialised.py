"""Specialised variants (chapter 08): changes to the attention layer itself, and across devices."""

from __future__ import annotations

from ..mixers import AttentionMixer
from ..specialized import (
    HybridAttentionStack,
    SwitchHeadAttention,
    differential_attention,
    ring_attention,
)
from . import builders, costs
from .core import Geometry, Mechanism, register
from .layers import LayerForm

# --- differential attention: a function on two query/key halves and one value --------------------


def _differential_half(g: Geometry) -> int:
    """The width of each query/key half: the paper splits a head of d into two halves of d / 2."""
    return max(1, g.head_dim // 2)


def _differential_inputs(T: int, g: Geometry, generator) -> dict:
    """q1, k1, q2, k2 (B, H, T, d / 2), v (B, H, T, D_v), and one lambda per head in (0.2, 0.8):
    the paper's lambda_init runs from 0.2 (first layer) to 0.8 (deep layers)."""
    half = _differential_half(g)
    shape = (g.batch, g.heads, T)
    halves = {key: builders.normal(generator, *shape, half) for key in ("q1", "k1", "q2", "k2")}
    return {
        **halves,
        "v": builders.normal(generator, *shape, g.dv),
        "lambda": 0.2 + 0.6 * builders.strengths(generator, g.heads),
    }


def _differential_cost(phase: str, T: int, g: Geometry) -> dict[str, float]:
    """Two softmax maps with keys of d / 2 over shared values, each materialised (the course's
    function calls naive attention twice): ``4 H T^2 (d / 2 + D_v)`` FLOPs in prefill, twice the
    scores and weights of one map in bytes. Decode reads k1, k2 and v of every cached token."""
    H, half, d_v, F = g.heads, _differential_half(g), g.dv, costs.F32
    if phase == "decode":
        flops = 4 * H * T * (half + d_v)
        moved = F * (H * T * (2 * half + d_v) + H * (2 * half + d_v) + 2 * 4 * H * T)
        return {"flops": float(flops), "bytes": float(moved)}
    flops = 4 * H * T * T * (half + d_v)
    moved = F * (H * T * (4 * half + 2 * d_v) + 2 * 4 * H * T * T)
    factor = 3 if phase == "train" else 1
    return {"flops": float(factor * flops), "bytes": float(factor * moved)}


register(
    Mechanism(
        name="differential",
        title="differential attention",
        family="specialised",
        chapter=8,
        summary="the difference of two softmax maps cancels common-mode attention noise",
        reference="Differential Transformer, Ye et al., 2024",
        function=differential_attention,
        inputs=_differential_inputs,
        call=lambda x, *, causal=True: differential_attention(
            x["q1"], x["k1"], x["q2"], x["k2"], x["v"], x["lambda"], causal=causal
        ),
        trainable=("q1", "k1", "q2", "k2", "v", "lambda"),
        static_inputs=("lambda",),
        query_inputs=("q1", "q2"),
        # A KV cache of both key halves and the values: as many numbers per token as standard
        # attention with the same width (two halves of d / 2 and a value of D_v).
        decode="cache",
        state_numbers=lambda T, g, **_: T * g.heads * (2 * _differential_half(g) + g.dv),
        cost=_differential_cost,
    )
)


# --- SwitchHead: a layer, run through its functional form (catalogue.layers) --------------------

SWITCH_EXPERTS, SWITCH_TOP_K = 4, 2  # value and output experts per head, and how many a token uses


def _switchhead_geometry(w) -> Geometry:
    heads, _, _ = w["value_router"].shape
    return Geometry(heads=heads, head_dim=w["value_experts"].shape[-1])


SWITCHHEAD_FORM = LayerForm(
    lambda g: SwitchHeadAttention(
        g.heads * g.head_dim, g.heads, SWITCH_EXPERTS, head_dim=g.head_dim, top_k=SWITCH_TOP_K
    ),
    _switchhead_geometry,
)


def _switchhead_cost(phase: str, T: int, g: Geometry) -> dict[str, float]:
    """The whole layer (C = H D, E experts, k chosen per token and side).

    Per token: the query and key projections ``4 C H D``, the two routers ``4 C H E``, the chosen
    value and output experts ``4 H k C D``; attention over H heads with the T x T scores
    materialised (``4 H T^2 D``). Decode: the new token's share, attention over the cached keys
    and values; bytes: the cache, the dense weights and the chosen experts.
    """
    H, D, E, k, F = g.heads, g.head_dim, SWITCH_EXPERTS, SWITCH_TOP_K, costs.F32
    C = H * D
    per_token = 4 * C * H * D + 4 * C * H * E + 4 * H * k * C * D
    if phase == "decode":
        weights = 2 * C * H * D + 2 * H * C * E + 2 * H * k * C * D
        moved = F * (2 * H * T * D + weights + 2 * C + 4 * H * T)
        return {"flops": float(per_token + 4 * H * T * D), "bytes": float(moved)}
    flops = T * per_token + 4 * H * T * T * D
    weights = 2 * C * H * D + 2 * H * C * E + 2 * H * E * C * D
    moved = F * (2 * T * C + weights + 4 * H * T * D + 4 * H * T * T)
    factor = 3 if phase == "train" else 1
    return {"flops": float(factor * flops), "bytes": float(factor * moved)}


register(
    Mechanism(
        name="switchhead",
        title="SwitchHead",
        family="specialised",
        chapter=8,
        summary="mixture-of-experts value and output projections: fewer attention matrices",
        reference="SwitchHead: Accelerating Transformers with MoE Attention, Csordás et al., 2024",
        function=SwitchHeadAttention,
        # The whole layer (projections, routers and experts included) on tokens x of width H D.
        inputs=SWITCHHEAD_FORM.inputs,
        call=lambda x, *, causal=True: SWITCHHEAD_FORM.apply(x, causal=causal),
        trainable=SWITCHHEAD_FORM.trainable,
        static_inputs=SWITCHHEAD_FORM.static_inputs,
        query_inputs=("x",),
        layer=True,
        # The experts change the compute, not the cache: a token's key and its expert-mixed value
        # are computed once and cached, H heads of D each, like multi-head attention's.
        decode="cache",
        decoder=SWITCHHEAD_FORM.decoder(causal=True),
        state_numbers=lambda T, g, **_: T * g.heads * 2 * g.head_dim,
        cost=_switchhead_cost,
    )
)

register(
    Mechanism(
        name="ring",
        title="ring attention",
        family="specialised",
        chapter=8,
        summary="the sequence split across devices; key/value blocks passed around a ring",
        reference="Ring Attention with Blockwise Transformers, Liu, Zaharia and Abbeel, 2023",
        function=ring_attention,
        not_run="exact attention split across processes (torch.distributed): in one process its "
        "numbers are those of exact attention (sdpa), plus the communication that chapter 08 counts "
        "(communication_cost)",
    )
)

register(
    Mechanism(
        name="hybrid",
        title="hybrid (window + linear)",
        family="specialised",
        chapter=8,
        summary="cheap local attention beside a fixed-size global memory: across layers (a stack with a "
        "global layer every few) or across heads (the mixer: half window, half linear heads)",
        reference="Jamba, Lieber et al., 2024; Gemma 2, Gemma Team, 2024; "
        "Simple linear attention language models balance the recall-throughput tradeoff (Based), "
        "Arora et al., 2024",
        function=HybridAttentionStack,
        not_run="a combination of mechanisms measured here: its window heads cost what sliding_window "
        "costs, its linear heads what linear_attention costs (its state: Mechanism.state_bytes)",
        # The layer keeps the window's KV cache for half of the heads and a linear state for the other.
        state_numbers=lambda T, g, window=16, **_: (
            (g.heads // 2) * min(T, window) * (g.head_dim + g.dv)
            + (g.heads - g.heads // 2) * g.head_dim * (g.dv + 1)
        ),
        mixer=lambda d_model, num_heads, *, window=16, chunk_size=64, conv_size=0: AttentionMixer(
            d_model, num_heads, core="hybrid", window=window, chunk_size=chunk_size, conv_size=conv_size
        ),
    )
)
