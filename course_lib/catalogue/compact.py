"""Compact attention (chapter 04): fewer key/value heads, or a compressed latent cache."""

from __future__ import annotations

from ..kv_cache import MultiHeadLatentAttention, gqa_attention
from ..mixers import AttentionMixer
from . import builders, costs
from .core import Geometry, Mechanism, register
from .layers import LayerForm


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

# --- MLA: a layer, run through its functional form (catalogue.layers) -------------------------------


def _mla_dims(g: Geometry) -> tuple[int, int]:
    """DeepSeek-V2's proportions at head size d_h: a latent of d_c = 4 d_h, a RoPE key of d_R = d_h / 2
    (even, at least 2)."""
    return 4 * g.head_dim, max(2, g.head_dim // 4 * 2)


def _mla_layer(g: Geometry) -> MultiHeadLatentAttention:
    latent_dim, rope_dim = _mla_dims(g)
    return MultiHeadLatentAttention(
        g.heads * g.head_dim, g.heads, head_dim=g.head_dim, latent_dim=latent_dim, rope_dim=rope_dim
    )


def _mla_geometry(w) -> Geometry:
    heads = w["query_rope.weight"].shape[0] // w["key_rope.weight"].shape[0]
    return Geometry(heads=heads, head_dim=w["query_up.weight"].shape[0] // heads)


MLA_FORM = LayerForm(_mla_layer, _mla_geometry)


def _mla_cost(phase: str, T: int, g: Geometry) -> dict[str, float]:
    """The whole layer: its projections and the attention over the rebuilt keys and values.

    Prefill (``mode="naive"``): per token the projections ``2 C (H d_h + H d_R + d_c + d_R)``,
    ``2 d_c H (d_h + d_v)`` and ``2 H d_v C`` FLOPs, then attention with keys of ``d_h + d_R``
    (the T x T scores and weights materialised); bytes: x, the weights, the rebuilt keys and
    values, the scores. Decode (absorbed, folded weights): the new token's projections, the
    query in latent space (``2 C H d_c``), attention over the cached ``d_c + d_R`` numbers per
    token and back out (``2 H d_c C``); bytes: the latent cache and the weights it reads.
    """
    H, d_h, d_v = g.heads, g.head_dim, g.head_dim
    C, (d_c, d_R) = H * d_h, _mla_dims(g)
    F = costs.F32
    if phase == "decode":
        flops = 2 * C * (H * d_c + H * d_R + d_c + d_R) + 2 * H * T * (2 * d_c + d_R) + 2 * H * d_c * C
        weights = C * (H * d_c + H * d_R + d_c + d_R) + H * d_c * C
        return {"flops": float(flops), "bytes": float(F * (T * (d_c + d_R) + weights + 2 * C))}
    per_token = 2 * C * (H * d_h + H * d_R + d_c + d_R) + 2 * d_c * H * (d_h + d_v) + 2 * H * d_v * C
    flops = T * per_token + 2 * H * T * T * (d_h + d_R + d_v)
    weights = C * (H * d_h + H * d_R + d_c + d_R) + d_c * H * (d_h + d_v) + H * d_v * C
    moved = F * (2 * T * C + weights + T * H * (2 * (d_h + d_R) + 2 * d_v) + 4 * H * T * T)
    factor = 3 if phase == "train" else 1
    return {"flops": float(factor * flops), "bytes": float(factor * moved)}


register(
    Mechanism(
        name="mla",
        title="MLA",
        family="compact",
        chapter=4,
        summary="keys and values rebuilt from a small cached latent (plus a decoupled RoPE key)",
        reference="DeepSeek-V2, DeepSeek-AI, 2024",
        function=MultiHeadLatentAttention,
        # The whole layer (projections included) on tokens x of width H d_h; keys and values are
        # rebuilt from the latent ("naive", as in training and prefill) or the queries move into
        # latent space ("absorbed", as in decoding): the same numbers.
        inputs=MLA_FORM.inputs,
        call=lambda x, *, form="naive": MLA_FORM.apply(x, mode=form),
        forms=("naive", "absorbed"),
        trainable=MLA_FORM.trainable,
        static_inputs=MLA_FORM.static_inputs,
        query_inputs=("x",),
        layer=True,
        decode="cache",
        # One decoding step from the latent cache, absorbed, with the folded weights computed once.
        decoder=MLA_FORM.decoder(mode="absorbed", prepare=lambda layer: {"folded": layer.absorbed_weights()}),
        # Per token: the latent (d_c) and the shared RoPE key (d_R); DeepSeek-V2's proportions,
        # d_c = 4 d_h and d_R = d_h / 2, unless the options say otherwise.
        state_numbers=lambda T, g, latent_dim=None, rope_dim=None, **_: (
            T * ((latent_dim or _mla_dims(g)[0]) + (rope_dim or _mla_dims(g)[1]))
        ),
        cost=_mla_cost,
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
