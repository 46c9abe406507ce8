"""Linear attention (chapter 06): a kernel feature map instead of the softmax."""

from __future__ import annotations

from ..linear import efficient_attention, favor_plus, linear_attention, linformer_attention
from ..mixers import AttentionMixer
from . import builders, costs
from .core import Gates, Mechanism, register

CHUNK = 64
LINFORMER_K = 64  # projected length k of Linformer


def _linear_state(T, g, features=None, **_):
    """S = sum phi(k) v^T and the normaliser z = sum phi(k), with D' features (D by default)."""
    features = g.head_dim if features is None else features
    return g.heads * features * (g.dv + 1)


def _favor_features(head_dim: int) -> int:
    return favor_plus(head_dim, seed=0).num_features


register(
    Mechanism(
        name="linear_attention",
        title="linear attention",
        family="linear",
        chapter=6,
        summary="phi(Q) (phi(K)^T V): a D x D state instead of a KV cache",
        reference="Transformers are RNNs, Katharopoulos, Vyas, Pappas and Fleuret, 2020",
        function=linear_attention,
        inputs=builders.qkv,
        call=lambda x, **options: linear_attention(x["q"], x["k"], x["v"], causal=True, **options),
        options={"form": "chunk", "chunk_size": CHUNK},
        forms=("parallel", "recurrent", "chunk"),
        decode="state",
        state_numbers=_linear_state,
        cost=lambda phase, T, g: costs.chunked(phase, T, g, chunk=CHUNK),
        gates=Gates(),
        mixer=lambda d_model, num_heads, *, chunk_size=CHUNK, conv_size=0: AttentionMixer(
            d_model, num_heads, core="linear", chunk_size=chunk_size, conv_size=conv_size
        ),
    )
)

register(
    Mechanism(
        name="performer",
        title="Performer (FAVOR+)",
        family="linear",
        chapter=6,
        summary="positive random features whose dot products estimate the softmax kernel",
        reference="Rethinking Attention with Performers, Choromanski et al., 2021",
        function=favor_plus,
        inputs=builders.qkv,
        call=lambda x, **options: linear_attention(
            x["q"], x["k"], x["v"], feature_map=favor_plus(x["q"].shape[-1], seed=0), causal=True, **options
        ),
        options={"form": "chunk", "chunk_size": CHUNK},
        forms=("parallel", "recurrent", "chunk"),
        decode="state",
        state_numbers=lambda T, g, **_: _linear_state(T, g, _favor_features(g.head_dim)),
        cost=lambda phase, T, g: costs.chunked(phase, T, g, chunk=CHUNK),
    )
)

register(
    Mechanism(
        name="efficient_attention",
        title="efficient attention",
        family="linear",
        chapter=6,
        summary="softmax on Q over features and on K over the sequence, then (K^T V) first: not causal",
        reference="Efficient Attention: Attention with Linear Complexities, Shen et al., 2021",
        function=efficient_attention,
        inputs=builders.qkv,
        call=lambda x: efficient_attention(x["q"], x["k"], x["v"]),
        causal=False,
    )
)

register(
    Mechanism(
        name="linformer",
        title="Linformer",
        family="linear",
        chapter=6,
        summary="project keys and values along the sequence to k rows: O(T k), not causal",
        reference="Linformer: Self-Attention with Linear Complexity, Wang et al., 2020",
        function=linformer_attention,
        inputs=lambda T, g, generator: {
            **builders.qkv(T, g, generator),
            "E": builders.normal(generator, LINFORMER_K, T) * LINFORMER_K**-0.5,
            "F": builders.normal(generator, LINFORMER_K, T) * LINFORMER_K**-0.5,
        },
        call=lambda x: linformer_attention(x["q"], x["k"], x["v"], x["E"], x["F"]),
        static_inputs=("E", "F"),
        causal=False,
    )
)
