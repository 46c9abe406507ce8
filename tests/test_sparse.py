"""Tests for course_lib.sparse: masks vs loop-built definitions, kernels vs dense float64 attention."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib.sparse import (
    AdaptiveWindowAttention,
    LearnedSparseAttention,
    MaskStats,
    bigbird_layout,
    bigbird_mask,
    block_sparse_attention,
    block_sparse_mask,
    dilated_mask,
    eviction_error,
    global_local_mask,
    h2o_keep,
    keep_mask,
    kept_attention,
    layers_to_connect,
    lsh_attention,
    lsh_buckets,
    mask_stats,
    neighborhood_attention_2d,
    neighborhood_mask_2d,
    reachability,
    sliding_window_attention,
    sliding_window_mask,
    streaming_keep,
    strided_mask,
    topk_attention,
)

# --- independent references --------------------------------------------------------------------


def dense_reference(q, k, v, allowed=None, scale=None):
    """Naive float64 masked softmax attention; a row with nothing allowed returns zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if allowed is None:
        return torch.softmax(scores, dim=-1) @ v
    allowed = allowed.expand_as(scores)
    scores = scores.masked_fill(~allowed, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def loop_mask(T, S, allowed):
    """A (T, S) bool mask built one entry at a time from a predicate allowed(i, j)."""
    return torch.tensor([[bool(allowed(i, j)) for j in range(S)] for i in range(T)], dtype=torch.bool)


def random_qkv(B, H, T, S, D, D_v=None, dtype=torch.float64):
    D_v = D if D_v is None else D_v
    return (
        torch.randn(B, H, T, D, dtype=dtype),
        torch.randn(B, H, S, D, dtype=dtype),
        torch.randn(B, H, S, D_v, dtype=dtype),
    )


def window_predicate(T, S, window, causal):
    def allowed(i, j):
        distance = (S - T + i) - j
        return 0 <= distance < window if causal else abs(distance) < window

    return allowed


# --- masks ---------------------------------------------------------------------------------------

WINDOW_CASES = [(6, 6, 3), (7, 7, 1), (5, 9, 2), (9, 5, 4), (4, 4, 10), (1, 1, 1), (1, 6, 3)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("T,S,window", WINDOW_CASES, ids=[f"T{t}-S{s}-w{w}" for t, s, w in WINDOW_CASES])
def test_sliding_window_mask_matches_loops(T, S, window, causal):
    expected = loop_mask(T, S, window_predicate(T, S, window, causal))
    assert torch.equal(sliding_window_mask(T, window, S, causal=causal), expected)


def test_causal_window_is_symmetric_window_cut_by_causal_triangle():
    symmetric = sliding_window_mask(10, 3, causal=False)
    assert torch.equal(sliding_window_mask(10, 3), symmetric & torch.ones(10, 10, dtype=torch.bool).tril())
    assert int(sliding_window_mask(10, 3)[-1].sum()) == 3  # the window counts the query itself


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("T,S,window,dilation", [(12, 12, 3, 2), (10, 13, 2, 3), (5, 5, 4, 1), (7, 7, 1, 4)])
def test_dilated_mask_matches_loops(T, S, window, dilation, causal):
    expected = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        position = S - T + i
        for step in range(window):
            for j in (
                {position - step * dilation, position + step * dilation}
                if not causal
                else {position - step * dilation}
            ):
                if 0 <= j < S:
                    expected[i, j] = True
    assert torch.equal(dilated_mask(T, window, dilation, S, causal=causal), expected)


def test_dilation_one_is_sliding_window():
    assert torch.equal(dilated_mask(9, 4, 1), sliding_window_mask(9, 4))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("T,stride", [(16, 4), (10, 3), (1, 2), (7, 1)])
def test_strided_pattern_matches_sparse_transformer_definition(T, stride, causal):
    # Child et al. 2019: A1 = previous `stride` positions, A2 = (i - j) mod stride == 0.
    def allowed(i, j):
        if causal and j > i:
            return False
        return abs(i - j) < stride or (i - j) % stride == 0

    assert torch.equal(strided_mask(T, stride, causal=causal), loop_mask(T, T, allowed))


@pytest.mark.parametrize("summary", [1, 2])
@pytest.mark.parametrize("T,stride", [(16, 4), (11, 3)])
def test_fixed_pattern_matches_sparse_transformer_definition(T, stride, summary):
    # A1 = same block floor(j/l) == floor(i/l); A2 = j mod l in {l - c, ..., l - 1}; causal.
    def allowed(i, j):
        return j <= i and (j // stride == i // stride or j % stride >= stride - summary)

    assert torch.equal(strided_mask(T, stride, pattern="fixed", summary=summary), loop_mask(T, T, allowed))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_global_local_mask_matches_loops(causal):
    T, window, global_tokens = 11, 2, [0, 7]

    def allowed(i, j):
        if causal and j > i:
            return False
        return abs(i - j) < window or i in global_tokens or j in global_tokens

    expected = loop_mask(T, T, allowed)
    assert torch.equal(global_local_mask(T, window, global_tokens, causal=causal), expected)
    assert torch.equal(global_local_mask(T, window, torch.tensor(global_tokens), causal=causal), expected)


def test_bigbird_is_reproducible_and_contains_window_global_and_random_blocks():
    first = bigbird_mask(40, 4, seed=3, random_blocks=2)
    assert torch.equal(first, bigbird_mask(40, 4, seed=3, random_blocks=2))
    assert torch.equal(
        first, bigbird_mask(40, 4, generator=torch.Generator().manual_seed(3), random_blocks=2)
    )
    assert not torch.equal(first, bigbird_mask(40, 4, seed=4, random_blocks=2))
    layout = bigbird_layout(10, seed=3, random_blocks=2)
    for a in range(10):
        for b in range(10):
            if abs(a - b) <= 1 or a == 0 or b == 0:
                assert layout[a, b], (a, b)
    # Every non-global row: 3 window blocks (2 at the ends) + 1 global + 2 random, counted loop-wise.
    for a in range(1, 10):
        window_and_global = len({b for b in range(10) if abs(a - b) <= 1} | {0})
        assert int(layout[a].sum()) == window_and_global + 2
    assert torch.equal(first, block_sparse_mask(layout, 4))


def test_bigbird_causal_stays_in_the_past_and_handles_partial_last_block():
    mask = bigbird_mask(18, 4, causal=True, seed=0)
    assert mask.shape == (18, 18)
    assert not torch.triu(mask, diagonal=1).any()
    assert mask.diagonal().all()


@pytest.mark.parametrize("T,S,block", [(8, 8, 4), (7, 10, 3), (1, 1, 2)])
def test_block_sparse_mask_matches_loops(T, S, block):
    layout = torch.rand(-(-T // block), -(-S // block)) > 0.4
    expected = loop_mask(T, S, lambda i, j: layout[i // block, j // block])
    assert torch.equal(block_sparse_mask(layout, block, T, S), expected)


def nat_mask_by_loops(height, width, kernel):
    """NAT border rule written out: shift the window inwards where it would leave the image."""

    def start(index, length):
        first = index - kernel // 2
        if first < 0:
            return 0
        if first + kernel > length:
            return length - kernel
        return first

    mask = torch.zeros(height * width, height * width, dtype=torch.bool)
    for r in range(height):
        for c in range(width):
            for rr in range(start(r, height), start(r, height) + kernel):
                for cc in range(start(c, width), start(c, width) + kernel):
                    mask[r * width + c, rr * width + cc] = True
    return mask


@pytest.mark.parametrize("height,width,kernel", [(5, 6, 3), (4, 4, 4), (3, 7, 1), (6, 5, 2)])
def test_neighborhood_mask_matches_nat_definition(height, width, kernel):
    mask = neighborhood_mask_2d(height, width, kernel)
    assert torch.equal(mask, nat_mask_by_loops(height, width, kernel))
    assert (mask.sum(-1) == kernel * kernel).all()


# --- reachability and cost ------------------------------------------------------------------------


def layers_by_search(mask):
    """Smallest L with every target pair reachable through <= L hops of the mask graph (sets)."""
    T = len(mask)
    neighbours = [{j for j in range(T) if mask[i, j]} | {i} for i in range(T)]
    looks_ahead = any(mask[i, j] for i in range(T) for j in range(i + 1, T))
    targets = [{j for j in range(T) if looks_ahead or j <= i} for i in range(T)]
    reach = [{i} for i in range(T)]
    for layers in range(0, T + 1):
        if all(targets[i] <= reach[i] for i in range(T)):
            return layers
        reach = [set().union(*(neighbours[m] for m in reach[i])) for i in range(T)]
    return None


@pytest.mark.parametrize(
    "mask",
    [
        sliding_window_mask(16, 4),
        sliding_window_mask(16, 4, causal=False),
        strided_mask(16, 4),
        strided_mask(16, 4, pattern="fixed"),
        dilated_mask(12, 2, 3),
        global_local_mask(12, 2, [0]),
        block_sparse_mask(torch.eye(3, dtype=torch.bool), 4),
        torch.ones(5, 5, dtype=torch.bool).tril(),
        torch.eye(1, dtype=torch.bool),
    ],
    ids=[
        "window",
        "window-sym",
        "strided",
        "fixed",
        "dilated",
        "global-local",
        "disjoint-blocks",
        "causal",
        "T1",
    ],
)
def test_layers_to_connect_matches_breadth_first_search(mask):
    assert layers_to_connect(mask) == layers_by_search(mask)


@given(st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_layers_to_connect_on_random_masks(T, seed):
    mask = torch.rand(T, T, generator=torch.Generator().manual_seed(seed)) < 0.25
    assert layers_to_connect(mask) == layers_by_search(mask)


def test_reachability_is_the_power_of_one_layer():
    mask = sliding_window_mask(10, 2)
    assert torch.equal(reachability(mask, 0), torch.eye(10, dtype=torch.bool))
    for layers in range(1, 4):
        assert torch.equal(reachability(mask, layers), sliding_window_mask(10, layers + 1))
    assert layers_to_connect(sliding_window_mask(64, 8)) == math.ceil(63 / 7)  # the notebook's rule


def test_mask_stats_counts_by_hand():
    mask = sliding_window_mask(8, 3)
    stats = mask_stats(mask, head_dim=16, value_dim=8)
    allowed = sum(min(i + 1, 3) for i in range(8))
    assert isinstance(stats, MaskStats)
    assert stats.allowed_pairs == allowed
    assert stats.density == pytest.approx(allowed / 64)
    assert stats.dense_flops == 2 * 64 * (16 + 8)
    assert stats.sparse_flops == 2 * allowed * (16 + 8)
    assert stats.flops_saved == pytest.approx(1 - allowed / 64)
    assert stats.layers_to_connect == 4
    assert mask_stats(torch.ones(3, 5, dtype=torch.bool)).layers_to_connect is None


# --- sliding window attention ----------------------------------------------------------------------

SWA_CASES = [
    # B, H, T, S, D, D_v, window, block_size
    (2, 3, 13, 13, 5, 5, 4, None),
    (1, 2, 16, 16, 4, 3, 16, None),
    (1, 1, 10, 10, 3, 3, 25, None),
    (1, 2, 11, 11, 4, 4, 1, None),
    (1, 1, 1, 1, 4, 4, 3, None),
    (1, 1, 1, 9, 4, 4, 3, None),
    (2, 1, 7, 12, 5, 2, 3, 2),
    (1, 2, 12, 5, 3, 3, 2, 5),
    (1, 1, 9, 9, 2, 2, 3, 7),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize(
    "B,H,T,S,D,D_v,window,block_size",
    SWA_CASES,
    ids=[f"B{b}-H{h}-T{t}-S{s}-D{d}-Dv{dv}-w{w}-blk{bs}" for b, h, t, s, d, dv, w, bs in SWA_CASES],
)
def test_sliding_window_attention_equals_dense_with_window_mask(
    B, H, T, S, D, D_v, window, block_size, causal
):
    q, k, v = random_qkv(B, H, T, S, D, D_v)
    expected = dense_reference(q, k, v, loop_mask(T, S, window_predicate(T, S, window, causal)))
    out = sliding_window_attention(q, k, v, window, causal=causal, block_size=block_size)
    torch.testing.assert_close(out, expected)


def test_sliding_window_attention_matches_sdpa_and_uses_scale():
    q, k, v = random_qkv(2, 2, 10, 10, 4)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(10, 3), scale=0.3)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 3, scale=0.3), expected)


def test_sliding_window_attention_queries_with_no_keys_get_zeros():
    q, k, v = random_qkv(1, 1, 8, 3, 4)  # causal, T > S: the first 5 queries see nothing
    out = sliding_window_attention(q, k, v, 2)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    torch.testing.assert_close(
        out, dense_reference(q, k, v, loop_mask(8, 3, window_predicate(8, 3, 2, True)))
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sliding_window_attention_half_precision(dtype):
    q, k, v = random_qkv(1, 2, 21, 21, 8, dtype=dtype)
    out = sliding_window_attention(q, k, v, 5)
    assert out.dtype == dtype
    expected = dense_reference(q, k, v, sliding_window_mask(21, 5))
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_sliding_window_attention_gradcheck():
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 2, 6, 6, 3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: sliding_window_attention(a, b, c, 2, block_size=4), (q, k, v)
    )


@given(
    T=st.integers(1, 20),
    extra_keys=st.integers(-5, 5),
    window=st.integers(1, 24),
    block_size=st.integers(1, 9),
    causal=st.booleans(),
)
def test_sliding_window_attention_property(T, extra_keys, window, block_size, causal):
    S = max(1, T + extra_keys)
    q, k, v = random_qkv(1, 1, T, S, 3)
    expected = dense_reference(q, k, v, sliding_window_mask(T, window, S, causal=causal))
    out = sliding_window_attention(q, k, v, window, causal=causal, block_size=block_size)
    torch.testing.assert_close(out, expected)


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage any operation produces (views count their storage once)."""

    def __init__(self):
        super().__init__()
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for out in outputs:
            if isinstance(out, torch.Tensor):
                self.largest_bytes = max(self.largest_bytes, out.untyped_storage().nbytes())
        return result


def largest_allocation(fn):
    with LargestAllocation() as recorder:
        fn()
    return recorder.largest_bytes


def test_sliding_window_attention_never_allocates_a_T_by_T_tensor():
    window, D = 16, 8

    def run(T):
        q, k, v = random_qkv(1, 1, T, T, D, dtype=torch.float32)
        return largest_allocation(lambda: sliding_window_attention(q, k, v, window))

    small, large = run(1024), run(2048)
    dense_scores_bytes = 2048 * 2048 * 4
    assert large <= dense_scores_bytes / 32
    assert large <= 2.2 * small  # doubling T at most doubles the largest tensor: linear memory
    q, k, v = random_qkv(1, 1, 2048, 2048, D, dtype=torch.float32)
    dense = largest_allocation(
        lambda: dense_reference(q.float(), k.float(), v.float(), sliding_window_mask(2048, 16))
    )
    assert dense >= dense_scores_bytes  # the recorder does see a dense T x T allocation


# --- block-sparse attention ------------------------------------------------------------------------

BLOCK_CASES = [
    # B, H, T, S, D, block, per_head_layout
    (2, 2, 12, 12, 4, 4, False),
    (1, 3, 13, 13, 3, 4, True),
    (1, 2, 9, 14, 5, 3, False),
    (1, 1, 1, 1, 2, 4, False),
    (1, 2, 7, 5, 3, 8, True),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(
    "B,H,T,S,D,block,per_head",
    BLOCK_CASES,
    ids=[
        f"B{b}-H{h}-T{t}-S{s}-D{d}-blk{bs}-{'perhead' if p else 'shared'}"
        for b, h, t, s, d, bs, p in BLOCK_CASES
    ],
)
def test_block_sparse_attention_equals_dense_with_block_mask(B, H, T, S, D, block, per_head, causal):
    q, k, v = random_qkv(B, H, T, S, D)
    shape = (H, -(-T // block), -(-S // block)) if per_head else (-(-T // block), -(-S // block))
    layout = torch.rand(shape) > 0.5
    heads_layout = layout if per_head else layout.expand(H, *layout.shape)
    allowed = torch.stack(
        [
            loop_mask(
                T,
                S,
                lambda i, j, h=h: heads_layout[h, i // block, j // block] and (not causal or j <= S - T + i),
            )
            for h in range(H)
        ]
    )
    out = block_sparse_attention(q, k, v, layout, block, causal=causal)
    torch.testing.assert_close(out, dense_reference(q, k, v, allowed))


@given(
    T=st.integers(1, 14),
    S=st.integers(1, 14),
    block=st.integers(1, 6),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_sparse_attention_property(T, S, block, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    layout = torch.rand(-(-T // block), -(-S // block), generator=generator) > 0.5
    q, k, v = random_qkv(1, 2, T, S, 3)
    allowed = block_sparse_mask(layout, block, T, S)
    if causal:
        allowed = allowed & loop_mask(T, S, lambda i, j: j <= S - T + i)
    out = block_sparse_attention(q, k, v, layout, block, causal=causal)
    torch.testing.assert_close(out, dense_reference(q, k, v, allowed))


def test_block_sparse_attention_empty_layout_gives_zeros_and_full_layout_gives_attention():
    q, k, v = random_qkv(1, 2, 10, 10, 4)
    empty = block_sparse_attention(q, k, v, torch.zeros(3, 3, dtype=torch.bool), 4)
    assert torch.equal(empty, torch.zeros_like(empty))
    full = block_sparse_attention(q, k, v, torch.ones(3, 3, dtype=torch.bool), 4)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_block_sparse_attention_half_precision(dtype):
    q, k, v = random_qkv(1, 2, 16, 16, 8, dtype=dtype)
    layout = bigbird_layout(4, seed=1)
    out = block_sparse_attention(q, k, v, layout, 4)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), dense_reference(q, k, v, block_sparse_mask(layout, 4)), atol=2e-2, rtol=2e-2
    )


def test_block_sparse_attention_gradcheck():
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 1, 5, 5, 2))
    layout = torch.tensor([[True, False], [True, True]])
    assert torch.autograd.gradcheck(
        lambda a, b, c: block_sparse_attention(a, b, c, layout, 3, causal=True), (q, k, v)
    )


def test_block_sparse_attention_agrees_with_flex_attention_block_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    T, block = 256, 128  # FlexAttention's default block size is 128
    layout = torch.tensor([[True, False], [True, True]])
    q, k, v = random_qkv(1, 1, T, T, 8, dtype=torch.float32)

    def mask_mod(b, h, query, key):
        return layout[query // block, key // block]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block_mask = flex.create_block_mask(mask_mod, None, None, T, T, device="cpu")
            expected = flex.flex_attention(q, k, v, block_mask=block_mask)
    except Exception as error:  # FlexAttention is not available on every build and device
        pytest.skip(f"FlexAttention does not run here: {error}")
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, block), expected, atol=1e-5, rtol=1e-5)


# --- top-k attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [5, 9, 100], ids=["k=S", "k>S", "k>>S"])
def test_topk_with_k_at_least_S_is_full_attention(top_k):
    q, k, v = random_qkv(2, 2, 7, 5, 3)
    torch.testing.assert_close(topk_attention(q, k, v, top_k), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_topk_attention_equals_dense_with_loop_built_topk_mask(top_k):
    B, H, T, S, D = 1, 2, 6, 9, 4
    q, k, v = random_qkv(B, H, T, S, D)
    scores = (q @ k.transpose(-2, -1)).tolist()
    allowed = torch.zeros(B, H, T, S, dtype=torch.bool)
    for h in range(H):
        for i in range(T):
            best = sorted(range(S), key=lambda j, row=scores[0][h][i]: -row[j])[:top_k]
            allowed[0, h, i, best] = True
    torch.testing.assert_close(topk_attention(q, k, v, top_k), dense_reference(q, k, v, allowed))


@given(T=st.integers(1, 8), S=st.integers(1, 8), top_k=st.integers(1, 10))
def test_topk_attention_property_keeps_the_best_keys(T, S, top_k):
    q, k, v = random_qkv(1, 1, T, S, 3)
    scores = q @ k.transpose(-2, -1)
    # The k-th largest score per row is the threshold; keys at or above it are kept.
    threshold = scores.sort(dim=-1, descending=True).values[..., min(top_k, S) - 1 : min(top_k, S)]
    torch.testing.assert_close(topk_attention(q, k, v, top_k), dense_reference(q, k, v, scores >= threshold))


def test_topk_attention_respects_mask_and_causal_and_empty_rows():
    q, k, v = random_qkv(1, 1, 6, 4, 3)
    out = topk_attention(q, k, v, 2, causal=True)  # T > S: the first two queries see nothing
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    # Query 2 (position 0) sees one key only: k=2 must not invent a second one.
    torch.testing.assert_close(out[0, 0, 2], v[0, 0, 0])
    mask = torch.tensor([True, False, True, True])
    torch.testing.assert_close(topk_attention(q, k, v, 4, mask), dense_reference(q, k, v, mask))


def test_topk_attention_half_precision():
    q, k, v = random_qkv(1, 1, 8, 8, 4, dtype=torch.float16)
    out = topk_attention(q, k, v, 8)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), dense_reference(q, k, v), atol=1e-2, rtol=1e-2)


# --- LSH attention --------------------------------------------------------------------------------


def reformer_dense(qk, v, allowed):
    """Dense shared-QK attention: keys normalised, no self unless nothing else is allowed."""
    T = qk.shape[-2]
    eye = torch.eye(T, dtype=torch.bool)
    others = allowed & ~eye
    allowed = torch.where(others.any(-1, keepdim=True), others, allowed & eye)
    return dense_reference(qk, F.normalize(qk, dim=-1), v, allowed)


@pytest.mark.parametrize("num_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_lsh_with_one_bucket_and_one_chunk_is_dense_shared_qk_attention(T, causal, num_hashes):
    qk, _, v = random_qkv(2, 2, T, T, 4)
    allowed = loop_mask(T, T, lambda i, j: not causal or j <= i)
    out = lsh_attention(qk, v, num_buckets=1, chunk_size=T + 3, num_hashes=num_hashes, causal=causal)
    torch.testing.assert_close(out, reformer_dense(qk, v, allowed))


def lsh_allowed_by_loops(buckets, chunk_size, causal):
    """One hash round: sort (bucket, position), chunk, same bucket in own or previous chunk."""
    T = len(buckets)
    order = sorted(range(T), key=lambda p: (buckets[p], p))
    slot = {position: s for s, position in enumerate(order)}

    def allowed(i, j):
        chunk_i, chunk_j = slot[i] // chunk_size, slot[j] // chunk_size
        near = chunk_j in (chunk_i, chunk_i - 1)
        return near and buckets[i] == buckets[j] and (not causal or j <= i)

    return loop_mask(T, T, allowed)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("T,num_buckets,chunk_size", [(16, 4, 3), (11, 2, 4), (12, 6, 2)])
def test_lsh_attention_equals_dense_with_its_bucket_mask(T, num_buckets, chunk_size, causal):
    qk, _, v = random_qkv(1, 2, T, T, 4, D_v=3)
    buckets = lsh_buckets(qk, num_buckets, seed=5)
    out = lsh_attention(qk, v, num_buckets=num_buckets, chunk_size=chunk_size, causal=causal, seed=5)
    for h in range(2):
        allowed = lsh_allowed_by_loops(buckets[0, h, 0].tolist(), chunk_size, causal)
        torch.testing.assert_close(out[0, h], reformer_dense(qk[0, h], v[0, h], allowed))


def test_lsh_attention_combines_hash_rounds_by_their_normalisers():
    T, chunk_size = 12, 3
    qk, _, v = random_qkv(1, 1, T, T, 4)
    buckets = lsh_buckets(qk, 4, num_hashes=2, seed=9)
    outputs, normalisers = [], []
    keys = F.normalize(qk[0, 0], dim=-1)
    for r in range(2):
        allowed = lsh_allowed_by_loops(buckets[0, 0, r].tolist(), chunk_size, False)
        others = allowed & ~torch.eye(T, dtype=torch.bool)
        allowed = torch.where(others.any(-1, keepdim=True), others, allowed & torch.eye(T, dtype=torch.bool))
        scores = (qk[0, 0] @ keys.T * 0.5).masked_fill(~allowed, -math.inf)
        normalisers.append(torch.logsumexp(scores, -1))
        outputs.append(torch.softmax(scores, -1) @ v[0, 0])
    weights = torch.softmax(torch.stack(normalisers), dim=0)
    expected = weights[0, :, None] * outputs[0] + weights[1, :, None] * outputs[1]
    out = lsh_attention(qk, v, num_buckets=4, chunk_size=chunk_size, num_hashes=2, seed=9)
    torch.testing.assert_close(out[0, 0], expected)


def test_lsh_is_seeded():
    qk, _, v = random_qkv(1, 2, 16, 16, 4)
    first = lsh_attention(qk, v, num_buckets=4, chunk_size=4, seed=1)
    assert torch.equal(
        first, lsh_attention(qk, v, num_buckets=4, chunk_size=4, generator=torch.Generator().manual_seed(1))
    )
    assert not torch.equal(lsh_buckets(qk, 8, seed=1), lsh_buckets(qk, 8, seed=2))


def test_lsh_buckets_put_parallel_vectors_together():
    direction = torch.randn(4, dtype=torch.float64)
    qk = torch.stack([direction * s for s in (0.5, 1.0, 3.0)]).view(1, 1, 3, 4)
    buckets = lsh_buckets(qk, 8, num_hashes=4, seed=0)
    assert (buckets == buckets[..., :1]).all()
    assert ((buckets >= 0) & (buckets < 8)).all()


def test_lsh_attention_half_precision_is_finite_and_close():
    qk, _, v = random_qkv(1, 1, 10, 10, 8, dtype=torch.float16)
    out = lsh_attention(qk, v, num_buckets=1, chunk_size=10)
    assert out.dtype == torch.float16
    expected = reformer_dense(qk.double(), v.double(), torch.ones(10, 10, dtype=torch.bool))
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


# --- neighbourhood attention ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height,width,kernel,D_v", [(5, 6, 3, 4), (4, 4, 4, 2), (3, 7, 1, 3), (6, 5, 2, 5), (1, 1, 1, 2)]
)
def test_neighborhood_attention_equals_dense_masked_attention(height, width, kernel, D_v):
    B, H, D = 2, 2, 3
    q = torch.randn(B, H, height, width, D, dtype=torch.float64)
    k = torch.randn(B, H, height, width, D, dtype=torch.float64)
    v = torch.randn(B, H, height, width, D_v, dtype=torch.float64)
    out = neighborhood_attention_2d(q, k, v, kernel)
    flat = [x.flatten(2, 3) for x in (q, k, v)]
    expected = dense_reference(*flat, nat_mask_by_loops(height, width, kernel))
    torch.testing.assert_close(out.flatten(2, 3), expected)


def test_neighborhood_attention_gradcheck_and_half():
    q, k, v = (torch.randn(1, 1, 3, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: neighborhood_attention_2d(a, b, c, 2), (q, k, v))
    half = neighborhood_attention_2d(q.detach().half(), k.detach().half(), v.detach().half(), 3)
    assert half.dtype == torch.float16
    torch.testing.assert_close(
        half.double(), neighborhood_attention_2d(q.detach(), k.detach(), v.detach(), 3), atol=1e-2, rtol=1e-2
    )


# --- learned sparsity --------------------------------------------------------------------------------


def reference_self_attention(layer, x, allowed=None):
    B, T, E = x.shape
    H = layer.num_heads

    def split(y):
        return y.view(B, T, H, E // H).transpose(1, 2)

    out = dense_reference(split(layer.W_q(x)), split(layer.W_k(x)), split(layer.W_v(x)), allowed)
    return layer.W_o(out.transpose(1, 2).reshape(B, T, E).to(x.dtype))


def test_learned_gate_keeping_everything_with_open_gate_is_plain_attention():
    layer = LearnedSparseAttention(8, 2, keep_ratio=1.0).double()
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.fill_(60.0)  # sigmoid(60) == 1 in float64 up to 1e-26
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_self_attention(layer, x))


def test_learned_gate_keeps_the_top_keys_and_gets_a_gradient_without_nan():
    layer = LearnedSparseAttention(8, 2, keep_ratio=0.25, causal=True).double()
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    out, kept = layer(x, return_keep=True)
    assert kept.shape == (2, 2, 2)
    gate = layer.gate(x).transpose(1, 2)
    for b in range(2):
        for h in range(2):
            row = gate[b, h].tolist()
            best = sorted(range(8), key=lambda j, row=row: -row[j])[:2]
            assert kept[b, h].tolist() == sorted(best)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert torch.isfinite(layer.gate.weight.grad).all() and layer.gate.weight.grad.abs().sum() > 0


def test_learned_gate_rows_with_nothing_kept_return_zeros_not_nan():
    layer = LearnedSparseAttention(4, 1, keep_ratio=0.0).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.W_o.bias.expand(1, 5, 4))
    causal = LearnedSparseAttention(4, 1, keep_ratio=0.2, causal=True).double()
    with torch.no_grad():
        causal.gate.weight.zero_()
        causal.gate.bias.zero_()
        x[0, -1] = 0.0
    # With a constant gate, topk keeps one key; queries before it see nothing and must be finite.
    out = causal(x)
    assert torch.isfinite(out).all()


def test_adaptive_window_predictor_receives_a_gradient():
    layer = AdaptiveWindowAttention(8, 2, min_window=1, max_window=6).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    out, window = layer(x, return_window=True)
    assert ((window >= 1) & (window <= 6)).all()
    out.pow(2).sum().backward()
    grad = layer.window_predictor.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("gate_bias,expected_window", [(40.0, 6), (-40.0, 2)], ids=["widest", "narrowest"])
def test_adaptive_window_at_its_limits_is_a_hard_sliding_window(gate_bias, expected_window, causal):
    layer = AdaptiveWindowAttention(
        8, 2, min_window=2, max_window=6, causal=causal, temperature=0.01
    ).double()
    with torch.no_grad():
        layer.window_predictor.weight.zero_()
        layer.window_predictor.bias.fill_(gate_bias)
    x = torch.randn(1, 11, 8, dtype=torch.float64)
    allowed = loop_mask(11, 11, window_predicate(11, 11, expected_window, causal))
    torch.testing.assert_close(layer(x), reference_self_attention(layer, x, allowed))


# --- KV eviction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_len,budget,num_sinks", [(20, 8, 4), (20, 4, 4), (9, 9, 2), (5, 12, 4), (30, 6, 0)]
)
def test_streaming_keep_is_sinks_plus_recent(seq_len, budget, num_sinks):
    kept = streaming_keep(seq_len, budget, num_sinks=num_sinks).tolist()
    if budget >= seq_len:
        assert kept == list(range(seq_len))
    else:
        assert len(kept) == budget
        assert kept[:num_sinks] == list(range(num_sinks))
        assert kept[num_sinks:] == list(range(seq_len - budget + num_sinks, seq_len))


@pytest.mark.parametrize("budget,recent", [(6, None), (6, 0), (6, 6), (4, 1)])
def test_h2o_keep_is_recent_plus_heaviest_hitters(budget, recent):
    weights = torch.softmax(torch.randn(2, 3, 5, 16), dim=-1)
    kept = h2o_keep(weights, budget, recent=recent)
    recent = budget // 2 if recent is None else recent
    assert kept.shape == (2, 3, budget)
    for b in range(2):
        for h in range(3):
            totals = [float(weights[b, h, :, j].sum()) for j in range(16)]
            heavy = sorted(range(16 - recent), key=lambda j: -totals[j])[: budget - recent]
            assert kept[b, h].tolist() == sorted(heavy + list(range(16 - recent, 16)))


def test_h2o_keep_with_budget_above_length_keeps_all():
    assert h2o_keep(torch.rand(4, 5), 9).tolist() == list(range(5))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_kept_attention_equals_dense_attention_masked_to_the_kept_keys(causal):
    q, k, v = random_qkv(2, 3, 4, 12, 5)
    weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    for keep in (streaming_keep(12, 6, num_sinks=2), h2o_keep(weights, 5)):
        allowed = keep_mask(keep, 12).unsqueeze(-2)
        if causal:
            allowed = allowed & loop_mask(4, 12, lambda i, j: j <= 8 + i)
        torch.testing.assert_close(
            kept_attention(q, k, v, keep, causal=causal), dense_reference(q, k, v, allowed)
        )


def test_eviction_error_is_zero_with_everything_kept_and_positive_otherwise():
    q, k, v = random_qkv(1, 2, 1, 32, 8)
    assert eviction_error(q, k, v, streaming_keep(32, 64)) == pytest.approx(0.0, abs=1e-12)
    error = eviction_error(q, k, v, streaming_keep(32, 8))
    kept = dense_reference(q, k, v, keep_mask(streaming_keep(32, 8), 32))
    full = dense_reference(q, k, v)
    assert error == pytest.approx(float((kept - full).norm() / full.norm()))
    assert error > 0


def test_keep_mask_marks_exactly_the_kept_indices():
    mask = keep_mask(torch.tensor([[0, 3], [1, 2]]), 5)
    assert mask.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]


# --- bad input -----------------------------------------------------------------------------------------

Q, K, V = random_qkv(1, 2, 6, 6, 4, dtype=torch.float32)
LAYOUT = torch.ones(2, 2, dtype=torch.bool)
IMAGE = torch.randn(1, 1, 4, 4, 3)

BAD_INPUTS = [
    ("window-zero", lambda: sliding_window_mask(4, 0), ValueError, "window"),
    ("window-float", lambda: sliding_window_mask(4, 2.0), TypeError, "window"),
    ("window-T", lambda: sliding_window_mask(-1, 2), ValueError, "T"),
    ("window-causal", lambda: sliding_window_mask(4, 2, causal=1), TypeError, "causal"),
    ("dilated-dilation", lambda: dilated_mask(4, 2, 0), ValueError, "dilation"),
    ("dilated-S", lambda: dilated_mask(4, 2, 1, S=-1), ValueError, "S"),
    ("strided-stride", lambda: strided_mask(4, 0), ValueError, "stride"),
    ("strided-pattern", lambda: strided_mask(4, 2, pattern="diagonal"), ValueError, "pattern"),
    ("strided-summary", lambda: strided_mask(4, 2, pattern="fixed", summary=3), ValueError, "summary"),
    ("global-index", lambda: global_local_mask(4, 2, [4]), ValueError, "global_tokens"),
    ("global-type", lambda: global_local_mask(4, 2, 0), TypeError, "global_tokens"),
    ("global-float", lambda: global_local_mask(4, 2, torch.tensor([0.5])), TypeError, "global_tokens"),
    ("bigbird-block", lambda: bigbird_mask(8, 0), ValueError, "block_size"),
    ("bigbird-window", lambda: bigbird_layout(4, window_blocks=2), ValueError, "window_blocks"),
    ("bigbird-random", lambda: bigbird_layout(4, random_blocks=-1), ValueError, "random_blocks"),
    ("bigbird-both", lambda: bigbird_layout(4, seed=1, generator=torch.Generator()), ValueError, "seed"),
    ("bigbird-generator", lambda: bigbird_layout(4, generator=3), TypeError, "generator"),
    ("blockmask-dtype", lambda: block_sparse_mask(torch.ones(2, 2), 2), TypeError, "layout"),
    ("blockmask-rows", lambda: block_sparse_mask(LAYOUT, 2, T=7), ValueError, "layout"),
    ("blockmask-1d", lambda: block_sparse_mask(torch.ones(2, dtype=torch.bool), 2), ValueError, "layout"),
    ("nbmask-kernel", lambda: neighborhood_mask_2d(3, 5, 4), ValueError, "kernel_size"),
    ("reach-square", lambda: reachability(torch.ones(2, 3, dtype=torch.bool), 1), ValueError, "mask"),
    ("reach-layers", lambda: reachability(torch.ones(2, 2, dtype=torch.bool), -1), ValueError, "num_layers"),
    ("connect-dtype", lambda: layers_to_connect(torch.ones(2, 2)), TypeError, "mask"),
    ("stats-head-dim", lambda: mask_stats(LAYOUT, head_dim=0), ValueError, "head_dim"),
    ("stats-mask", lambda: mask_stats(torch.ones(2, 2, 2, dtype=torch.bool)), ValueError, "mask"),
    ("swa-window", lambda: sliding_window_attention(Q, K, V, 0), ValueError, "window"),
    ("swa-q", lambda: sliding_window_attention(Q[0], K, V, 2), ValueError, "q"),
    ("swa-v-length", lambda: sliding_window_attention(Q, K, V[:, :, :3], 2), ValueError, "v"),
    ("swa-dtype", lambda: sliding_window_attention(Q, K.double(), V, 2), TypeError, "dtype"),
    ("swa-block", lambda: sliding_window_attention(Q, K, V, 2, block_size=0), ValueError, "block_size"),
    ("swa-scale", lambda: sliding_window_attention(Q, K, V, 2, scale="big"), TypeError, "scale"),
    (
        "bsa-layout-shape",
        lambda: block_sparse_attention(Q, K, V, torch.ones(3, 3, dtype=torch.bool), 4),
        ValueError,
        "layout",
    ),
    ("bsa-layout-dtype", lambda: block_sparse_attention(Q, K, V, torch.ones(2, 2), 4), TypeError, "layout"),
    ("bsa-block", lambda: block_sparse_attention(Q, K, V, LAYOUT, 0), ValueError, "block_size"),
    ("bsa-causal", lambda: block_sparse_attention(Q, K, V, LAYOUT, 4, causal="yes"), TypeError, "causal"),
    ("topk-k", lambda: topk_attention(Q, K, V, 0), ValueError, "top_k"),
    ("topk-mask", lambda: topk_attention(Q, K, V, 2, torch.ones(6, 6)), TypeError, "mask"),
    (
        "topk-mask-shape",
        lambda: topk_attention(Q, K, V, 2, torch.ones(5, 6, dtype=torch.bool)),
        ValueError,
        "mask",
    ),
    ("topk-k-type", lambda: topk_attention(Q, K, V, 2.5), TypeError, "top_k"),
    ("lsh-buckets-odd", lambda: lsh_attention(Q, V, num_buckets=3, chunk_size=2), ValueError, "num_buckets"),
    ("lsh-chunk", lambda: lsh_attention(Q, V, num_buckets=2, chunk_size=0), ValueError, "chunk_size"),
    ("lsh-v", lambda: lsh_attention(Q, V[:, :1], num_buckets=2, chunk_size=2), ValueError, "v"),
    ("lsh-hashes", lambda: lsh_buckets(Q, 2, num_hashes=0), ValueError, "num_hashes"),
    ("lsh-qk", lambda: lsh_buckets(Q.long(), 2), TypeError, "qk"),
    ("lsh-seed", lambda: lsh_buckets(Q, 2, seed=-1), ValueError, "seed"),
    ("nat-kernel", lambda: neighborhood_attention_2d(IMAGE, IMAGE, IMAGE, 5), ValueError, "kernel_size"),
    ("nat-k-shape", lambda: neighborhood_attention_2d(IMAGE, IMAGE[:, :, :3], IMAGE, 3), ValueError, "k"),
    ("nat-q-ndim", lambda: neighborhood_attention_2d(Q, Q, Q, 3), ValueError, "q"),
    ("nat-dtype", lambda: neighborhood_attention_2d(IMAGE, IMAGE, IMAGE.double(), 3), TypeError, "dtype"),
    ("gate-ratio", lambda: LearnedSparseAttention(8, 2, keep_ratio=1.5), ValueError, "keep_ratio"),
    ("gate-heads", lambda: LearnedSparseAttention(8, 3), ValueError, "num_heads"),
    ("gate-x", lambda: LearnedSparseAttention(8, 2)(torch.randn(1, 3, 6)), ValueError, "x"),
    (
        "window-max",
        lambda: AdaptiveWindowAttention(8, 2, min_window=4, max_window=2),
        ValueError,
        "max_window",
    ),
    ("window-temperature", lambda: AdaptiveWindowAttention(8, 2, temperature=0.0), ValueError, "temperature"),
    ("window-x", lambda: AdaptiveWindowAttention(8, 2)(torch.randn(3, 8)), ValueError, "x"),
    ("stream-budget", lambda: streaming_keep(10, 0), ValueError, "budget"),
    ("stream-sinks", lambda: streaming_keep(10, 3, num_sinks=4), ValueError, "num_sinks"),
    ("stream-len", lambda: streaming_keep(-1, 3), ValueError, "seq_len"),
    ("h2o-weights", lambda: h2o_keep(torch.rand(5), 2), ValueError, "attention_weights"),
    ("h2o-recent", lambda: h2o_keep(torch.rand(3, 5), 2, recent=3), ValueError, "recent"),
    ("h2o-int", lambda: h2o_keep(torch.ones(3, 5, dtype=torch.long), 2), TypeError, "attention_weights"),
    ("keep-range", lambda: kept_attention(Q, K, V, torch.tensor([0, 6])), ValueError, "keep"),
    ("keep-dtype", lambda: kept_attention(Q, K, V, torch.tensor([0.0, 1.0])), TypeError, "keep"),
    ("keep-heads", lambda: kept_attention(Q, K, V, torch.zeros(3, 2, dtype=torch.long)), ValueError, "keep"),
    ("keepmask-S", lambda: keep_mask(torch.tensor([0]), 0), ValueError, "S"),
    ("error-keep", lambda: eviction_error(Q, K, V, torch.tensor([-1])), ValueError, "keep"),
]


@pytest.mark.parametrize(
    "call,error,name", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_with_the_argument_named(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- the scale rule: any finite number, inf/NaN/bool refused ------------------------------------------


def _flat_nat(q, k, v, **kw):
    images = [x.reshape(1, 2, 3, 3, x.shape[-1]) for x in (q, k, v)]
    return neighborhood_attention_2d(*images, 3, **kw).flatten(2, 3)


_EVERYTHING = torch.arange(9)
# Each kernel with settings under which it attends to every key, so dense attention is its reference.
_SCALED_KERNELS = {
    "sliding_window_attention": lambda q, k, v, **kw: sliding_window_attention(
        q, k, v, 9, causal=False, **kw
    ),
    "block_sparse_attention": lambda q, k, v, **kw: block_sparse_attention(
        q, k, v, torch.ones(3, 3, dtype=torch.bool), 3, **kw
    ),
    "topk_attention": lambda q, k, v, **kw: topk_attention(q, k, v, 9, **kw),
    "neighborhood_attention_2d": _flat_nat,
    "kept_attention": lambda q, k, v, **kw: kept_attention(q, k, v, _EVERYTHING, **kw),
}


@pytest.mark.parametrize("name", list(_SCALED_KERNELS))
def test_kernels_take_zero_and_negative_scales_and_refuse_inf_nan_bool(name):
    call = _SCALED_KERNELS[name]
    q, k, v = random_qkv(1, 2, 9, 9, 4, D_v=3)  # 9 tokens: a 3 x 3 image for the neighbourhood kernel
    for scale in (0.0, -0.7):
        torch.testing.assert_close(call(q, k, v, scale=scale), dense_reference(q, k, v, scale=scale))
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            call(q, k, v, scale=bad)
    with pytest.raises(TypeError, match="scale"):
        call(q, k, v, scale=True)


def test_lsh_attention_and_eviction_error_take_any_finite_scale_only():
    qk, _, v = random_qkv(1, 2, 5, 5, 4)
    others = ~torch.eye(5, dtype=torch.bool)  # one bucket, one chunk: every key but the query itself
    for scale in (0.0, -0.7):
        expected = dense_reference(qk, F.normalize(qk, dim=-1), v, others, scale=scale)
        torch.testing.assert_close(lsh_attention(qk, v, num_buckets=1, chunk_size=8, scale=scale), expected)
        assert eviction_error(qk, qk, v, torch.arange(5), scale=scale) == pytest.approx(0.0, abs=1e-12)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            lsh_attention(qk, v, num_buckets=1, chunk_size=8, scale=bad)
        with pytest.raises(ValueError, match="scale"):
            eviction_error(qk, qk, v, torch.arange(5), scale=bad)


# --- empty sequences and side tensors (issue 14) ------------------------------------------------------


@pytest.mark.parametrize("T, S", [(0, 0), (0, 3), (3, 0)], ids=str)
def test_mask_builders_accept_empty_sequences_and_kernels_agree_with_them(T, S):
    """A mask for T = 0 or S = 0 is empty (not an error), as the kernels accept those lengths."""
    masks = {
        "sliding": (sliding_window_mask(T, 2, S), lambda q, k, v: sliding_window_attention(q, k, v, 2)),
        "dilated": (dilated_mask(T, 2, 2, S), None),
        "block": (
            block_sparse_mask(torch.ones(-(-T // 2), -(-S // 2), dtype=torch.bool), 2, T, S),
            lambda q, k, v: block_sparse_attention(
                q, k, v, torch.ones(-(-T // 2), -(-S // 2), dtype=torch.bool), 2
            ),
        ),
    }
    q, k, v = random_qkv(1, 2, T, S, 4, D_v=3)
    for mask, kernel in masks.values():
        assert mask.shape == (T, S)
        if kernel is not None:
            torch.testing.assert_close(kernel(q, k, v), dense_reference(q, k, v, mask))
    if T == S:
        for square in (strided_mask(T, 2), global_local_mask(T, 2, []), bigbird_mask(T, 2)):
            assert square.shape == (T, T)
        assert bigbird_layout(0).shape == (0, 0)
    assert streaming_keep(S, 4).shape == (S,)
    assert keep_mask(torch.zeros(0, dtype=torch.long), S).shape == (S,)
    assert neighborhood_mask_2d(0, 3, 2).shape == (0, 0)


def test_lsh_attention_v_must_share_the_dtype_of_qk():
    qk = torch.randn(1, 2, 4, 4)
    # v in float64 used to be silently computed (and returned) in float32.
    with pytest.raises(TypeError, match=r"^v must have the dtype of qk \(torch.float32\)"):
        lsh_attention(qk, torch.randn(1, 2, 4, 3, dtype=torch.float64), num_buckets=2, chunk_size=2)


def test_neighborhood_attention_k_and_v_must_share_the_dtype_of_q():
    image = torch.randn(1, 1, 3, 3, 4)
    with pytest.raises(TypeError, match="^v must have the dtype of q"):
        neighborhood_attention_2d(image, image, image.double(), 3)
