"""The contract every attention kernel of the course keeps, whatever module it lives in.

- Empty sequences: ``T = 0`` gives a ``(B, H, 0, D_v)`` output and ``S = 0`` (no key at all)
  gives zeros, as :func:`~course_lib.tiling.flash_attention` does, instead of an error from
  inside torch.
- Side tensors: the tensors a kernel computes with as data (values, compressed keys, the second
  query half) share q's dtype; every tensor lives on q's device; a meta tensor (a shape without
  data) is refused. Each refusal is a TypeError/ValueError whose message names the argument.

The per-module test files check each kernel against its own independent reference; this file
checks only the contract, over all of them at once.
"""

from __future__ import annotations

import re

import pytest
import torch
from devices import elsewhere

from course_lib.kv_cache import (
    GroupedQueryAttention,
    KVCache,
    MultiHeadLatentAttention,
    PagedKVCache,
    chunked_prefill,
    gqa_attention,
)
from course_lib.linear import LinformerAttention, efficient_attention, linear_attention, linformer_attention
from course_lib.relative_positions import shaw_attention
from course_lib.sparse import (
    AdaptiveWindowAttention,
    LearnedSparseAttention,
    MixtureOfBlockAttention,
    NativeSparseAttention,
    block_sparse_attention,
    kept_attention,
    lsh_attention,
    moba_attention,
    moba_reference,
    neighborhood_attention_2d,
    nsa_attention,
    nsa_reference,
    sliding_window_attention,
    space_attention,
    spatial_reduction_attention,
    time_attention,
    topk_attention,
)
from course_lib.specialized import (
    DifferentialAttention,
    HybridAttentionStack,
    SwitchHeadAttention,
    differential_attention,
)
from course_lib.standard import MultiHeadAttention, alibi_bias, apply_rope, attention, causal_mask
from course_lib.tiling import (
    flash_attention,
    flash_decoding,
    flash_forward_fa1,
    flash_forward_fa2,
    quantized_attention,
    sage2_attention,
)

B, H, D, DV = 2, 2, 4, 3


def blocks(n: int, size: int) -> int:
    return -(-n // size)


# Each kernel as ``call(q, k, v)``, building its side inputs from the shapes it is given. k and v
# have one head (GQA kernels share it between q's two heads) or H heads.
KERNELS = {
    "attention": (H, lambda q, k, v: attention(q, k, v)),
    "attention causal": (H, lambda q, k, v: attention(q, k, v, causal=True)),
    "attention with a causal_mask": (
        H,
        lambda q, k, v: attention(q, k, v, causal_mask(q.shape[2], k.shape[2])),
    ),
    "attention with an alibi_bias": (
        H,
        lambda q, k, v: attention(q, k, v, bias=alibi_bias(H, q.shape[2], k.shape[2])),
    ),
    "gqa_attention": (1, lambda q, k, v: gqa_attention(q, k, v, causal=True)),
    "flash_attention": (H, lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=2, block_k=2)),
    "flash_forward_fa1": (
        H,
        lambda q, k, v: flash_forward_fa1(q, k, v, causal=True, block_q=2, block_k=2)[0].to(q.dtype),
    ),
    "flash_forward_fa2": (
        H,
        lambda q, k, v: flash_forward_fa2(q, k, v, causal=True, block_q=2, block_k=2)[0].to(q.dtype),
    ),
    "flash_decoding": (H, lambda q, k, v: flash_decoding(q, k, v, num_splits=2, causal=True)),
    "quantized_attention": (
        H,
        lambda q, k, v: quantized_attention(q, k, v, causal=True, block_q=2, block_k=2),
    ),
    "sage2_attention": (H, lambda q, k, v: sage2_attention(q, k, v, causal=True, block_q=2, block_k=2)),
    "sliding_window_attention": (H, lambda q, k, v: sliding_window_attention(q, k, v, 2)),
    "block_sparse_attention": (
        H,
        lambda q, k, v: block_sparse_attention(
            q, k, v, torch.ones(blocks(q.shape[2], 2), blocks(k.shape[2], 2), dtype=torch.bool), 2
        ),
    ),
    "topk_attention": (H, lambda q, k, v: topk_attention(q, k, v, 2, causal=True)),
    "kept_attention": (H, lambda q, k, v: kept_attention(q, k, v, torch.arange(min(2, k.shape[2])))),
    "nsa_attention": (
        1,
        lambda q, k, v: nsa_attention(
            q,
            k,
            v,
            torch.rand(*q.shape[:3], 3, dtype=q.dtype),
            block_size=2,
            num_selected=2,
            window=2,
            compress_block=2,
            compress_stride=1,
            num_local_blocks=1,
        ),  # fmt: skip
    ),
    "nsa_reference": (
        1,
        lambda q, k, v: nsa_reference(
            q,
            k,
            v,
            torch.rand(*q.shape[:3], 3, dtype=q.dtype),
            block_size=2,
            num_selected=2,
            window=2,
            compress_block=2,
            compress_stride=1,
            num_local_blocks=1,
        ),  # fmt: skip
    ),
    "moba_attention": (1, lambda q, k, v: moba_attention(q, k, v, block_size=2, top_k=2)),
    "moba_reference": (1, lambda q, k, v: moba_reference(q, k, v, block_size=2, top_k=2)),
    "linear_attention": (H, lambda q, k, v: linear_attention(q, k, v)),
    "linear_attention non-causal": (H, lambda q, k, v: linear_attention(q, k, v, causal=False)),
    "efficient_attention": (H, lambda q, k, v: efficient_attention(q, k, v)),
    "linformer_attention": (
        H,
        lambda q, k, v: linformer_attention(
            q, k, v, torch.randn(3, k.shape[2], dtype=q.dtype), torch.randn(3, k.shape[2], dtype=q.dtype)
        ),
    ),
    "differential_attention": (
        H,
        lambda q, k, v: differential_attention(q, k, q.flip(-1), k.flip(-1), v, 0.3),
    ),
    "shaw_attention": (H, lambda q, k, v: shaw_attention(q, k, v, torch.randn(5, D, dtype=q.dtype))),
}


def inputs(T: int, S: int, kv_heads: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(T * 100 + S)
    q = torch.randn(B, H, T, D, generator=generator, dtype=dtype)
    k = torch.randn(B, kv_heads, S, D, generator=generator, dtype=dtype)
    v = torch.randn(B, kv_heads, S, DV, generator=generator, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("T, S", [(0, 5), (0, 0)], ids=["T=0", "T=S=0"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_no_query_gives_an_empty_output(name, T, S):
    kv_heads, call = KERNELS[name]
    out = call(*inputs(T, S, kv_heads))
    assert out.shape == (B, H, 0, DV) and out.dtype == torch.float64


@pytest.mark.parametrize("name", list(KERNELS))
def test_no_key_gives_zeros(name):
    kv_heads, call = KERNELS[name]
    out = call(*inputs(5, 0, kv_heads))
    assert out.shape == (B, H, 5, DV)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", list(KERNELS))
def test_half_precision_empty_sequences_keep_the_dtype(name):
    kv_heads, call = KERNELS[name]
    for T, S in ((0, 3), (3, 0)):
        out = call(*inputs(T, S, kv_heads, dtype=torch.float32))
        assert out.shape == (B, H, T, DV) and out.dtype == torch.float32


def test_lsh_attention_on_an_empty_sequence():
    # LSH attention is self-attention (one qk tensor), so T = S.
    out = lsh_attention(torch.randn(B, H, 0, D), torch.randn(B, H, 0, DV), num_buckets=2, chunk_size=2)
    assert out.shape == (B, H, 0, DV)


def test_paged_cache_attention_on_empty_sequences():
    cache = PagedKVCache(4, 2, 1, D, value_dim=DV)
    cache.add_sequence("empty")
    assert cache.attention("empty", torch.randn(H, 0, D)).shape == (H, 0, DV)
    out = cache.attention("empty", torch.randn(H, 3, D), causal=False)  # nothing cached: zeros
    assert torch.equal(out, torch.zeros(H, 3, DV))
    cache.add_sequence("full")
    cache.append("full", torch.randn(1, 3, D), torch.randn(1, 3, DV))
    assert cache.attention("full", torch.randn(H, 0, D)).shape == (H, 0, DV)


@pytest.mark.parametrize("height, width", [(0, 3), (3, 0), (0, 0)])
@pytest.mark.parametrize(
    "call",
    [
        lambda q, k, v: spatial_reduction_attention(q, k, v, 2),
        lambda q, k, v: neighborhood_attention_2d(q, k, v, 1),
        lambda q, k, v: time_attention(q, k, v, causal=True),
        lambda q, k, v: space_attention(q, k, v),
    ],
    ids=["spatial_reduction", "neighborhood_2d", "time", "space"],
)
def test_vision_kernels_on_empty_images(call, height, width):
    q = k = torch.randn(B, H, height, width, D)
    out = call(q, k, torch.randn(B, H, height, width, DV))
    assert out.shape == (B, H, height, width, DV)


# Each self-attention layer as ``(make(), call(layer, x))`` for x of shape (2, T, 16).
LAYERS = {
    "MultiHeadAttention": (lambda: MultiHeadAttention(16, 4), lambda layer, x: layer(x, causal=True)),
    "GroupedQueryAttention": (lambda: GroupedQueryAttention(16, 4, 2), lambda layer, x: layer(x)),
    "GroupedQueryAttention + chunked_prefill": (
        lambda: GroupedQueryAttention(16, 4, 2),
        lambda layer, x: chunked_prefill(layer, x, KVCache(1, 2, 2, 4, 4), chunk_size=2),
    ),
    "MultiHeadLatentAttention": (
        lambda: MultiHeadLatentAttention(16, 4, head_dim=4, latent_dim=6, rope_dim=2, mode="absorbed"),
        lambda layer, x: layer(x, cache=layer.make_cache(1, 2, 4)),
    ),
    "LearnedSparseAttention": (lambda: LearnedSparseAttention(16, 4, causal=True), lambda layer, x: layer(x)),
    "AdaptiveWindowAttention": (lambda: AdaptiveWindowAttention(16, 4), lambda layer, x: layer(x)),
    "NativeSparseAttention": (
        lambda: NativeSparseAttention(
            16,
            4,
            block_size=2,
            num_selected=2,
            window=2,
            compress_block=2,
            compress_stride=1,
            num_local_blocks=1,
        ),
        lambda layer, x: layer(x),
    ),
    "MixtureOfBlockAttention": (
        lambda: MixtureOfBlockAttention(16, 4, block_size=2, top_k=2),
        lambda layer, x: layer(x),
    ),
    "LinformerAttention": (
        lambda: LinformerAttention(16, 4, max_len=8, proj_len=3),
        lambda layer, x: layer(x),
    ),
    "DifferentialAttention": (lambda: DifferentialAttention(16, 2), lambda layer, x: layer(x, causal=True)),
    "SwitchHeadAttention": (
        lambda: SwitchHeadAttention(16, 2, num_experts=3),
        lambda layer, x: layer(x, causal=True),
    ),
    "HybridAttentionStack": (
        lambda: HybridAttentionStack(16, 2, ["window", "full", "linear"]),
        lambda layer, x: layer(x),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_take_an_empty_sequence_and_back_propagate(name):
    make, call = LAYERS[name]
    layer = make()
    x = torch.randn(2, 0, 16, requires_grad=True)
    out = call(layer, x)
    assert out.shape == (2, 0, 16)
    out.sum().backward()  # an empty batch contributes zero gradients, it does not fail
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


# --- side tensors ---------------------------------------------------------------------------------


def float64_side(name):
    """A call whose data side tensor ``name`` is float64 while q, k, v are float32."""
    q, k, v = inputs(4, 4, H, dtype=torch.float32)
    k1 = k[:, :1]
    cases = {
        "v": lambda: lsh_attention(q, v.double(), num_buckets=2, chunk_size=2),
        "q2": lambda: differential_attention(q, k, q.double(), k, v, 0.3),
        "compressed[0]": lambda: nsa_attention(
            q,
            k1,
            v[:, :1],
            torch.rand(B, H, 4, 3),
            block_size=2,
            num_selected=2,
            window=2,
            compress_block=2,
            compress_stride=2,
            num_local_blocks=1,
            compressed=(torch.randn(B, 1, 2, D, dtype=torch.float64), torch.randn(B, 1, 2, DV)),
        ),  # fmt: skip
        "compressed[1]": lambda: nsa_attention(
            q,
            k1,
            v[:, :1],
            torch.rand(B, H, 4, 3),
            block_size=2,
            num_selected=2,
            window=2,
            compress_block=2,
            compress_stride=2,
            num_local_blocks=1,
            compressed=(torch.randn(B, 1, 2, D), torch.randn(B, 1, 2, DV, dtype=torch.float64)),
        ),  # fmt: skip
        "k": lambda: neighborhood_attention_2d(
            torch.randn(1, 1, 3, 3, D),
            torch.randn(1, 1, 3, 3, D, dtype=torch.float64),
            torch.randn(1, 1, 3, 3, D),
            3,
        ),  # fmt: skip
    }
    return cases[name]


@pytest.mark.parametrize("name", ["v", "q2", "compressed[0]", "compressed[1]", "k"])
def test_a_data_tensor_of_another_dtype_is_refused(name):
    with pytest.raises(TypeError, match="^" + re.escape(name) + " .*dtype"):
        float64_side(name)()


def meta_side(name):
    """A call whose side tensor ``name`` is a meta tensor (no data, and not on q's device)."""
    q, k, v = inputs(4, 4, H, dtype=torch.float32)

    def meta(shape, dtype=torch.float32):
        return torch.empty(shape, device="meta", dtype=dtype)

    bool_mask = meta((4, 4), torch.bool)
    cases = {
        "attention mask": lambda: attention(q, k, v, bool_mask),
        "attention bias": lambda: attention(q, k, v, bias=meta((4, 4))),
        "gqa_attention mask": lambda: gqa_attention(q, k[:, :1], v[:, :1], bool_mask),
        "topk_attention mask": lambda: topk_attention(q, k, v, 2, bool_mask),
        "shaw_attention mask": lambda: shaw_attention(q, k, v, torch.randn(3, D), None, bool_mask),
        "shaw_attention key_table": lambda: shaw_attention(q, k, v, meta((3, D))),
        "shaw_attention value_table": lambda: shaw_attention(q, k, v, torch.randn(3, D), meta((3, DV))),
        "block_sparse_attention layout": lambda: block_sparse_attention(q, k, v, meta((2, 2), torch.bool), 2),
        "kept_attention keep": lambda: kept_attention(q, k, v, meta((2,), torch.long)),
        "lsh_attention v": lambda: lsh_attention(q, meta((B, H, 4, DV)), num_buckets=2, chunk_size=2),
        "nsa_attention gates": lambda: nsa_attention(
            q,
            k[:, :1],
            v[:, :1],
            meta((B, H, 4, 3)),
            block_size=2,
            num_selected=2,
            window=2,
            compress_block=2,
            compress_stride=2,
            num_local_blocks=1,
        ),  # fmt: skip
        "linformer_attention key_padding_mask": lambda: linformer_attention(
            q, k, v, torch.randn(3, 4), torch.randn(3, 4), key_padding_mask=meta((B, 4), torch.bool)
        ),
        "quantized_attention rotation": lambda: quantized_attention(q, k, v, rotation=meta((D, D))),
        "differential_attention lambda_": lambda: differential_attention(q, k, q, k, v, meta(())),
        "paged attention q": lambda: paged_with_one_sequence().attention(0, meta((H, 1, D))),
    }
    return cases[name]


def paged_with_one_sequence():
    cache = PagedKVCache(4, 2, 1, D)
    cache.add_sequence(0)
    cache.append(0, torch.randn(1, 3, D), torch.randn(1, 3, D))
    return cache


META_CASES = [
    "attention mask",
    "attention bias",
    "gqa_attention mask",
    "topk_attention mask",
    "shaw_attention mask",
    "shaw_attention key_table",
    "shaw_attention value_table",
    "block_sparse_attention layout",
    "kept_attention keep",
    "lsh_attention v",
    "nsa_attention gates",
    "linformer_attention key_padding_mask",
    "quantized_attention rotation",
    "differential_attention lambda_",
    "paged attention q",
]


@pytest.mark.parametrize("case", META_CASES)
def test_a_meta_side_tensor_is_refused_by_name(case):
    argument = case.split(" ", 1)[1].split(" ")[-1]
    with pytest.raises(ValueError, match=rf"^{argument} "):
        meta_side(case)()


DEVICE_CASES = [
    ("mask", lambda q, k, v: attention(q, k, v, elsewhere(causal_mask(4)))),
    ("bias", lambda q, k, v: attention(q, k, v, bias=elsewhere(torch.zeros(4, 4)))),
    ("mask", lambda q, k, v: gqa_attention(q, k, v, elsewhere(causal_mask(4)))),
    ("mask", lambda q, k, v: topk_attention(q, k, v, 2, elsewhere(causal_mask(4)))),
    ("mask", lambda q, k, v: shaw_attention(q, k, v, torch.randn(3, D), None, elsewhere(causal_mask(4)))),
    (
        "layout",
        lambda q, k, v: block_sparse_attention(q, k, v, elsewhere(torch.ones(2, 2, dtype=torch.bool)), 2),
    ),
    ("keep", lambda q, k, v: kept_attention(q, k, v, elsewhere(torch.arange(2)))),
    ("v", lambda q, k, v: lsh_attention(q, elsewhere(v), num_buckets=2, chunk_size=2)),
    ("key_table", lambda q, k, v: shaw_attention(q, k, v, elsewhere(torch.randn(3, D)))),
    (
        "value_table",
        lambda q, k, v: shaw_attention(q, k, v, torch.randn(3, D), elsewhere(torch.randn(3, DV))),
    ),
    ("rotation", lambda q, k, v: quantized_attention(q, k, v, rotation=elsewhere(torch.eye(D)))),
    ("E", lambda q, k, v: linformer_attention(q, k, v, elsewhere(torch.randn(3, 4)), torch.randn(3, 4))),
    (
        "key_padding_mask",
        lambda q, k, v: linformer_attention(
            q,
            k,
            v,
            torch.randn(3, 4),
            torch.randn(3, 4),
            key_padding_mask=elsewhere(torch.ones(B, 4, dtype=torch.bool)),
        ),
    ),
    ("gates", lambda q, k, v: nsa_attention(q, k, v, elsewhere(torch.rand(B, H, 4, 3)), window=2)),
    (
        "compressed[0]",
        lambda q, k, v: nsa_attention(
            q,
            k,
            v,
            torch.rand(B, H, 4, 3),
            block_size=2,
            num_selected=2,
            window=2,
            compress_block=2,
            compress_stride=2,
            num_local_blocks=1,
            compressed=(elsewhere(torch.randn(B, H, 2, D)), torch.randn(B, H, 2, DV)),
        ),  # fmt: skip
    ),
    ("q2", lambda q, k, v: differential_attention(q, k, elsewhere(q), k, v, 0.3)),
    ("lambda_", lambda q, k, v: differential_attention(q, k, q, k, v, elsewhere(torch.tensor(0.3)))),
    ("k", lambda q, k, v: time_attention(q[:, :, None], elsewhere(k[:, :, None]), v[:, :, None])),
    (
        "v",
        lambda q, k, v: neighborhood_attention_2d(
            q.view(B, H, 2, 2, D), k.view(B, H, 2, 2, D), elsewhere(v.view(B, H, 2, 2, DV)), 1
        ),
    ),
    ("positions", lambda q, k, v: apply_rope(q, elsewhere(torch.arange(4)))),
    ("q", lambda q, k, v: paged_with_one_sequence().attention(0, elsewhere(q[0, :, 3:]))),
]


@pytest.mark.parametrize(
    "argument, call", DEVICE_CASES, ids=[f"{i}-{a}" for i, (a, _) in enumerate(DEVICE_CASES)]
)
def test_a_side_tensor_on_another_device_is_refused_by_name(argument, call):
    q, k, v = inputs(4, 4, H, dtype=torch.float32)
    with pytest.raises(ValueError, match="^" + re.escape(argument) + " .*device"):
        call(q, k, v)


# On a machine with a GPU the same, with real CPU side tensors and CUDA inputs (skipped without one).
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "argument, call",
    [
        ("mask", lambda q, k, v: attention(q, k, v, causal_mask(4))),
        ("bias", lambda q, k, v: attention(q, k, v, bias=torch.zeros(4, 4))),
        ("mask", lambda q, k, v: gqa_attention(q, k, v, causal_mask(4))),
        ("layout", lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool), 2)),
        ("keep", lambda q, k, v: kept_attention(q, k, v, torch.arange(2))),
        ("v", lambda q, k, v: lsh_attention(q, v.cpu(), num_buckets=2, chunk_size=2)),
        ("key_table", lambda q, k, v: shaw_attention(q, k, v, torch.randn(3, D))),
        ("rotation", lambda q, k, v: quantized_attention(q, k, v, rotation=torch.eye(D))),
        ("gates", lambda q, k, v: nsa_attention(q, k, v, torch.rand(B, H, 4, 3), window=2)),
        ("lambda_", lambda q, k, v: differential_attention(q, k, q, k, v, torch.tensor(0.3))),
    ],
)
def test_a_cpu_side_tensor_with_cuda_inputs_is_refused_by_name(argument, call):
    q, k, v = (x.cuda() for x in inputs(4, 4, H, dtype=torch.float32))
    with pytest.raises(ValueError, match="^" + re.escape(argument) + " .*device"):
        call(q, k, v)
