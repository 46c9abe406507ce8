"""Sparse attention (chapter 05): each query sees a subset of the keys."""

from __future__ import annotations

import torch

from ..mixers import AttentionMixer
from ..sparse import (
    MixtureOfBlockAttention,
    NativeSparseAttention,
    block_sparse_attention,
    lsh_attention,
    moba_attention,
    nsa_attention,
    sliding_window_attention,
    topk_attention,
)
from . import builders, costs
from .core import Mechanism, register

WINDOW = 256  # keys per query of the sliding window (the query included) in the comparison
BLOCK = 64  # block size of the block-sparse layout and of LSH's chunks


def _band_layout(T: int, block: int, device) -> torch.Tensor:
    """The diagonal block and the one before it, causal: a block-wise local band."""
    blocks = -(-T // block)
    rows = torch.arange(blocks, device=device)
    offset = rows[:, None] - rows[None, :]
    return (offset >= 0) & (offset <= 1)


register(
    Mechanism(
        name="sliding_window",
        title="sliding window",
        family="sparse",
        chapter=5,
        summary="each query sees the last w keys: O(T w) time, a KV cache of w tokens",
        reference="Longformer, Beltagy, Peters and Cohan, 2020; Mistral 7B, Jiang et al., 2023",
        function=sliding_window_attention,
        inputs=builders.qkv,
        call=lambda x, *, window, causal=True: sliding_window_attention(
            x["q"], x["k"], x["v"], window, causal=causal
        ),
        options={"window": WINDOW},
        decode="cache",
        cache_window=WINDOW,
        state_numbers=lambda T, g, window=WINDOW, **_: min(T, window) * g.heads * (g.head_dim + g.dv),
        cost=lambda phase, T, g: costs.window(phase, T, g, window=WINDOW),
        mixer=lambda d_model, num_heads, *, window=16, rope=False, conv_size=0, owns_kv=True: AttentionMixer(
            d_model, num_heads, core="window", window=window, rope=rope, conv_size=conv_size, owns_kv=owns_kv
        ),
        config_fields=("rope",),
    )
)

register(
    Mechanism(
        name="block_sparse",
        title="block-sparse (band)",
        family="sparse",
        chapter=5,
        summary="only the active tiles of a block layout are computed (here a causal band of 2 blocks)",
        reference="Generating Long Sequences with Sparse Transformers, Child et al., 2019",
        function=block_sparse_attention,
        inputs=builders.qkv,
        call=lambda x, *, block_size, causal=True: block_sparse_attention(
            x["q"],
            x["k"],
            x["v"],
            _band_layout(x["q"].shape[2], block_size, x["q"].device),
            block_size,
            causal=causal,
        ),
        options={"block_size": BLOCK},
        cost=lambda phase, T, g: costs.window(phase, T, g, window=BLOCK),
    )
)

register(
    Mechanism(
        name="topk",
        title="top-k",
        family="sparse",
        chapter=5,
        summary="each query keeps its k best keys; choosing them still needs every score",
        reference="Memory-efficient Transformers via Top-k Attention, Gupta et al., 2021",
        function=topk_attention,
        inputs=builders.qkv,
        call=lambda x, *, top_k, causal=True: topk_attention(x["q"], x["k"], x["v"], top_k, causal=causal),
        options={"top_k": 32},
        decode="cache",
        state_numbers=lambda T, g, **_: T * g.heads * (g.head_dim + g.dv),
        cost=lambda phase, T, g: costs.softmax(phase, T, g, materialises=True),
    )
)

register(
    Mechanism(
        name="lsh",
        title="LSH (Reformer)",
        family="sparse",
        chapter=5,
        summary="hash shared queries/keys into buckets; attend within a bucket's chunk and the one before",
        # Its buckets and chunks are drawn over the whole sequence, so a later token can move an
        # earlier one into another chunk: causal masking, but not a mixer a decoder can run step by step.
        causal=False,
        reference="Reformer: The Efficient Transformer, Kitaev, Kaiser and Levskaya, 2020",
        function=lsh_attention,
        inputs=lambda T, g, generator: {
            key: value for key, value in builders.qkv(T, g, generator).items() if key in ("q", "v")
        },
        call=lambda x, *, num_buckets, chunk_size, causal=True: lsh_attention(
            x["q"], x["v"], num_buckets=num_buckets, chunk_size=chunk_size, causal=causal, seed=0
        ),
        options={"num_buckets": 8, "chunk_size": BLOCK},
        trainable=("q", "v"),
    )
)


# --- trainable sparse attention of 2025 -------------------------------------------------------------


def _gqa_inputs(T, g, generator):
    return builders.qkv(T, g, generator, kv_heads=g.kv_heads)


def _nsa_mixer(
    d_model,
    num_heads,
    *,
    num_kv_heads=None,
    block_size=16,
    num_selected=4,
    window=32,
    compress_block=None,
    compress_stride=None,
    num_initial_blocks=1,
    num_local_blocks=2,
    conv_size=0,
):
    """NSA's layer sized for the tiny models of the course (contexts of hundreds of tokens); the
    paper's sizes are blocks of 64, 16 selected blocks and a window of 512. Compressed blocks default
    to the selection blocks, every half block (notebook 05 trains with smaller ones)."""
    return NativeSparseAttention(
        d_model,
        num_heads,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        num_selected=num_selected,
        window=window,
        compress_block=block_size if compress_block is None else compress_block,
        compress_stride=max(block_size // 2, 1) if compress_stride is None else compress_stride,
        num_initial_blocks=num_initial_blocks,
        num_local_blocks=num_local_blocks,
        conv_size=conv_size,
    )


def _moba_mixer(d_model, num_heads, *, num_kv_heads=None, block_size=16, top_k=3, conv_size=0):
    """MoBA's layer sized for the tiny models of the course."""
    return MixtureOfBlockAttention(
        d_model, num_heads, num_kv_heads=num_kv_heads, block_size=block_size, top_k=top_k, conv_size=conv_size
    )


def _gqa_cache(T, g, **_):
    return T * g.kv_heads * (g.head_dim + g.dv)


register(
    Mechanism(
        name="nsa",
        title="NSA",
        family="sparse",
        chapter=5,
        summary="compressed blocks, the top-n blocks they point to, and a window, mixed by learned gates",
        reference="Native Sparse Attention, Yuan et al. (DeepSeek), 2025",
        function=nsa_attention,
        inputs=lambda T, g, generator: {
            **_gqa_inputs(T, g, generator),
            "gates": torch.sigmoid(builders.normal(generator, g.batch, g.heads, T, 3)),
        },
        call=lambda x, **options: nsa_attention(x["q"], x["k"], x["v"], x["gates"], **options),
        options={
            "block_size": BLOCK,
            "num_selected": 4,
            "window": 128,
            "compress_block": 32,
            "compress_stride": 16,
        },
        trainable=("q", "k", "v", "gates"),
        query_inputs=("q", "gates"),
        decode="cache",
        state_numbers=_gqa_cache,
        mixer=_nsa_mixer,
    )
)

register(
    Mechanism(
        name="moba",
        title="MoBA",
        family="sparse",
        chapter=5,
        summary="each query routes to its top-k key blocks by their mean key, its own block always included",
        reference="MoBA: Mixture of Block Attention for Long-Context LLMs, Lu et al. (Moonshot AI), 2025",
        function=moba_attention,
        inputs=_gqa_inputs,
        call=lambda x, **options: moba_attention(x["q"], x["k"], x["v"], **options),
        options={"block_size": BLOCK, "top_k": 3},
        decode="cache",
        state_numbers=_gqa_cache,
        mixer=_moba_mixer,
    )
)
