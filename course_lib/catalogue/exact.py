"""Exact softmax attention: the course's naive reference, PyTorch's fused kernel, FlashAttention."""

from __future__ import annotations

import torch.nn.functional as F

from ..mixers import AttentionMixer
from ..standard import attention, causal_mask
from ..tiling import flash_attention
from . import builders, costs
from .core import Mechanism, register


def _sdpa(x, *, causal: bool = True):
    """SDPA with the course's causal convention (diagonal aligned to the end when T != S)."""
    q, k, v = x["q"], x["k"], x["v"]
    T, S = q.shape[2], k.shape[2]
    if not causal or T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, device=q.device))


def _kv_cache(T, g, **_):
    return T * g.heads * (g.head_dim + g.dv)


def _softmax_mixer(d_model, num_heads, *, num_kv_heads=None, rope=False, conv_size=0, owns_kv=True):
    return AttentionMixer(
        d_model,
        num_heads,
        num_kv_heads=num_kv_heads,
        core="softmax",
        rope=rope,
        conv_size=conv_size,
        owns_kv=owns_kv,
    )


register(
    Mechanism(
        name="attention",
        title="attention (naive)",
        family="exact",
        chapter=1,
        summary="softmax(Q K^T / sqrt(d)) V, materialising the T x S weights",
        reference="Attention Is All You Need, Vaswani et al., 2017",
        function=attention,
        inputs=builders.qkv,
        call=lambda x, *, causal=True: attention(x["q"], x["k"], x["v"], causal=causal),
        decode="cache",
        state_numbers=_kv_cache,
        cost=lambda phase, T, g: costs.softmax(phase, T, g, materialises=True),
        mixer=_softmax_mixer,
        config_fields=("rope",),
    )
)

register(
    Mechanism(
        name="sdpa",
        title="SDPA (PyTorch)",
        family="exact",
        chapter=1,
        summary="PyTorch's fused scaled_dot_product_attention: the reference of every comparison",
        reference="torch.nn.functional.scaled_dot_product_attention (fused FlashAttention-2 style kernels)",
        function=F.scaled_dot_product_attention,
        inputs=builders.qkv,
        call=_sdpa,
        decode="cache",
        state_numbers=_kv_cache,
        cost=lambda phase, T, g: costs.softmax(phase, T, g, materialises=False),
    )
)

register(
    Mechanism(
        name="flash_attention",
        title="FlashAttention (course)",
        family="hardware-efficient",
        chapter=3,
        summary="the same softmax, tile by tile with an online softmax: O(T) extra memory",
        reference="FlashAttention, Dao, Fu, Ermon, Rudra and Ré, 2022; FlashAttention-2, Dao, 2023",
        function=flash_attention,
        inputs=builders.qkv,
        call=lambda x, *, causal=True, **options: flash_attention(
            x["q"], x["k"], x["v"], causal=causal, **options
        ),
        options={"block_q": 128, "block_k": 128},
        decode="cache",
        state_numbers=_kv_cache,
        cost=lambda phase, T, g: costs.softmax(phase, T, g, materialises=False),
    )
)
