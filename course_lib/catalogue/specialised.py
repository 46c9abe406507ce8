"""Specialised variants (chapter 08): changes to the attention layer itself, and across devices."""

from __future__ import annotations

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
        title="hybrid stack",
        family="specialised",
        chapter=8,
        summary="a few global attention layers among cheap local or recurrent ones",
        reference="Jamba, Lieber et al., 2024; Gemma 2, Gemma Team, 2024",
        function=HybridAttentionStack,
    )
)
