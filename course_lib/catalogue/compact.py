"""Compact attention (chapter 04): fewer key/value heads, or a compressed latent cache."""

from __future__ import annotations

from ..kv_cache import MultiHeadLatentAttention, gqa_attention
from ..mixers import AttentionMixer
from . import builders, costs
from .core import Mechanism, register


def _gqa(kv_heads):
    """Declaration pieces of grouped-query attention with ``kv_heads(geometry)`` key/value heads."""

    def inputs(T, g, generator):
        return builders.qkv(T, g, generator, kv_heads=kv_heads(g))

    def call(x, *, causal=True):
        return gqa_attention(x["q"], x["k"], x["v"], causal=causal)

    def state_numbers(T, g, **_):
        return T * kv_heads(g) * (g.head_dim + g.dv)

    def cost(phase, T, g):
        # The compute of attention is unchanged; a decoding step reads H / H_kv times fewer bytes.
        c = costs.softmax(phase, T, g, materialises=True)
        if phase == "decode":
            c["bytes"] -= costs.F32 * 2 * T * g.head_dim * (g.heads - kv_heads(g))
        return c

    return {"inputs": inputs, "call": call, "state_numbers": state_numbers, "cost": cost}


register(
    Mechanism(
        name="mqa",
        title="MQA",
        family="compact",
        chapter=4,
        summary="all query heads share one key/value head: an H-fold smaller KV cache",
        reference="Fast Transformer Decoding: One Write-Head is All You Need, Shazeer, 2019",
        function=gqa_attention,
        decode="cache",
        mixer=lambda d_model, num_heads, *, rope=False, conv_size=0, owns_kv=True: AttentionMixer(
            d_model, num_heads, num_kv_heads=1, rope=rope, conv_size=conv_size, owns_kv=owns_kv
        ),
        config_fields=("rope",),
        **_gqa(lambda g: 1),
    )
)

register(
    Mechanism(
        name="gqa",
        title="GQA",
        family="compact",
        chapter=4,
        summary="groups of query heads share a key/value head: H / H_kv times smaller KV cache",
        reference="GQA: Training Generalized Multi-Query Transformer Models, Ainslie et al., 2023",
        function=gqa_attention,
        decode="cache",
        mixer=lambda d_model, num_heads, *, num_kv_heads=None, rope=False, conv_size=0, owns_kv=True: (
            AttentionMixer(
                d_model,
                num_heads,
                num_kv_heads=num_kv_heads or max(num_heads // 2, 1),
                rope=rope,
                conv_size=conv_size,
                owns_kv=owns_kv,
            )
        ),
        config_fields=("num_kv_heads", "rope"),
        **_gqa(lambda g: g.kv_heads),
    )
)

register(
    Mechanism(
        name="mla",
        title="MLA",
        family="compact",
        chapter=4,
        summary="keys and values rebuilt from a small cached latent (plus a decoupled RoPE key)",
        reference="DeepSeek-V2, DeepSeek-AI, 2024",
        function=MultiHeadLatentAttention,
        decode="cache",
        # Per token: the latent (d_c) and the shared RoPE key (d_R); DeepSeek-V2's proportions,
        # d_c = 4 d_h and d_R = d_h / 2, unless the options say otherwise.
        state_numbers=lambda T, g, latent_dim=None, rope_dim=None, **_: (
            T * ((latent_dim or 4 * g.head_dim) + (rope_dim or g.head_dim // 2))
        ),
        mixer=lambda d_model, num_heads, *, latent_dim=16, rope_dim=8, mla_mode="absorbed": (
            MultiHeadLatentAttention(
                d_model,
                num_heads,
                head_dim=d_model // num_heads,
                latent_dim=latent_dim,
                rope_dim=rope_dim,
                mode=mla_mode,
            )
        ),
        config_fields=("latent_dim", "rope_dim", "mla_mode"),
    )
)
