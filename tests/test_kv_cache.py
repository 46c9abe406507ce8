"""Tests for course_lib.kv_cache: caches, GQA/MQA, MLA, model configs, paged cache, quantisation.

Every result is compared with an independent reference written here (float64 dense attention,
SDPA with explicit masks, brute-force bookkeeping) or with another form of the same mechanism.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from course_lib.kv_cache import (
    MODEL_CONFIGS,
    GroupedQueryAttention,
    KVCache,
    LatentKVCache,
    MultiHeadLatentAttention,
    MultiQueryAttention,
    PagedKVCache,
    cached_layers,
    chunked_prefill,
    gqa_attention,
    kv_cache_bytes,
    kv_numbers_per_token,
    max_concurrent_requests,
    quantize,
    quantize_kv,
    quantized_attention_error,
    repeat_kv,
    simulate_fragmentation,
)

# --- independent references ----------------------------------------------------------------------


def end_causal(T, S):
    """allowed[i, j] = key j is at most S - T + i, built by a plain loop."""
    allowed = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            allowed[i, j] = j <= S - T + i
    return allowed


def reference_attention(q, k, v, allowed=None, scale=None):
    """Float64 grouped attention: query head h reads kv head h // group; fully masked rows are 0."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    group = H // k.shape[1]
    index = torch.arange(H) // group
    k, v = k[:, index], v[:, index]
    scores = q @ k.transpose(-2, -1) * (D**-0.5 if scale is None else scale)
    if allowed is not None:
        allowed = allowed.expand(B, H, T, k.shape[2])
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def rope_reference(x, positions, base=10000.0):
    """RoPE by complex multiplication of (x[2i], x[2i+1]) by exp(i * t * base^(-2i/D))."""
    D = x.shape[-1]
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())
    frequencies = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rotation = torch.polar(
        torch.ones(len(positions), D // 2, dtype=torch.float64), positions[:, None] * frequencies
    )
    return torch.view_as_real(pairs * rotation).reshape(x.shape)


def mla_reference(layer, x):
    """MLA written from the DeepSeek-V2 equations with explicit per-head loops, float64."""
    x = x.double()
    B, T, _ = x.shape
    H, d_h, d_R, d_v = layer.num_heads, layer.head_dim, layer.rope_dim, layer.value_dim
    W = {name: p.detach().double() for name, p in layer.named_parameters()}
    positions = torch.arange(T, dtype=torch.float64)
    query_input = x if layer.query_latent_dim is None else x @ W["query_down.weight"].T
    latent = x @ W["kv_down.weight"].T
    rope_key = rope_reference(x @ W["key_rope.weight"].T, positions)
    allowed = end_causal(T, T)
    heads = []
    for h in range(H):
        q_c = query_input @ W["query_up.weight"][h * d_h : (h + 1) * d_h].T
        q_r = rope_reference(query_input @ W["query_rope.weight"][h * d_R : (h + 1) * d_R].T, positions)
        k_c = latent @ W["key_up.weight"][h * d_h : (h + 1) * d_h].T
        v_h = latent @ W["value_up.weight"][h * d_v : (h + 1) * d_v].T
        scores = (q_c @ k_c.transpose(-2, -1) + q_r @ rope_key.transpose(-2, -1)) / math.sqrt(d_h + d_R)
        heads.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v_h)
    return torch.cat(heads, dim=-1) @ W["out_proj.weight"].T


def gqa_layer_reference(layer, x):
    """The GQA layer from its weights with SDPA (T == S, so is_causal is the right mask)."""
    B, T, _ = x.shape
    H, H_kv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = F.linear(x, layer.q_proj.weight, layer.q_proj.bias).view(B, T, H, D).transpose(1, 2)
    k = F.linear(x, layer.k_proj.weight, layer.k_proj.bias).view(B, T, H_kv, D).transpose(1, 2)
    v = F.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(B, T, H_kv, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.linear(out.transpose(1, 2).reshape(B, T, H * D), layer.out_proj.weight, layer.out_proj.bias)


# --- gqa_attention -----------------------------------------------------------------------------

GQA_SHAPES = [
    # (B, H_q, H_kv, T, S, D)
    pytest.param(2, 4, 2, 5, 5, 8, id="B2-Hq4-Hkv2-T5-S5-D8"),
    pytest.param(1, 6, 1, 1, 7, 5, id="mqa-T1-S7-D5"),
    pytest.param(2, 3, 3, 4, 9, 3, id="mha-T4-S9-D3"),
    pytest.param(1, 8, 2, 3, 11, 7, id="B1-Hq8-Hkv2-T3-S11-odd"),
]


@pytest.mark.parametrize("B, H_q, H_kv, T, S, D", GQA_SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_attention_matches_sdpa_enable_gqa(B, H_q, H_kv, T, S, D, causal):
    q, k, v = torch.randn(B, H_q, T, D), torch.randn(B, H_kv, S, D), torch.randn(B, H_kv, S, D + 1)
    mask = end_causal(T, S) if causal else None  # explicit: SDPA's is_causal aligns to the start
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(gqa_attention(q, k, v, causal=causal), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B, H_q, H_kv, T, S, D", GQA_SHAPES)
def test_gqa_attention_equals_mha_on_repeated_kv(B, H_q, H_kv, T, S, D):
    q, k, v = torch.randn(B, H_q, T, D), torch.randn(B, H_kv, S, D), torch.randn(B, H_kv, S, D)
    group = H_q // H_kv
    repeated = F.scaled_dot_product_attention(q, repeat_kv(k, group), repeat_kv(v, group))
    torch.testing.assert_close(gqa_attention(q, k, v), repeated, atol=1e-5, rtol=1e-5)


def test_repeat_kv_puts_head_h_in_group_h_over_group():
    x = torch.randn(2, 3, 4, 5)
    repeated = repeat_kv(x, 2)
    for h in range(6):
        assert torch.equal(repeated[:, h], x[:, h // 2])


def test_gqa_attention_mask_with_fully_masked_rows_gives_zeros():
    q, k, v = torch.randn(2, 4, 5, 6), torch.randn(2, 2, 7, 6), torch.randn(2, 2, 7, 6)
    mask = torch.rand(2, 4, 5, 7) > 0.5
    mask[0, 1, 2] = False
    mask[1, :, 4] = False
    out = gqa_attention(q, k, v, mask)
    assert not out.isnan().any()
    assert torch.equal(out[0, 1, 2], torch.zeros(6)) and torch.equal(out[1, :, 4], torch.zeros(4, 6))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_gqa_attention_causal_with_more_queries_than_keys_masks_first_rows():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out = gqa_attention(q, k, v, causal=True)
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, end_causal(5, 3)), atol=1e-6, rtol=1e-6
    )
    assert torch.equal(out[:, :, :2], torch.zeros(1, 2, 2, 4))


def test_gqa_attention_extreme_logits_stay_finite():
    q, k, v = torch.randn(1, 2, 3, 4) * 1e3, torch.randn(1, 1, 6, 4) * 1e3, torch.randn(1, 1, 6, 4)
    out = gqa_attention(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, end_causal(3, 6)), atol=1e-4, rtol=1e-4
    )


def test_gqa_attention_custom_scale():
    q, k, v = torch.randn(1, 4, 3, 5), torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5)
    torch.testing.assert_close(
        gqa_attention(q, k, v, scale=0.3).double(),
        reference_attention(q, k, v, scale=0.3),
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gqa_attention_half_precision(dtype):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = gqa_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, end_causal(5, 9)), atol=3e-2, rtol=3e-2
    )


def test_gqa_attention_gradcheck():
    q = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 4, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 4, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False  # a fully masked row must not make gradients NaN
    assert torch.autograd.gradcheck(lambda q, k, v: gqa_attention(q, k, v, mask, causal=True), (q, k, v))


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    T=st.integers(1, 6),
    S=st.integers(1, 6),
    D=st.integers(1, 6),
    causal=st.booleans(),
)
def test_gqa_attention_property_matches_reference(batch, kv_heads, group, T, S, D, causal):
    generator = torch.Generator().manual_seed(batch * 1000 + T * 100 + S * 10 + D)
    q = torch.randn(batch, kv_heads * group, T, D, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, S, D, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, S, D, generator=generator, dtype=torch.float64)
    allowed = end_causal(T, S) if causal else None
    torch.testing.assert_close(gqa_attention(q, k, v, causal=causal), reference_attention(q, k, v, allowed))


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: gqa_attention(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)),
         ValueError, "num_kv_heads"),
        (lambda: gqa_attention(torch.randn(1, 2, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                               torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: gqa_attention(torch.randn(1, 2, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                               scale=float("inf")), ValueError, "scale"),
        (lambda: gqa_attention("q", torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)), TypeError, "q"),
        (lambda: gqa_attention(torch.randn(1, 2, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                               causal=1), TypeError, "causal"),
        (lambda: repeat_kv(torch.randn(1, 2, 3, 4), 0), ValueError, "group"),
        (lambda: repeat_kv(torch.randn(2, 3, 4), 2), ValueError, "x"),
        (lambda: GroupedQueryAttention(16, 4, 3), ValueError, "num_kv_heads"),
        (lambda: GroupedQueryAttention(10, 4, 2), ValueError, "num_heads"),
        (lambda: MultiQueryAttention(0, 2), ValueError, "d_model"),
        (lambda: GroupedQueryAttention(8, 2, 1)(torch.randn(1, 3, 7)), ValueError, "x"),
    ],
    ids=["heads-not-multiple", "mask-shape", "scale-inf", "q-not-tensor", "causal-not-bool",
         "repeat-group-0", "repeat-x-3d", "layer-heads", "layer-d-model", "mqa-d-model", "layer-x-width"],
)  # fmt: skip
def test_gqa_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- KVCache and the GQA/MQA layers ------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_gqa_layer_full_forward_matches_sdpa_from_weights(num_kv_heads):
    layer = GroupedQueryAttention(16, 4, num_kv_heads, bias=True)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(layer(x), gqa_layer_reference(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("prefill", [1, 4], ids=["prefill1", "prefill4"])
def test_prefill_then_decode_equals_full_causal_forward(num_kv_heads, prefill):
    torch.manual_seed(1)
    layers = [GroupedQueryAttention(12, 4, num_kv_heads, head_dim=5).double() for _ in range(2)]
    x = torch.randn(2, 9, 12, dtype=torch.float64)

    def stack(x, cache=None):
        for index, layer in enumerate(layers):
            x = x + layer(x, cache=cache, layer_index=index)
        return x

    full = stack(x)
    cache = KVCache(2, 2, num_kv_heads, 9, 5, dtype=torch.float64)
    outputs = [stack(x[:, :prefill], cache)] + [stack(x[:, t : t + 1], cache) for t in range(prefill, 9)]
    torch.testing.assert_close(torch.cat(outputs, dim=1), full)
    assert cache.length(0) == cache.length(1) == 9


def test_mqa_layer_is_gqa_with_one_kv_head():
    layer = MultiQueryAttention(8, 4)
    assert layer.num_kv_heads == 1 and layer.k_proj.out_features == layer.head_dim == 2
    assert layer.kv_numbers_per_token() == 2 * 1 * 2


def test_kv_cache_append_get_reset():
    cache = KVCache(2, 1, 2, 6, 3, value_dim=4)
    k1, v1 = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 4)
    k2, v2 = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 4)
    cache.append(1, k1, v1)
    keys, values = cache.append(1, k2, v2)
    assert torch.equal(keys, torch.cat([k1, k2], dim=2)) and torch.equal(values, torch.cat([v1, v2], dim=2))
    assert cache.length(0) == 0 and cache.length(1) == 5
    assert keys.data_ptr() == cache.keys[1].data_ptr()  # a view into the preallocated storage
    assert cache.nbytes == 4 * (2 * 1 * 2 * 6 * 3 + 2 * 1 * 2 * 6 * 4)
    cache.reset()
    assert cache.length(1) == 0 and cache.get(1)[0].shape == (1, 2, 0, 3)


def test_kv_cache_truncate_rolls_back_and_the_next_append_overwrites():
    layer = GroupedQueryAttention(12, 6, 2).double()
    x = torch.randn(1, 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    other = torch.randn(1, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cache = KVCache(1, 1, 2, 9, 2, dtype=torch.float64)
    layer(x[:, :6], cache=cache)
    layer(other, cache=cache)  # three tokens that are then rolled back (like rejected drafts)
    cache.truncate(6)
    assert cache.length(0) == 6
    tail = layer(x[:, 6:], cache=cache)
    torch.testing.assert_close(tail, layer(x)[:, 6:])
    with pytest.raises(ValueError, match="^length"):
        cache.truncate(10)  # more than is stored
    with pytest.raises(ValueError, match="^length"):
        cache.truncate(-1)


def test_latent_cache_truncate_rolls_back():
    layer = MultiHeadLatentAttention(12, 3, head_dim=4, latent_dim=5, rope_dim=2).double()
    x = torch.randn(1, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cache = layer.make_cache(2, 1, 7, dtype=torch.float64)
    for layer_index in (0, 1):
        layer(x[:, :5], cache=cache, layer_index=layer_index)
    cache.truncate(3)
    assert cache.length(0) == cache.length(1) == 3
    torch.testing.assert_close(layer(x[:, 3:], cache=cache), layer(x)[:, 3:])
    with pytest.raises(ValueError, match="^length"):
        cache.truncate(4)  # layer 1 holds only 3 now


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10], ids=["c1", "c3-ragged", "c4", "c10-whole"])
def test_chunked_prefill_equals_one_shot_gqa(chunk_size):
    layer = GroupedQueryAttention(12, 6, 2).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    cache = KVCache(1, 2, 2, 10, 2, dtype=torch.float64)
    torch.testing.assert_close(chunked_prefill(layer, x, cache, chunk_size=chunk_size), layer(x))
    assert cache.length() == 10


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_chunked_prefill_equals_one_shot_mla(mode):
    layer = MultiHeadLatentAttention(12, 3, head_dim=4, latent_dim=5, rope_dim=2).double()
    x = torch.randn(1, 7, 12, dtype=torch.float64)
    cache = layer.make_cache(1, 1, 7, dtype=torch.float64)
    chunked = torch.cat([layer(chunk, cache=cache, mode=mode) for chunk in x.split(3, dim=1)], dim=1)
    torch.testing.assert_close(chunked, layer(x))


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: KVCache(0, 1, 1, 4, 2), ValueError, "num_layers"),
        (lambda: KVCache(1, 1, 1, 0, 2), ValueError, "max_len"),
        (lambda: KVCache(1, 1, 1, 4, 2, dtype=torch.int64), TypeError, "dtype"),
        (lambda: KVCache(1, 1, 2, 4, 3).append(0, torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3)),
         ValueError, "k"),
        (lambda: KVCache(1, 1, 1, 4, 3).append(0, torch.randn(1, 1, 2, 3), torch.randn(1, 1, 3, 3)),
         ValueError, "v"),
        (lambda: KVCache(1, 1, 1, 4, 3).append(0, torch.randn(1, 1, 5, 3), torch.randn(1, 1, 5, 3)),
         ValueError, "max_len"),
        (lambda: KVCache(2, 1, 1, 4, 3).append(2, torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3)),
         ValueError, "layer_index"),
        (lambda: chunked_prefill(GroupedQueryAttention(4, 2, 1), torch.randn(1, 3, 4), KVCache(1, 1, 1, 3, 2),
                                 chunk_size=0), ValueError, "chunk_size"),
        (lambda: chunked_prefill(GroupedQueryAttention(4, 2, 1), torch.randn(1, 3, 4), None, chunk_size=2),
         ValueError, "cache"),
    ],
    ids=["layers-0", "max-len-0", "int-dtype", "k-heads", "v-length", "overflow", "layer-index",
         "chunk-0", "no-cache"],
)  # fmt: skip
def test_kv_cache_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- multi-head latent attention -----------------------------------------------------------------

MLA_SETTINGS = [
    pytest.param(dict(query_latent_dim=None, value_dim=None), id="no-query-compression"),
    pytest.param(dict(query_latent_dim=6, value_dim=None), id="query-compression"),
    pytest.param(dict(query_latent_dim=5, value_dim=3), id="query-compression-value-dim-3"),
]


def make_mla(**kwargs):
    return MultiHeadLatentAttention(16, 3, head_dim=4, latent_dim=7, rope_dim=4, **kwargs).double()


@pytest.mark.parametrize("settings_", MLA_SETTINGS)
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_mla_matches_equation_reference(settings_, mode):
    layer = make_mla(**settings_)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x, mode=mode), mla_reference(layer, x))


@pytest.mark.parametrize("settings_", MLA_SETTINGS)
def test_mla_absorbed_equals_naive(settings_):
    layer = make_mla(**settings_)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x, mode="absorbed"), layer(x, mode="naive"))


@pytest.mark.parametrize("settings_", MLA_SETTINGS)
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_mla_cached_decode_equals_full_forward(settings_, mode):
    layer = make_mla(**settings_)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    cache = layer.make_cache(1, 2, 8, dtype=torch.float64)
    outputs = [layer(x[:, :3], cache=cache, mode=mode)]
    outputs += [layer(x[:, t : t + 1], cache=cache, mode=mode) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(outputs, dim=1), layer(x))


def test_mla_cache_holds_latent_plus_rope_key_per_token():
    layer = make_mla()
    cache = layer.make_cache(2, 1, 5, dtype=torch.float64)
    layer(torch.randn(1, 5, 16, dtype=torch.float64), cache=cache, layer_index=1)
    assert cache.latent.shape == (2, 1, 5, 7) and cache.rope_keys.shape == (2, 1, 5, 4)
    assert cache.numbers_per_token == layer.kv_numbers_per_token() == 7 + 4
    assert cache.length(1) == 5 and cache.length(0) == 0
    mha_numbers = 2 * layer.num_heads * layer.head_dim
    assert mha_numbers == 24 > 11


def test_mla_absorbed_weights_fold_the_up_projections():
    layer = make_mla(query_latent_dim=6)
    query_weight, output_weight = layer.absorbed_weights()
    assert query_weight.shape == (3, 7, 6) and output_weight.shape == (16, 3, 7)
    query_input, latent = torch.randn(6, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    # Head 1: (W_UQ c_Q) . (W_UK c) == (W_UK^T W_UQ c_Q) . c
    query = layer.query_up.weight[4:8] @ query_input
    key = layer.key_up.weight[4:8] @ latent
    torch.testing.assert_close(query @ key, (query_weight[1] @ query_input) @ latent)


def test_mla_gradcheck_absorbed():
    layer = MultiHeadLatentAttention(4, 2, head_dim=2, latent_dim=3, rope_dim=2, query_latent_dim=3).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, mode="absorbed"), (x,))


def test_mla_folded_weights_computed_once_give_the_same_numbers():
    # A deployment folds W_UK and W_UV once; passing them in must not change the output, with or
    # without a cache, with or without query compression.
    for query_latent_dim in (None, 6):
        layer = make_mla(query_latent_dim=query_latent_dim)
        x = torch.randn(2, 7, 16, dtype=torch.float64)
        folded = layer.absorbed_weights()
        torch.testing.assert_close(layer(x, mode="absorbed", folded=folded), mla_reference(layer, x))
        cache = layer.make_cache(1, 2, 7, dtype=torch.float64)
        steps = [layer(x[:, t : t + 1], cache=cache, mode="absorbed", folded=folded) for t in range(7)]
        torch.testing.assert_close(torch.cat(steps, dim=1), mla_reference(layer, x))


def test_mla_folded_weights_bad_input():
    layer = make_mla()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    query_weight, output_weight = layer.absorbed_weights()
    with pytest.raises(ValueError, match="^folded.*absorbed"):
        layer(x, mode="naive", folded=(query_weight, output_weight))
    with pytest.raises(TypeError, match="^folded"):
        layer(x, mode="absorbed", folded=[query_weight, output_weight])
    with pytest.raises(ValueError, match="^folded"):
        layer(x, mode="absorbed", folded=(query_weight[:, :-1], output_weight))
    with pytest.raises(ValueError, match="^folded"):
        layer(x, mode="absorbed", folded=(query_weight, output_weight[:-1]))


def test_latent_cache_get_returns_what_was_stored():
    layer = make_mla()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    cache = layer.make_cache(2, 2, 8, dtype=torch.float64)
    layer(x, cache=cache, layer_index=1)
    latent, rope_keys = cache.get(1)
    # independent: the latent is W_DKV x, the stored RoPE key is RoPE(W_KR x) at positions 0..4
    torch.testing.assert_close(latent, x @ layer.kv_down.weight.detach().T)
    expected_rope = rope_reference(x @ layer.key_rope.weight.detach().T, torch.arange(5, dtype=torch.float64))
    torch.testing.assert_close(rope_keys, expected_rope)
    assert cache.get(0)[0].shape == (2, 0, 7) and cache.get()[1].shape == (2, 0, 4)
    cache.truncate(0)
    assert cache.get(1)[0].shape == (2, 0, 7)
    with pytest.raises(ValueError, match="^layer_index"):
        cache.get(2)


def test_mla_float16_cache_is_close_to_float32():
    layer = make_mla().float()
    x = torch.randn(1, 6, 16)
    cache = layer.make_cache(1, 1, 6, dtype=torch.float16)
    outputs = [layer(x[:, t : t + 1], cache=cache, mode="absorbed") for t in range(6)]
    torch.testing.assert_close(torch.cat(outputs, dim=1), layer(x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: MultiHeadLatentAttention(8, 2, head_dim=2, latent_dim=3, rope_dim=3), ValueError,
         "rope_dim"),
        (lambda: MultiHeadLatentAttention(8, 2, head_dim=2, latent_dim=0, rope_dim=2), ValueError,
         "latent_dim"),
        (lambda: MultiHeadLatentAttention(8, 2, head_dim=2, latent_dim=3, rope_dim=2)(torch.randn(1, 2, 8),
                                                                                      mode="fast"),
         ValueError, "mode"),
        (lambda: MultiHeadLatentAttention(8, 2, head_dim=2, latent_dim=3, rope_dim=2)(torch.randn(1, 2, 5)),
         ValueError, "x"),
        (lambda: LatentKVCache(1, 1, 4, 3, 2).append(0, torch.randn(1, 2, 4), torch.randn(1, 2, 2)),
         ValueError, "latent"),
        (lambda: LatentKVCache(1, 1, 4, 3, 2).append(0, torch.randn(1, 2, 3), torch.randn(1, 1, 2)),
         ValueError, "rope_key"),
        (lambda: LatentKVCache(1, 1, 1, 3, 2).append(0, torch.randn(1, 2, 3), torch.randn(1, 2, 2)),
         ValueError, "max_len"),
    ],
    ids=["rope-odd", "latent-0", "mode", "x-width", "latent-shape", "rope-key-shape", "overflow"],
)  # fmt: skip
def test_mla_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- model configurations ----------------------------------------------------------------------


def test_kv_cache_bytes_llama_2_70b_by_hand():
    # 80 layers x 8 kv heads x 128 dims x (K and V) x 2 bytes = 327,680 bytes per token.
    assert kv_cache_bytes("Llama-2-70B", 1) == 80 * 8 * 128 * 2 * 2 == 327_680
    # 128K tokens: 40 GiB, more than any consumer GPU's memory (24 GB) before counting weights.
    assert kv_cache_bytes("Llama-2-70B", 128 * 1024) == 40 * 2**30


def test_kv_cache_bytes_deepseek_v2_by_hand():
    # MLA caches d_c + d_R = 512 + 64 numbers per token and layer, 60 layers, 2 bytes each.
    assert kv_cache_bytes(MODEL_CONFIGS["DeepSeek-V2"], 1000, 3) == 60 * (512 + 64) * 2 * 1000 * 3


def test_kv_cache_bytes_llama_2_7b_scales_with_batch_dtype():
    per_token = 32 * 32 * 128 * 2 * 2  # MHA: 0.5 MiB per token
    assert kv_cache_bytes("Llama-2-7B", 10, batch_size=4) == per_token * 10 * 4
    assert kv_cache_bytes("Llama-2-7B", 10, dtype=torch.float32) == 2 * per_token * 10
    assert kv_cache_bytes("Llama-2-7B", 0) == 0


def test_kv_cache_bytes_mistral_sliding_window_caps_the_cache():
    per_token = 32 * 8 * 128 * 2 * 2
    assert kv_cache_bytes("Mistral-7B", 10_000) == per_token * 4096
    assert kv_cache_bytes("Mistral-7B", 10_000, respect_sliding_window=False) == per_token * 10_000


def test_gqa_and_mla_shrink_the_cache_against_mha():
    assert kv_numbers_per_token("Llama-3-70B") * 8 == 2 * 80 * 64 * 128  # 8x smaller than MHA of 64 heads
    mha_equivalent = 2 * 60 * 128 * 128
    assert kv_numbers_per_token("DeepSeek-V2") < mha_equivalent / 50


def test_cross_layer_sharing_divides_the_layers_that_are_cached():
    # Llama-3-8B with pairs of layers sharing K and V: 16 cached layers x 8 kv heads x 128 x (K, V) x 2 bytes.
    shared = dict(MODEL_CONFIGS["Llama-3-8B"], kv_share=2)
    assert kv_cache_bytes(shared, 1) == 16 * 8 * 128 * 2 * 2 == kv_cache_bytes("Llama-3-8B", 1) // 2
    assert cached_layers(shared) == 16 and cached_layers("Llama-3-8B") == 32
    # An odd count: 61 layers in groups of 3 -> 21 cached (the last group has one layer); on MLA too.
    assert cached_layers(dict(MODEL_CONFIGS["DeepSeek-V3"], kv_share=3)) == 21
    assert kv_numbers_per_token(dict(MODEL_CONFIGS["DeepSeek-V3"], kv_share=3)) == 21 * (512 + 64)
    assert kv_numbers_per_token(dict(MODEL_CONFIGS["Gemma-2B"], kv_share=1)) == 18 * 2 * 256
    # It composes with the sliding-window cap.
    assert kv_cache_bytes(dict(MODEL_CONFIGS["Mistral-7B"], kv_share=4), 10_000) == 8 * 8 * 128 * 2 * 2 * 4096


@pytest.mark.parametrize(
    "config, error",
    [
        (dict(MODEL_CONFIGS["Llama-3-8B"], kv_share=0), ValueError),
        (dict(MODEL_CONFIGS["Llama-3-8B"], kv_share=33), ValueError),
        (dict(MODEL_CONFIGS["Llama-3-8B"], kv_share=1.5), TypeError),
    ],
)
def test_kv_share_bad_input(config, error):
    with pytest.raises(error, match=r"^config\['kv_share'\]"):
        kv_cache_bytes(config, 1)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_model_configs_are_consistent(name):
    config = MODEL_CONFIGS[name]
    assert config["num_layers"] > 0 and config["hidden_size"] > 0 and config["num_heads"] > 0
    if config["attention"] == "mla":
        assert config["kv_lora_rank"] < config["hidden_size"] and config["qk_rope_head_dim"] % 2 == 0
    else:
        assert config["num_heads"] % config["num_kv_heads"] == 0
        expected = {"mha": config["num_heads"], "mqa": 1}.get(config["attention"])
        assert expected is None or config["num_kv_heads"] == expected
    assert kv_cache_bytes(name, 1) > 0


def test_max_concurrent_requests_by_hand():
    per_request = 32 * 8 * 128 * 2 * 2 * 8192  # Llama-3-8B, 8192 tokens: exactly 1 GiB
    assert per_request == 2**30
    assert max_concurrent_requests("Llama-3-8B", 8192, 80 * 10**9) == 80 * 10**9 // 2**30 == 74


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: kv_cache_bytes(dict(num_layers=2, num_kv_heads=2), 10), ValueError, "head_dim"),
        (lambda: kv_cache_bytes(dict(attention="mla", num_layers=2, kv_lora_rank=4), 10), ValueError,
         "qk_rope_head_dim"),
        (lambda: kv_cache_bytes(dict(attention="linear", num_layers=2), 10), ValueError, "attention"),
        (lambda: kv_cache_bytes("GPT-5", 10), ValueError, "config"),
        (lambda: kv_cache_bytes(42, 10), TypeError, "config"),
        (lambda: kv_cache_bytes("Llama-2-7B", -1), ValueError, "seq_len"),
        (lambda: kv_cache_bytes("Llama-2-7B", 1, 0), ValueError, "batch_size"),
        (lambda: kv_cache_bytes("Llama-2-7B", 1, dtype="fp16"), TypeError, "dtype"),
        (lambda: kv_cache_bytes(dict(num_layers=2, num_kv_heads=0, head_dim=4), 1), ValueError,
         "num_kv_heads"),
        (lambda: max_concurrent_requests("Llama-2-7B", 0, 10), ValueError, "seq_len"),
    ],
    ids=["missing-head-dim", "missing-rope-dim", "unknown-attention", "unknown-name", "not-a-dict",
         "negative-seq", "batch-0", "dtype-str", "zero-heads", "requests-seq-0"],
)  # fmt: skip
def test_config_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- paged KV cache ---------------------------------------------------------------------------

H_KV, HEAD_DIM, VALUE_DIM = 2, 3, 2


def make_paged(num_blocks=10, block_size=4):
    return PagedKVCache(num_blocks, block_size, H_KV, HEAD_DIM, value_dim=VALUE_DIM, dtype=torch.float64)


def random_kv(T, generator=None):
    return (
        torch.randn(H_KV, T, HEAD_DIM, dtype=torch.float64, generator=generator),
        torch.randn(H_KV, T, VALUE_DIM, dtype=torch.float64, generator=generator),
    )


def test_paged_append_across_block_boundaries():
    cache = make_paged(block_size=4)
    cache.add_sequence("a")
    k1, v1 = random_kv(6)
    k2, v2 = random_kv(3)
    cache.append("a", k1, v1)
    assert cache.block_table("a") == [0, 1] and cache.length("a") == 6
    cache.append("a", k2, v2)
    assert cache.block_table("a") == [0, 1, 2] and cache.num_free_blocks == 7
    keys, values = cache.gather("a")
    assert torch.equal(keys, torch.cat([k1, k2], dim=1)) and torch.equal(values, torch.cat([v1, v2], dim=1))


@pytest.mark.parametrize(
    "T, length", [(1, 9), (3, 9), (4, 4), (2, 13)], ids=["T1-L9", "T3-L9", "T4-L4", "T2-L13"]
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_paged_attention_equals_contiguous_sdpa(T, length, causal):
    cache = make_paged(block_size=4)
    cache.add_sequence(7)
    keys, values = random_kv(length)
    cache.append(7, keys, values)
    q = torch.randn(4, T, HEAD_DIM, dtype=torch.float64)  # 4 query heads over 2 kv heads
    mask = end_causal(T, length) if causal else None
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(cache.attention(7, q, causal=causal), expected)


def test_paged_attention_half_precision_query():
    cache = PagedKVCache(4, 3, 1, 4, dtype=torch.float16)
    cache.add_sequence(0)
    keys, values = torch.randn(1, 7, 4), torch.randn(1, 7, 4)
    cache.append(0, keys.half(), values.half())
    q = torch.randn(2, 2, 4).half()
    out = cache.attention(0, q)
    assert out.dtype == torch.float16
    expected = reference_attention(q[None], keys.half()[None], values.half()[None], end_causal(2, 7))[0]
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("scale", [0.0, -0.7], ids=["zero", "negative"])
def test_paged_attention_and_gqa_take_any_finite_scale(scale):
    cache = make_paged(block_size=4)
    cache.add_sequence("s")
    keys, values = random_kv(9)
    cache.append("s", keys, values)
    q = torch.randn(4, 3, HEAD_DIM, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=end_causal(3, 9), enable_gqa=True, scale=scale
    )
    torch.testing.assert_close(cache.attention("s", q, scale=scale), expected)
    out = gqa_attention(q[None], keys[None], values[None], causal=True, scale=scale)
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_paged_attention_and_gqa_refuse_a_scale_that_is_not_finite(bad):
    cache = make_paged(block_size=4)
    cache.add_sequence("s")
    cache.append("s", *random_kv(5))
    q = torch.randn(4, 2, HEAD_DIM, dtype=torch.float64)
    keys, values = random_kv(5)
    for call in (
        lambda scale: cache.attention("s", q, scale=scale),
        lambda scale: gqa_attention(q[None], keys[None], values[None], scale=scale),
    ):
        with pytest.raises(ValueError, match="scale"):
            call(bad)
        with pytest.raises(TypeError, match="scale"):
            call(True)


def test_fork_shares_blocks_and_copy_on_write_isolates():
    cache = make_paged(num_blocks=8, block_size=4)
    cache.add_sequence("parent")
    prefix_k, prefix_v = random_kv(6)
    cache.append("parent", prefix_k, prefix_v)
    cache.fork("parent", "child")
    assert cache.block_table("child") == cache.block_table("parent") == [0, 1]
    assert cache.ref_counts[0] == cache.ref_counts[1] == 2 and cache.num_free_blocks == 6
    report = cache.fragmentation_report()
    assert report["shared_blocks"] == 2 and report["used_slots"] == 6 and report["logical_tokens"] == 12

    child_k, child_v = random_kv(3)
    cache.append("child", child_k, child_v)  # writes into shared block 1: must copy it first
    assert cache.block_table("child")[0] == 0 and cache.block_table("child")[1] not in (0, 1)
    assert cache.ref_counts[0] == 2 and cache.ref_counts[1] == 1
    parent_keys, parent_values = cache.gather("parent")
    assert torch.equal(parent_keys, prefix_k) and torch.equal(parent_values, prefix_v)
    child_keys, _ = cache.gather("child")
    assert torch.equal(child_keys, torch.cat([prefix_k, child_k], dim=1))

    parent_k, parent_v = random_kv(1)
    cache.append("parent", parent_k, parent_v)  # block 1 is now private to the parent: in place
    assert cache.block_table("parent") == [0, 1]
    assert torch.equal(cache.gather("child")[0], torch.cat([prefix_k, child_k], dim=1))

    cache.free("parent")
    assert cache.ref_counts[0] == 1 and cache.ref_counts[1] == 0
    cache.free("child")
    assert cache.num_free_blocks == 8 and sum(cache.ref_counts) == 0


def test_out_of_blocks_raises_and_changes_nothing():
    cache = make_paged(num_blocks=2, block_size=2)
    cache.add_sequence(0)
    cache.append(0, *random_kv(3))
    before = (cache.block_table(0), cache.length(0), cache.num_free_blocks)
    with pytest.raises(RuntimeError, match="out of blocks"):
        cache.append(0, *random_kv(2))
    assert (cache.block_table(0), cache.length(0), cache.num_free_blocks) == before


class PagedCacheMachine(RuleBasedStateMachine):
    """Random traces of add/append/fork/free: the paged cache must match plain per-sequence tensors."""

    @initialize()
    def setup(self):
        self.cache = make_paged(num_blocks=12, block_size=3)
        self.reference = {}  # seq_id -> (keys, values) stored contiguously
        self.next_id = 0
        self.generator = torch.Generator().manual_seed(0)

    @rule()
    def add(self):
        self.cache.add_sequence(self.next_id)
        self.reference[self.next_id] = random_kv(0)
        self.next_id += 1

    @rule(pick=st.integers(0, 100), T=st.integers(1, 5))
    def append(self, pick, T):
        if not self.reference:
            return
        seq = sorted(self.reference)[pick % len(self.reference)]
        k, v = random_kv(T, self.generator)
        try:
            self.cache.append(seq, k, v)
        except RuntimeError:
            return  # out of blocks: the state must be unchanged (checked by the invariants)
        keys, values = self.reference[seq]
        self.reference[seq] = (torch.cat([keys, k], dim=1), torch.cat([values, v], dim=1))

    @rule(pick=st.integers(0, 100))
    def fork(self, pick):
        if not self.reference:
            return
        parent = sorted(self.reference)[pick % len(self.reference)]
        self.cache.fork(parent, self.next_id)
        self.reference[self.next_id] = self.reference[parent]
        self.next_id += 1

    @rule(pick=st.integers(0, 100))
    def free(self, pick):
        if not self.reference:
            return
        seq = sorted(self.reference)[pick % len(self.reference)]
        self.cache.free(seq)
        del self.reference[seq]

    @invariant()
    def contents_match(self):
        for seq, (keys, values) in self.reference.items():
            assert self.cache.length(seq) == keys.shape[1]
            gathered_keys, gathered_values = self.cache.gather(seq)
            assert torch.equal(gathered_keys, keys) and torch.equal(gathered_values, values)
            if keys.shape[1]:
                q = torch.randn(4, 2, HEAD_DIM, dtype=torch.float64, generator=self.generator)
                q = q[:, : min(2, keys.shape[1])]
                expected = reference_attention(
                    q[None], keys[None], values[None], end_causal(q.shape[1], keys.shape[1])
                )
                torch.testing.assert_close(self.cache.attention(seq, q), expected[0])

    @invariant()
    def blocks_are_accounted_for(self):
        references = [0] * self.cache.num_blocks
        for table in self.cache.block_tables.values():
            for block in table:
                references[block] += 1
        assert references == self.cache.ref_counts
        in_use = sum(1 for count in references if count > 0)
        assert in_use + self.cache.num_free_blocks == self.cache.num_blocks
        assert set(self.cache.free_blocks).isdisjoint(b for b, c in enumerate(references) if c > 0)


TestPagedCacheMachine = PagedCacheMachine.TestCase
TestPagedCacheMachine.settings = settings(max_examples=20, stateful_step_count=15, deadline=None)


def test_simulate_fragmentation_by_hand():
    result = simulate_fragmentation([5, 17, 32], max_len=64, block_size=16)
    assert result["used_slots"] == 5 + 17 + 32
    assert result["paged_allocated_slots"] == (1 + 2 + 2) * 16
    assert result["contiguous_allocated_slots"] == 3 * 64
    assert result["paged_waste_fraction"] == pytest.approx(1 - 54 / 80)
    assert result["contiguous_waste_fraction"] == pytest.approx(1 - 54 / 192)


def test_simulate_fragmentation_seeded_trace():
    first = simulate_fragmentation(num_requests=40, max_len=256, block_size=16, seed=3)
    again = simulate_fragmentation(num_requests=40, max_len=256, block_size=16, seed=3)
    assert first == again
    assert len(first["lengths"]) == 40 and all(1 <= n <= 256 for n in first["lengths"])
    # Paged waste is under one block per request; contiguous waste is everything below max_len.
    assert first["paged_allocated_slots"] - first["used_slots"] < 40 * 16
    assert first["contiguous_allocated_slots"] - first["used_slots"] == sum(256 - n for n in first["lengths"])
    assert first["paged_waste_fraction"] < first["contiguous_waste_fraction"]


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: PagedKVCache(4, 0, 1, 2), ValueError, "block_size"),
        (lambda: PagedKVCache(0, 2, 1, 2), ValueError, "num_blocks"),
        (lambda: make_paged().free("ghost"), ValueError, "seq_id"),
        (lambda: make_paged().append("ghost", *random_kv(1)), ValueError, "seq_id"),
        (lambda: make_paged().fork("ghost", "child"), ValueError, "parent_id"),
        (lambda: make_paged().gather(3), ValueError, "seq_id"),
    ],
    ids=["block-size-0", "blocks-0", "free-unknown", "append-unknown", "fork-unknown", "gather-unknown"],
)
def test_paged_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_paged_bad_input_on_live_sequences():
    cache = make_paged()
    cache.add_sequence(0)
    cache.append(0, *random_kv(2))
    with pytest.raises(ValueError, match="seq_id"):
        cache.add_sequence(0)
    with pytest.raises(ValueError, match="child_id"):
        cache.fork(0, 0)
    with pytest.raises(ValueError, match="k"):
        cache.append(0, torch.randn(3, 1, HEAD_DIM, dtype=torch.float64), torch.randn(3, 1, VALUE_DIM))
    with pytest.raises(ValueError, match="v"):
        cache.append(0, torch.randn(H_KV, 1, HEAD_DIM), torch.randn(H_KV, 2, VALUE_DIM))
    with pytest.raises(ValueError, match="num_kv_heads"):
        cache.attention(0, torch.randn(3, 1, HEAD_DIM))
    with pytest.raises(ValueError, match="q"):
        cache.attention(0, torch.randn(2, 3, HEAD_DIM))  # 3 causal queries, only 2 tokens cached
    with pytest.raises(ValueError, match="lengths"):
        simulate_fragmentation([3, 100], max_len=10)


# --- quantised cache ---------------------------------------------------------------------------


def group_step(x, dim, group_size, bits):
    """(max - min) / (2^bits - 1) of each group, broadcast back to x's shape (test-local)."""
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    steps = torch.empty_like(moved)
    for start in range(0, n, group_size):
        block = moved[..., start : start + group_size]
        steps[..., start : start + group_size] = (
            block.amax(-1, keepdim=True) - block.amin(-1, keepdim=True)
        ) / (2**bits - 1)
    return steps.movedim(-1, dim)


@given(
    bits=st.sampled_from([4, 8]),
    dim=st.sampled_from([-1, -2]),
    S=st.integers(1, 9),
    D=st.integers(1, 7),
    group_size=st.integers(1, 10),
)
def test_quantize_error_within_half_a_step(bits, dim, S, D, group_size):
    generator = torch.Generator().manual_seed(S * 100 + D * 10 + group_size)
    x = torch.randn(2, 2, S, D, generator=generator) * 3
    restored = quantize(x, bits=bits, dim=dim, group_size=group_size).dequantize()
    assert restored.shape == x.shape and restored.dtype == x.dtype
    bound = group_step(x, dim, group_size, bits) / 2 + 1e-5
    assert ((restored - x).abs() <= bound).all()


def test_quantize_constant_groups_are_exact():
    x = torch.full((1, 1, 4, 3), 2.5)
    for bits in (4, 8):
        assert torch.equal(quantize(x, bits=bits, dim=-2).dequantize(), x)


def test_quantize_half_precision_round_trip():
    x = torch.randn(1, 2, 8, 4).half()
    restored = quantize(x, bits=8, dim=-1).dequantize()
    assert restored.dtype == torch.float16
    torch.testing.assert_close(restored, x, atol=0.02, rtol=0.02)


def test_quantized_bytes_by_hand():
    k, v = torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    qk8, qv8 = quantize_kv(k, v, bits=8, group_size=16)
    qk4, _ = quantize_kv(k, v, bits=4, group_size=16)
    groups = 1 * 2 * (64 // 16) * 32  # keys: groups of 16 tokens per channel
    assert qk8.nbytes == 1 * 2 * 64 * 32 + 4 * groups  # 1 byte per code + fp16 scale and minimum
    assert qk4.nbytes == 1 * 2 * 64 * 32 // 2 + 4 * groups  # two 4-bit codes per byte
    assert qv8.nbytes == qk8.nbytes  # values: groups of 16 channels per token, same count here


def test_kivi_keys_per_channel_beat_per_token_on_outlier_channels():
    k, q, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 64, 16)
    k[..., 3] *= 30  # one outlier channel, as KIVI observed in real keys
    per_channel = quantize(k, bits=4, dim=-2, group_size=32).dequantize()
    per_token = quantize(k, bits=4, dim=-1, group_size=16).dequantize()
    ordinary = [c for c in range(16) if c != 3]
    # Per token, the outlier sets every token's range and wipes out the precision of the other channels.
    assert (per_channel - k)[..., ordinary].norm() < (per_token - k)[..., ordinary].norm() / 4
    exact = gqa_attention(q, k, v)
    assert (gqa_attention(q, per_channel, v) - exact).norm() < (
        gqa_attention(q, per_token, v) - exact
    ).norm() / 2


def test_quantized_attention_error_and_savings():
    q, k, v = torch.randn(1, 4, 4, 64), torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64)
    eight = quantized_attention_error(q, k, v, bits=8, group_size=32)
    four = quantized_attention_error(q, k, v, bits=4, group_size=32)
    # fp16: 2 bytes per number; int8: 1 + 4/32 (scale, min per group of 32); int4: 0.5 + 4/32.
    assert eight["compression"] == pytest.approx(2 / (1 + 4 / 32))
    assert four["compression"] == pytest.approx(2 / (0.5 + 4 / 32))
    assert eight["relative_error"] < 0.01 < four["relative_error"] < 0.2


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: quantize(torch.randn(2, 3), bits=3), ValueError, "bits"),
        (lambda: quantize(torch.randn(2, 3), dim=0), ValueError, "dim"),
        (lambda: quantize(torch.randn(2, 3), group_size=0), ValueError, "group_size"),
        (lambda: quantize(torch.ones(2, 3, dtype=torch.long)), TypeError, "x"),
        (lambda: quantize(torch.randn(3)), ValueError, "x"),
        (lambda: quantize_kv(torch.randn(2, 3, 4), torch.randn(1, 2, 3, 4)), ValueError, "k"),
        (lambda: quantized_attention_error(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4),
                                           torch.randn(1, 2, 2, 4)), ValueError, "num_kv_heads"),
    ],
    ids=["bits-3", "dim-0", "group-0", "int-tensor", "one-dim", "k-3d", "heads"],
)  # fmt: skip
def test_quantize_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- awkward input found by probing (issue 14) -------------------------------------------------------


def gradients(output, inputs):
    return torch.autograd.grad(output.pow(2).sum(), inputs)


@pytest.mark.parametrize("chunk_size", [1, 3, 10], ids=["c1", "c3-ragged", "c10-whole"])
@pytest.mark.parametrize("num_kv_heads", [6, 2, 1], ids=["mha", "gqa", "mqa"])
def test_chunked_prefill_is_differentiable_with_one_shot_gradients(num_kv_heads, chunk_size):
    """Backward through a filled KVCache used to fail with an in-place autograd error."""
    layer = GroupedQueryAttention(12, 6, num_kv_heads).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64, requires_grad=True)
    cache = KVCache(1, 2, num_kv_heads, 10, 2, dtype=torch.float64)
    inputs = [x, *layer.parameters()]
    chunked = gradients(chunked_prefill(layer, x, cache, chunk_size=chunk_size), inputs)
    for got, expected in zip(chunked, gradients(layer(x), inputs), strict=True):
        torch.testing.assert_close(got, expected)
    # The storage still holds the numbers, for decoding under no_grad afterwards.
    torch.testing.assert_close(cache.get(0)[0], layer.k_proj(x).view(2, 10, num_kv_heads, 2).transpose(1, 2))
    with torch.no_grad():
        keys, _ = cache.append(0, torch.zeros(2, num_kv_heads, 0, 2), torch.zeros(2, num_kv_heads, 0, 2))
    assert keys.data_ptr() == cache.keys[0].data_ptr() and not keys.requires_grad


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_chunked_prefill_through_the_latent_cache_is_differentiable(mode):
    layer = MultiHeadLatentAttention(12, 3, head_dim=4, latent_dim=5, rope_dim=2, mode=mode).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    cache = layer.make_cache(1, 2, 7, dtype=torch.float64)
    inputs = [x, *layer.parameters()]
    chunked = gradients(chunked_prefill(layer, x, cache, chunk_size=3), inputs)
    for got, expected in zip(chunked, gradients(layer(x), inputs), strict=True):
        torch.testing.assert_close(got, expected)


def test_a_float16_cache_in_grad_mode_returns_its_own_dtype():
    cache = KVCache(1, 1, 1, 4, 2, dtype=torch.float16)
    k = torch.randn(1, 1, 2, 2, requires_grad=True)
    keys, values = cache.append(0, k, k.detach())
    assert keys.dtype == values.dtype == torch.float16 and keys.requires_grad
    keys, _ = cache.append(0, k, k)
    assert keys.shape == (1, 1, 4, 2) and torch.equal(keys, cache.keys[0])


@pytest.mark.parametrize(
    "call",
    [
        lambda config: kv_cache_bytes(config, 16),
        lambda config: kv_numbers_per_token(config),
        lambda config: max_concurrent_requests(config, 16, 10**9),
    ],
    ids=["kv_cache_bytes", "kv_numbers_per_token", "max_concurrent_requests"],
)
@pytest.mark.parametrize(
    "config",
    [
        dict(attention="gqa", num_layers=2, num_heads=6, num_kv_heads=4, head_dim=8),
        dict(attention="mha", num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8),
        dict(attention="mqa", num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8),
        dict(attention="mqa", num_layers=2, num_kv_heads=2, head_dim=8),
    ],
    ids=["gqa-not-dividing", "mha-fewer-kv-heads", "mqa-two-kv-heads", "mqa-no-heads-given"],
)
def test_a_config_whose_kv_heads_do_not_fit_its_heads_is_refused(call, config):
    with pytest.raises(ValueError, match=r"^config\['num_kv_heads'\]"):
        call(config)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda cache: cache.add_sequence([1]), "seq_id"),
        (lambda cache: cache.length([1]), "seq_id"),
        (lambda cache: cache.block_table({"a": 1}), "seq_id"),
        (
            lambda cache: cache.append([0], torch.zeros(H_KV, 1, HEAD_DIM), torch.zeros(H_KV, 1, VALUE_DIM)),
            "seq_id",
        ),
        (lambda cache: cache.fork(0, [1]), "child_id"),
        (lambda cache: cache.fork([0], 1), "parent_id"),
        (lambda cache: cache.free([0]), "seq_id"),
        (lambda cache: cache.attention([0], torch.zeros(H_KV, 1, HEAD_DIM)), "seq_id"),
    ],
    ids=["add", "length", "block_table", "append", "fork-child", "fork-parent", "free", "attention"],
)
def test_an_unhashable_sequence_id_is_a_type_error_naming_it(call, name):
    cache = make_paged()
    cache.add_sequence(0)
    with pytest.raises(TypeError, match=f"^{name} must be hashable"):
        call(cache)


@pytest.mark.parametrize("shape, dim", [((2, 0), -1), ((0, 3), -2)])
def test_quantize_an_empty_dim(shape, dim):
    x = torch.zeros(shape)
    assert quantize(x, dim=dim).dequantize().shape == shape
    q, k = torch.randn(1, 1, 2, 4), torch.zeros(1, 1, 0, 4)
    report = quantized_attention_error(q, k, k)  # an empty cache: both outputs zero, no error
    assert report["max_abs_error"] == 0.0 and report["relative_error"] == 0.0
