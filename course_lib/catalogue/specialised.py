"""Specialised variants (chapter 08): changes to the attention layer itself, and across devices."""

from __future__ import annotations

from ..mixers import AttentionMixer
from ..specialized import DifferentialAttention, HybridAttentionStack, SwitchHeadAttention, ring_attention
from .core import Mechanism, register

register(
    Mechanism(
        name="differential",
        title="differential attention",
        family="specialised",
        chapter=8,
        summary="the difference of two softmax maps cancels common-mode attention noise",
        reference="Differential Transformer, Ye et al., 2024",
        function=DifferentialAttention,
    )
)

register(
    Mechanism(
        name="switchhead",
        title="SwitchHead",
        family="specialised",
        chapter=8,
        summary="mixture-of-experts value and output projections: fewer attention matrices",
        reference="SwitchHead: Accelerating Transformers with MoE Attention, Csordás et al., 2024",
        function=SwitchHeadAttention,
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
