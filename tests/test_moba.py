"""MoBA: the block-skipping kernel against a per-query loop written from the paper, and against
dense attention with the equivalent explicit mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from course_lib.sparse.moba import (
    MixtureOfBlockAttention,
    moba_attention,
    moba_mask,
    moba_reference,
    moba_selection,
)


def moba_loop(q, k, v, *, block_size, top_k, scale=None):
    """One query at a time: gate = q . (mean key of each block); own block always; top-k; causal."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    num_blocks = math.ceil(S / block_size)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // G
            means = [k[b, kv, j * block_size : (j + 1) * block_size].mean(0) for j in range(num_blocks)]
            for t in range(T):
                p = S - T + t
                eligible = [j for j in range(num_blocks) if j * block_size <= p]
                if not eligible:
                    continue
                own = p // block_size
                gate = {j: float(q[b, h, t] @ means[j]) for j in eligible}
                ranked = sorted(eligible, key=lambda j: (j != own, -gate[j], j))
                chosen = set(ranked[:top_k])
                keys = [j for j in range(S) if j // block_size in chosen and j <= p]
                weights = torch.softmax(k[b, kv, keys] @ q[b, h, t] * scale, dim=0)
                out[b, h, t] = weights @ v[b, kv, keys]
    return out


def make_inputs(B, H, H_kv, T, S, D, D_v=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    D_v = D if D_v is None else D_v
    return (
        torch.randn(B, H, T, D, generator=g, dtype=dtype),
        torch.randn(B, H_kv, S, D, generator=g, dtype=dtype),
        torch.randn(B, H_kv, S, D_v, generator=g, dtype=dtype),
    )


CASES = [
    (2, 2, 17, 17, 4, 2),
    (4, 2, 1, 23, 5, 3),
    (4, 1, 9, 30, 4, 2),
    (2, 2, 20, 7, 3, 2),
    (2, 2, 13, 13, 4, 1),
]


@pytest.mark.parametrize(
    "H,H_kv,T,S,block_size,top_k",
    CASES,
    ids=[f"H{c[0]}-Hkv{c[1]}-T{c[2]}-S{c[3]}-bs{c[4]}-k{c[5]}" for c in CASES],
)
def test_kernel_and_reference_match_the_per_query_loop(H, H_kv, T, S, block_size, top_k):
    q, k, v = make_inputs(2, H, H_kv, T, S, 3, 2)
    expected = moba_loop(q, k, v, block_size=block_size, top_k=top_k)
    torch.testing.assert_close(moba_attention(q, k, v, block_size=block_size, top_k=top_k), expected)
    torch.testing.assert_close(moba_reference(q, k, v, block_size=block_size, top_k=top_k), expected)


@pytest.mark.parametrize("T,S", [(1, 1), (31, 31), (64, 64), (10, 75), (75, 10)])
def test_kernel_matches_dense_reference_on_awkward_shapes(T, S):
    q, k, v = make_inputs(2, 4, 2, T, S, 5, 7, seed=T * S)
    out = moba_attention(q, k, v, block_size=8, top_k=3)
    torch.testing.assert_close(out, moba_reference(q, k, v, block_size=8, top_k=3))


def test_enough_blocks_is_causal_attention():
    q, k, v = make_inputs(1, 4, 2, 12, 18, 4)
    causal = torch.arange(18).unsqueeze(0) <= torch.arange(12).unsqueeze(1) + 6
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=causal
    )
    torch.testing.assert_close(moba_attention(q, k, v, block_size=4, top_k=5), dense)
    torch.testing.assert_close(moba_attention(q, k, v, block_size=50, top_k=1), dense)  # one block: its own


def test_own_block_is_always_chosen_and_the_future_never():
    q, k, v = make_inputs(1, 2, 2, 40, 40, 4, seed=3)
    indices, valid = moba_selection(q, k, block_size=5, top_k=2)
    positions = torch.arange(40)
    assert torch.equal(indices[..., 0], (positions // 5).expand(1, 2, 40))  # forced first
    assert (indices[valid] * 5 <= positions.view(1, 1, 40, 1).expand_as(indices)[valid]).all()
    assert not valid[:, :, :5, 1].any() and valid[:, :, 5:, 1].all()  # block 0's queries have one choice
    mask = moba_mask(q, k, block_size=5, top_k=2)
    assert not (mask & (torch.arange(40).unsqueeze(0) > positions.unsqueeze(1))).any()
    # The router follows the gate: a key block made to align with the queries wins for late queries.
    k_boost = k.clone()
    k_boost[:, :, 10:15] = q[:, :, -1:].mean(dim=(0, 1), keepdim=True).expand(1, 2, 5, 4) * 10
    indices, _ = moba_selection(q, k_boost, block_size=5, top_k=2)
    late_queries = indices[:, :, -1, 1]
    assert (late_queries == 2).all()


def test_work_counts_blocks_and_shrinks_with_length():
    fractions = []
    for T in (256, 512):
        q, k, v = make_inputs(1, 2, 2, T, T, 8, dtype=torch.float32)
        _, work = moba_attention(q, k, v, block_size=32, top_k=3, return_work=True)
        positions = torch.arange(T)
        assert work.blocks_computed == 2 * int((positions // 32 + 1).clamp(max=3).sum())
        assert work.blocks_causal == 2 * int((positions // 32 + 1).sum())
        # Every computed score lies in a chosen block; the rest is padding to the busiest head.
        assert work.blocks_computed * 32 <= work.scores_computed <= 1.1 * work.blocks_computed * 32
        assert work.scores_dense == 2 * T * T
        fractions.append(work.block_fraction)
    assert fractions[0] < 0.7 and fractions[1] < fractions[0] * 0.6


def test_queries_before_the_first_key_get_zeros():
    q, k, v = make_inputs(1, 2, 2, 9, 4, 4)
    out = moba_attention(q, k, v, block_size=2, top_k=2)
    assert (out[:, :, :5] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, moba_loop(q, k, v, block_size=2, top_k=2))
    assert moba_attention(q[:, :, :0], k, v).shape == (1, 2, 0, 4)
    assert (moba_attention(q, k[:, :, :0], v[:, :, :0]) == 0).all()


def test_gradcheck():
    q, k, v = make_inputs(1, 4, 2, 10, 10, 3, 2, seed=4)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: moba_attention(*a, block_size=3, top_k=2), inputs)
    grads = torch.autograd.grad(moba_attention(*inputs, block_size=3, top_k=2).square().sum(), inputs)
    expected = torch.autograd.grad(moba_reference(*inputs, block_size=3, top_k=2).square().sum(), inputs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = make_inputs(1, 4, 2, 40, 40, 8, dtype=torch.float32, seed=5)
    out = moba_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=8, top_k=2)
    assert out.dtype == dtype
    expected = moba_reference(
        q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), block_size=8, top_k=2
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_layer_is_causal_and_differentiable():
    torch.manual_seed(0)
    layer = MixtureOfBlockAttention(16, 4, num_kv_heads=2, block_size=4, top_k=2)
    assert sum(p.numel() for p in layer.parameters()) == 16 * 16 + 2 * 16 * 8 + 16 * 16  # no router weights
    x = torch.randn(2, 21, 16)
    out, work = layer(x, return_work=True)
    assert out.shape == (2, 21, 16) and work.blocks_computed > 0
    changed = x.clone()
    changed[:, 12:] = torch.randn(2, 9, 16)
    torch.testing.assert_close(layer(changed)[:, :12], out[:, :12])
    out.square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in layer.parameters())


_q, _k, _v = make_inputs(1, 4, 2, 6, 6, 4)


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: moba_attention(_q, _k, _v, block_size=0), ValueError, "block_size"),
        (lambda: moba_attention(_q, _k, _v, top_k=0), ValueError, "top_k"),
        (lambda: moba_attention(_q, _k, _v, top_k=1.5), TypeError, "top_k"),
        (lambda: moba_attention(_q, _k, _v, scale=float("nan")), ValueError, "scale"),
        (lambda: moba_attention(_q, _k, _v, return_work="no"), TypeError, "return_work"),
        (
            lambda: moba_attention(_q, _k[:, :1].expand(1, 3, 6, 4), _v[:, :1].expand(1, 3, 6, 4)),
            ValueError,
            "num_kv_heads",
        ),
        (lambda: moba_attention(_q, _k[..., :3], _v), ValueError, "k"),
        (lambda: moba_reference(_q, _k, _v, block_size=-1), ValueError, "block_size"),
        (lambda: moba_mask(_q.long(), _k), TypeError, "q"),
        (lambda: MixtureOfBlockAttention(10, 4), ValueError, "num_heads"),
        (lambda: MixtureOfBlockAttention(8, 4, num_kv_heads=3), ValueError, "num_kv_heads"),
        (lambda: MixtureOfBlockAttention(8, 4, top_k=0), ValueError, "top_k"),
        (lambda: MixtureOfBlockAttention(8, 2)(torch.randn(5, 8)), ValueError, "x"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


@given(
    T=st.integers(1, 30),
    S=st.integers(1, 30),
    block_size=st.integers(1, 9),
    top_k=st.integers(1, 5),
    H_kv=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_kernel_equals_reference_for_any_shape(T, S, block_size, top_k, H_kv, seed):
    q, k, v = make_inputs(1, 2, H_kv, T, S, 3, 2, seed=seed)
    out = moba_attention(q, k, v, block_size=block_size, top_k=top_k)
    torch.testing.assert_close(out, moba_reference(q, k, v, block_size=block_size, top_k=top_k))
