"""NSA: the block-skipping kernel against a per-query loop written from the paper, and against
the dense reference built from explicit masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from course_lib.sparse.block_routing import attend_selected_blocks, block_means, select_blocks, selection_mask
from course_lib.sparse.nsa import (
    NativeSparseAttention,
    compressed_block_count,
    nsa_attention,
    nsa_masks,
    nsa_reference,
    overlapping_blocks,
)

# --- an independent reference: one query at a time, from the paper's description ---------------------


def nsa_loop(q, k, v, gates, *, block_size, num_selected, window, compress_block, compress_stride,
             num_initial_blocks, num_local_blocks, compressed=None, scale=None):  # fmt: skip
    q, k, v, gates = q.double(), k.double(), v.double(), gates.double()
    B, H, T, D = q.shape
    H_kv, S, D_v = k.shape[1], k.shape[2], v.shape[-1]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    l, d = compress_block, compress_stride
    N_c = (S - l) // d + 1 if S >= l else 0
    num_blocks = math.ceil(S / block_size)
    out = torch.zeros(B, H, T, D_v, dtype=torch.float64)

    def softmax_attend(query, keys, values):
        if len(keys) == 0:
            return torch.zeros(D_v, dtype=torch.float64)
        return torch.softmax(keys @ query * scale, dim=0) @ values

    for b in range(B):
        for kv in range(H_kv):
            if compressed is None:
                k_cmp = (
                    torch.stack([k[b, kv, i * d : i * d + l].mean(0) for i in range(N_c)]) if N_c else None
                )
                v_cmp = (
                    torch.stack([v[b, kv, i * d : i * d + l].mean(0) for i in range(N_c)]) if N_c else None
                )
            else:
                k_cmp, v_cmp = compressed[0][b, kv].double(), compressed[1][b, kv].double()
            for t in range(T):
                p = S - T + t
                visible = [i for i in range(N_c) if i * d + l - 1 <= p]
                # Block scores: weights of the overlapping compressed blocks, summed over the group.
                scores = [0.0] * num_blocks
                o_cmp = {}
                for h in range(kv * G, (kv + 1) * G):
                    if visible:
                        w = torch.softmax(k_cmp[visible] @ q[b, h, t] * scale, dim=0)
                        o_cmp[h] = w @ v_cmp[visible]
                        for weight, i in zip(w.tolist(), visible):
                            for j in range(num_blocks):
                                if i * d < (j + 1) * block_size and i * d + l > j * block_size:
                                    scores[j] += weight
                    else:
                        o_cmp[h] = torch.zeros(D_v, dtype=torch.float64)
                eligible = [j for j in range(num_blocks) if j * block_size <= p]
                own = p // block_size
                forced = {j for j in eligible if j < num_initial_blocks or own - num_local_blocks < j <= own}
                ranked = sorted(eligible, key=lambda j: (j not in forced, -scores[j], j))
                chosen = ranked[:num_selected]
                selected_keys = [j for j in range(S) if j // block_size in chosen and j <= p]
                window_keys = [j for j in range(S) if p - window < j <= p]
                for h in range(kv * G, (kv + 1) * G):
                    o_slc = softmax_attend(q[b, h, t], k[b, kv, selected_keys], v[b, kv, selected_keys])
                    o_win = softmax_attend(q[b, h, t], k[b, kv, window_keys], v[b, kv, window_keys])
                    g = gates[b, h, t]
                    out[b, h, t] = g[0] * o_cmp[h] + g[1] * o_slc + g[2] * o_win
    return out


def make_inputs(B, H, H_kv, T, S, D, D_v=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    D_v = D if D_v is None else D_v
    return (
        torch.randn(B, H, T, D, generator=g, dtype=dtype),
        torch.randn(B, H_kv, S, D, generator=g, dtype=dtype),
        torch.randn(B, H_kv, S, D_v, generator=g, dtype=dtype),
        torch.rand(B, H, T, 3, generator=g, dtype=dtype),
    )


SMALL = dict(block_size=4, num_selected=3, window=5, compress_block=4, compress_stride=2,
             num_initial_blocks=1, num_local_blocks=1)  # fmt: skip

LOOP_CASES = [
    (4, 2, 19, 19, SMALL),
    (2, 1, 1, 13, SMALL),  # one query (decoding), MQA
    (2, 2, 9, 22, {**SMALL, "num_local_blocks": 2, "num_initial_blocks": 0}),
    (4, 2, 14, 9, {**SMALL, "block_size": 3, "compress_block": 6, "compress_stride": 3}),  # T > S
    (2, 2, 17, 17, {**SMALL, "compress_stride": 4, "num_selected": 2}),  # non-overlapping compression
]


@pytest.mark.parametrize(
    "H,H_kv,T,S,options", LOOP_CASES, ids=[f"H{c[0]}-Hkv{c[1]}-T{c[2]}-S{c[3]}" for c in LOOP_CASES]
)
def test_kernel_and_reference_match_the_per_query_loop(H, H_kv, T, S, options):
    q, k, v, gates = make_inputs(2, H, H_kv, T, S, 3, 2)
    expected = nsa_loop(q, k, v, gates, **options)
    torch.testing.assert_close(nsa_attention(q, k, v, gates, **options), expected)
    torch.testing.assert_close(nsa_reference(q, k, v, gates, **options), expected)


@pytest.mark.parametrize("T,S", [(1, 1), (5, 5), (33, 33), (70, 70), (20, 61), (61, 20)])
def test_kernel_matches_dense_reference_on_awkward_shapes(T, S):
    q, k, v, gates = make_inputs(2, 4, 2, T, S, 5, 3, seed=T + S)
    options = dict(block_size=8, num_selected=4, window=7, compress_block=8, compress_stride=4)
    out, work = nsa_attention(q, k, v, gates, return_work=True, **options)
    torch.testing.assert_close(out, nsa_reference(q, k, v, gates, **options))
    assert work.scores_dense == 2 * 4 * T * S


def test_learned_compression_is_used_as_given():
    q, k, v, gates = make_inputs(1, 4, 2, 21, 21, 4, 3, seed=3)
    N_c = compressed_block_count(21, 4, 2)
    g = torch.Generator().manual_seed(9)
    compressed = (
        torch.randn(1, 2, N_c, 4, generator=g).double(),
        torch.randn(1, 2, N_c, 3, generator=g).double(),
    )
    out = nsa_attention(q, k, v, gates, compressed=compressed, **SMALL)
    torch.testing.assert_close(out, nsa_loop(q, k, v, gates, compressed=compressed, **SMALL))
    torch.testing.assert_close(nsa_reference(q, k, v, gates, compressed=compressed, **SMALL), out)
    assert not torch.allclose(out, nsa_attention(q, k, v, gates, **SMALL))  # it changes the result


def test_with_every_block_and_a_full_window_each_branch_is_causal_attention():
    q, k, v, gates = make_inputs(1, 4, 2, 12, 16, 4)
    causal = torch.arange(16).unsqueeze(0) <= torch.arange(12).unsqueeze(1) + 4
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=causal
    )
    everything = dict(block_size=4, num_selected=4, window=16, compress_block=4, compress_stride=4)
    for branch in (1, 2):  # selected, window
        one_hot = torch.zeros(1, 4, 12, 3, dtype=torch.float64)
        one_hot[..., branch] = 1
        torch.testing.assert_close(nsa_attention(q, k, v, one_hot, **everything), dense)


def test_selection_is_shared_by_a_gqa_group_and_counted():
    q, k, v, gates = make_inputs(1, 4, 2, 40, 40, 4, seed=5)
    options = dict(block_size=4, num_selected=3, window=4, compress_block=4, compress_stride=4,
                   num_initial_blocks=1, num_local_blocks=1)  # fmt: skip
    masks = nsa_masks(q, k, **options)
    selected = masks["selected"]  # (B, H, T, S)
    assert torch.equal(selected[:, 0], selected[:, 1]) and torch.equal(selected[:, 2], selected[:, 3])
    assert not torch.equal(selected[:, 0], selected[:, 2])
    _, work = nsa_attention(q, k, v, gates, return_work=True, **options)
    positions = torch.arange(40)
    eligible_blocks = positions // 4 + 1
    assert work.blocks_computed == 2 * int(eligible_blocks.clamp(max=3).sum())  # per KV head
    assert work.blocks_causal == 2 * int(eligible_blocks.sum())
    assert work.block_fraction < 0.5 and work.score_fraction < 1
    blocks_in_mask = selected[:, ::2].view(1, 2, 40, 10, 4).any(-1).sum()
    assert work.blocks_computed == int(blocks_in_mask)  # the counter agrees with the mask


def test_long_sequences_skip_most_blocks():
    fractions = []
    for T in (512, 1024):
        q, k, v, gates = make_inputs(1, 2, 1, T, T, 8, dtype=torch.float32)
        _, work = nsa_attention(q, k, v, gates, block_size=16, num_selected=4, window=32, compress_block=16,
                                compress_stride=8, return_work=True)  # fmt: skip
        # Scores per query head: T x N_c compressed, 16 per selected block (one KV head, so no
        # padding), and the window's bands of 32 queries x (32 + 31) keys.
        N_c = (T - 16) // 8 + 1
        assert work.blocks_computed == T * 4 - (1 + 2 + 3) * 16  # the first 3 blocks' queries have fewer
        assert work.scores_computed == 2 * (T * N_c + work.blocks_computed * 16 + T * (32 + 31))
        fractions.append((work.block_fraction, work.score_fraction))
    assert fractions[0][0] < 0.25 and fractions[0][1] < 0.4
    assert fractions[1][0] < fractions[0][0] / 1.8 and fractions[1][1] < fractions[0][1] / 1.4


def test_queries_with_nothing_to_see_get_zeros():
    # Compressed branch only: queries before the first complete compression block see nothing.
    q, k, v, _ = make_inputs(1, 2, 2, 10, 10, 4)
    only_compressed = torch.zeros(1, 2, 10, 3, dtype=torch.float64)
    only_compressed[..., 0] = 1
    out = nsa_attention(q, k, v, only_compressed, **SMALL)
    assert (out[:, :, :3] == 0).all() and (out[:, :, 3:] != 0).any() and torch.isfinite(out).all()
    # T > S: the first T - S queries have no key at all, in any branch.
    q, k, v, gates = make_inputs(1, 2, 2, 9, 4, 4)
    out, work = nsa_attention(q, k, v, gates, return_work=True, **SMALL)
    assert (out[:, :, :5] == 0).all() and torch.isfinite(out).all()
    assert work.blocks_causal == 2 * (1 + 1 + 1 + 1)  # only the last 4 queries see a key, one block each
    assert nsa_attention(q[:, :, :0], k, v, gates[:, :, :0], **SMALL).shape == (1, 2, 0, 4)
    assert (nsa_attention(q, k[:, :, :0], v[:, :, :0], gates, **SMALL) == 0).all()


def test_gradcheck():
    q, k, v, gates = make_inputs(1, 2, 1, 11, 11, 3, 2, seed=7)
    inputs = [x.requires_grad_() for x in (q, k, v, gates)]
    assert torch.autograd.gradcheck(lambda *a: nsa_attention(*a, **SMALL), inputs)
    # The same gradients as the dense reference.
    grads = torch.autograd.grad(nsa_attention(*inputs, **SMALL).square().sum(), inputs)
    expected = torch.autograd.grad(nsa_reference(*inputs, **SMALL).square().sum(), inputs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v, gates = make_inputs(1, 4, 2, 30, 30, 8, dtype=torch.float32, seed=8)
    q, k, v, gates = q.to(dtype), k.to(dtype), v.to(dtype), gates.to(dtype)
    out = nsa_attention(q, k, v, gates, **SMALL)
    assert out.dtype == dtype
    expected = nsa_reference(q.double(), k.double(), v.double(), gates.double(), **SMALL)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_shared_routing_helpers():
    x = torch.arange(10.0).view(1, 1, 5, 2)
    assert block_means(x, 2).tolist() == [[[[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]]]  # last block: one row
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.3, 0.2, 0.1, 0.0]])
    eligible = torch.tensor([[True, True, True, True], [True, True, False, False]])
    forced = torch.tensor([[False, False, False, True], [False, False, False, False]])
    indices, valid = select_blocks(scores, 3, eligible=eligible, forced=forced)
    assert indices[0].tolist() == [3, 1, 2] and valid[0].all()  # forced first, then ties to the earlier
    assert indices[1, :2].tolist() == [0, 1] and valid[1].tolist() == [True, True, False]
    mask = selection_mask(indices, valid, 2, 7)
    assert mask[1].tolist() == [True, True, True, True, False, False, False]
    blocks = overlapping_blocks(torch.arange(7.0).view(1, 1, 7, 1), 3, 2)
    assert blocks[..., 0].tolist() == [[[[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]]]]
    assert compressed_block_count(7, 3, 2) == 3 and compressed_block_count(2, 3, 2) == 0


# --- the layer -----------------------------------------------------------------------------------------


def test_layer_is_causal_and_trains_its_compression_and_gates():
    torch.manual_seed(0)
    layer = NativeSparseAttention(16, 4, num_kv_heads=2, block_size=4, num_selected=2, window=4,
                                  compress_block=4, compress_stride=2, num_local_blocks=1)  # fmt: skip
    x = torch.randn(2, 23, 16)
    out, work = layer(x, return_work=True)
    assert out.shape == (2, 23, 16) and work.blocks_computed > 0
    changed = x.clone()
    changed[:, 15:] = torch.randn(2, 8, 16)
    torch.testing.assert_close(layer(changed)[:, :15], out[:, :15])  # the future does not leak back
    out.square().sum().backward()
    for name in ("compress_k.weight", "compress_v.weight", "block_position", "gate.weight", "W_q.weight"):
        assert dict(layer.named_parameters())[name].grad.abs().sum() > 0, name


def test_linear_compression_starts_as_the_block_mean():
    torch.manual_seed(1)
    options = dict(
        block_size=4, num_selected=2, window=3, compress_block=4, compress_stride=2, num_local_blocks=1
    )
    learned = NativeSparseAttention(8, 2, compression="linear", **options)
    mean = NativeSparseAttention(8, 2, compression="mean", **options)
    mean.load_state_dict({name: p for name, p in learned.state_dict().items() if name in mean.state_dict()})
    x = torch.randn(1, 17, 8)
    torch.testing.assert_close(learned(x), mean(x), atol=1e-6, rtol=1e-5)


# --- bad input -----------------------------------------------------------------------------------------

_q, _k, _v, _g = make_inputs(1, 4, 2, 6, 6, 4)


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: nsa_attention(_q, _k, _v, _g[..., :2]), ValueError, "gates"),
        (lambda: nsa_attention(_q, _k, _v, _g.long()), TypeError, "gates"),
        (
            lambda: nsa_attention(_q, _k[:, :1].expand(1, 3, 6, 4), _v[:, :1].expand(1, 3, 6, 4), _g),
            ValueError,
            "num_kv_heads",
        ),
        (lambda: nsa_attention(_q, _k, _v, _g, block_size=0), ValueError, "block_size"),
        (lambda: nsa_attention(_q, _k, _v, _g, num_selected=0), ValueError, "num_selected"),
        (lambda: nsa_attention(_q, _k, _v, _g, num_selected=2), ValueError, "num_selected"),
        (lambda: nsa_attention(_q, _k, _v, _g, window=0), ValueError, "window"),
        (
            lambda: nsa_attention(_q, _k, _v, _g, compress_block=4, compress_stride=5),
            ValueError,
            "compress_stride",
        ),
        (lambda: nsa_attention(_q, _k, _v, _g, num_local_blocks=-1), ValueError, "num_local_blocks"),
        (lambda: nsa_attention(_q, _k, _v, _g, compressed=_k), TypeError, "compressed"),
        (
            lambda: nsa_attention(_q, _k, _v, _g, compress_block=2, compress_stride=1, compressed=(_k, _v)),
            ValueError,
            "compressed",
        ),  # fmt: skip
        (lambda: nsa_attention(_q, _k, _v, _g, scale=float("inf")), ValueError, "scale"),
        (lambda: nsa_attention(_q, _k, _v, _g, return_work=1), TypeError, "return_work"),
        (lambda: nsa_reference(_q, _k, _v, _g, window=-2), ValueError, "window"),
        # overlapping_blocks names its own arguments, block_size and stride (not NSA's options).
        (lambda: overlapping_blocks(_k, 2, 3), ValueError, "^stride=3 must be <= block_size=2"),
        (lambda: overlapping_blocks(_k, 0, 1), ValueError, "^block_size=0"),
        (lambda: overlapping_blocks(_k, 2, 0), ValueError, "^stride=0"),
        (lambda: select_blocks(torch.zeros(3), 0), ValueError, "num_selected"),
        (lambda: select_blocks(torch.zeros(3), 1, eligible=torch.ones(3)), TypeError, "eligible"),
        (lambda: NativeSparseAttention(10, 4), ValueError, "num_heads"),
        (lambda: NativeSparseAttention(8, 4, num_kv_heads=3), ValueError, "num_kv_heads"),
        (lambda: NativeSparseAttention(8, 2, compression="conv"), ValueError, "compression"),
        (lambda: NativeSparseAttention(8, 2, num_selected=1), ValueError, "num_selected"),
        (lambda: NativeSparseAttention(8, 2)(torch.randn(1, 5, 6)), ValueError, "x"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


@given(
    T=st.integers(1, 30),
    S=st.integers(1, 30),
    block_size=st.integers(1, 8),
    extra_selected=st.integers(0, 3),
    window=st.integers(1, 12),
    compress=st.tuples(st.integers(1, 8), st.integers(1, 8)).filter(lambda lc: lc[1] <= lc[0]),
    local=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    seed=st.integers(0, 1000),
)
def test_kernel_equals_reference_for_any_options(
    T, S, block_size, extra_selected, window, compress, local, seed
):
    q, k, v, gates = make_inputs(1, 2, 1, T, S, 3, 2, seed=seed)
    options = dict(block_size=block_size, num_selected=max(1, sum(local) + extra_selected), window=window,
                   compress_block=compress[0], compress_stride=compress[1],
                   num_initial_blocks=local[0], num_local_blocks=local[1])  # fmt: skip
    torch.testing.assert_close(
        nsa_attention(q, k, v, gates, **options), nsa_reference(q, k, v, gates, **options)
    )


def test_attend_selected_blocks_checks_its_inputs_by_name():
    q, k = torch.randn(1, 1, 2, 3, 4), torch.randn(1, 1, 5, 4)
    indices, valid = torch.zeros(1, 1, 1, 3, 2, dtype=torch.long), torch.ones(1, 1, 1, 3, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="^v must have the dtype of q"):
        attend_selected_blocks(q, k, k.double(), indices, valid, 2, scale=1.0)
    with pytest.raises(ValueError, match="^indices must have shape"):
        attend_selected_blocks(q, k, k, indices[..., :2, :], valid, 2, scale=1.0)
    with pytest.raises(ValueError, match="^indices must choose"):
        attend_selected_blocks(torch.randn(1, 1, 3, 3, 4), k, k, indices.expand(1, 1, 2, 3, 2), valid.expand(
            1, 1, 2, 3, 2), 2, scale=1.0)  # fmt: skip


def test_select_blocks_refuses_flags_that_would_grow_the_scores():
    scores = torch.randn(3, 4)
    # A (2, 3, 4) `forced` used to broadcast the choice to shape (2, 3, n) silently.
    with pytest.raises(ValueError, match="^forced must have at most 2 dims"):
        select_blocks(scores, 2, forced=torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="^eligible of shape"):
        select_blocks(scores, 2, eligible=torch.ones(2, 4, dtype=torch.bool))
    indices, valid = select_blocks(scores, 2, eligible=torch.ones(4, dtype=torch.bool))
    assert indices.shape == valid.shape == (3, 2)
