"""Tests of course_lib.tiling against a dense float64 reference written here and SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib.tiling import (
    FlashStats,
    combine_partials,
    finish_fold,
    flash_attention,
    flash_attention_trace,
    flash_backward,
    flash_decoding,
    flash_forward_fa1,
    flash_forward_fa2,
    fold_block,
    fold_block_,
    io_cost,
    merge_softmax_stats,
    online_softmax,
    quantize_blocks,
    quantized_attention,
    random_hadamard,
    random_orthogonal,
    rescale_factor,
    start_fold,
    tile_schedule,
)
from course_lib.tiling.online_softmax import LOG2E

# --- the independent reference ----------------------------------------------------------------


def reference_scores(q, k, causal=False, scale=None):
    """Dense float64 scores with -inf where causal (aligned to the end) forbids a key."""
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D**-0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def reference_attention(q, k, v, causal=False, scale=None):
    """softmax(q k^T scale) v in float64, written out with zeros for rows with no key."""
    scores = reference_scores(q, k, causal, scale)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v.double()


def reference_lse(q, k, causal=False, scale=None):
    return torch.logsumexp(reference_scores(q, k, causal, scale), dim=-1)


def make_qkv(B, H, T, S, D, Dv=None, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=generator, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, S, D, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, S, Dv or D, generator=generator, dtype=torch.float64).to(dtype)
    return q, k, v


LOOP_ORDERS = ["fa1", "fa2"]

# --- online softmax ---------------------------------------------------------------------------


@given(
    row=st.lists(st.floats(-50, 50), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_online_softmax_equals_softmax_over_any_split(row, cuts):
    values = torch.tensor(row, dtype=torch.float64)
    edges = sorted({0, len(row), *(min(c, len(row)) for c in cuts)})
    blocks = [values[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    probabilities, row_max, row_sum = online_softmax(blocks, return_stats=True)
    torch.testing.assert_close(probabilities, torch.softmax(values, dim=-1))
    assert row_max == values.max()
    torch.testing.assert_close(row_sum, torch.exp(values - values.max()).sum())


def test_online_softmax_batched_rows_with_empty_and_masked_blocks():
    scores = torch.randn(3, 4, 10, dtype=torch.float64)
    scores[0, 1, :7] = float("-inf")  # a row whose first blocks see nothing
    scores[2, 3, :] = float("-inf")  # a fully masked row
    blocks = [scores[..., :3], scores[..., 3:3], scores[..., 3:8], scores[..., 8:]]
    result = online_softmax(blocks)
    expected = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    torch.testing.assert_close(result, expected)
    assert torch.isfinite(result).all() and (result[2, 3] == 0).all()


def test_online_softmax_half_precision_and_large_logits():
    values = torch.randn(5, 33) * 1e3
    result = online_softmax(list(values.half().split(7, dim=-1)))
    assert result.dtype == torch.float16 and torch.isfinite(result).all()
    torch.testing.assert_close(result.float(), torch.softmax(values.half().float(), -1), atol=2e-3, rtol=1e-2)


def test_merge_softmax_stats_of_two_halves_is_stats_of_the_whole():
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64) + 3
    stats = [(x.amax(-1), torch.exp(x - x.amax(-1, keepdim=True)).sum(-1)) for x in (a, b)]
    merged_max, merged_sum = merge_softmax_stats(*stats[0], *stats[1])
    whole = torch.cat([a, b], -1)
    torch.testing.assert_close(merged_max, whole.amax(-1))
    torch.testing.assert_close(merged_max + merged_sum.log(), torch.logsumexp(whole, -1))


# --- combining partial attention ----------------------------------------------------------------


def test_combine_partials_of_disjoint_key_sets_equals_full_attention():
    q, k, v = make_qkv(2, 3, 4, 11, 5)
    pieces = [(0, 3), (3, 4), (4, 11)]
    outputs = [reference_attention(q, k[:, :, a:b], v[:, :, a:b]) for a, b in pieces]
    lses = [reference_lse(q, k[:, :, a:b]) for a, b in pieces]
    out, lse = combine_partials(outputs, lses)
    torch.testing.assert_close(out, reference_attention(q, k, v))
    torch.testing.assert_close(lse, reference_lse(q, k))


def test_combine_partials_ignores_a_partial_that_saw_nothing():
    q, k, v = make_qkv(1, 2, 3, 6, 4)
    outputs = [reference_attention(q, k, v), torch.zeros(1, 2, 3, 4, dtype=torch.float64)]
    lses = [reference_lse(q, k), torch.full((1, 2, 3), float("-inf"), dtype=torch.float64)]
    out, _ = combine_partials(outputs, lses)
    torch.testing.assert_close(out, reference_attention(q, k, v))


# --- flash_attention forward ----------------------------------------------------------------------

SHAPES = [
    # B, H, T, S, D, Dv, block_q, block_k
    (1, 1, 1, 1, 1, 1, 64, 64),
    (2, 3, 7, 7, 5, 5, 1, 1),
    (1, 2, 13, 13, 4, 3, 4, 5),
    (2, 1, 9, 17, 3, 6, 4, 4),
    (1, 2, 17, 9, 6, 2, 5, 3),
    (1, 1, 1, 23, 8, 8, 1, 7),
    (2, 2, 20, 20, 1, 1, 64, 3),
    (1, 1, 6, 11, 7, 7, 6, 100),
]
SHAPE_IDS = [f"B{b}-H{h}-T{t}-S{s}-D{d}-Dv{dv}-bq{bq}-bk{bk}" for b, h, t, s, d, dv, bq, bk in SHAPES]


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B, H, T, S, D, Dv, block_q, block_k", SHAPES, ids=SHAPE_IDS)
def test_flash_attention_matches_float64_reference(B, H, T, S, D, Dv, block_q, block_k, causal, loop_order):
    q, k, v = make_qkv(B, H, T, S, D, Dv)
    out, lse = flash_attention(
        q, k, v, causal=causal, block_q=block_q, block_k=block_k, loop_order=loop_order, return_lse=True
    )
    torch.testing.assert_close(out, reference_attention(q, k, v, causal))
    torch.testing.assert_close(lse, reference_lse(q, k, causal))


@given(
    T=st.integers(1, 12),
    S=st.integers(1, 12),
    D=st.integers(1, 6),
    block_q=st.integers(1, 14),
    block_k=st.integers(1, 14),
    causal=st.booleans(),
    loop_order=st.sampled_from(LOOP_ORDERS),
)
def test_flash_attention_property_any_shape_and_blocks(T, S, D, block_q, block_k, causal, loop_order):
    q, k, v = make_qkv(1, 2, T, S, D, seed=T * 100 + S)
    out = flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k, loop_order=loop_order)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attention_matches_sdpa_float32(causal):
    q, k, v = make_qkv(2, 4, 70, 70, 16, dtype=torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for loop_order in LOOP_ORDERS:
        out = flash_attention(q, k, v, causal=causal, block_q=16, block_k=32, loop_order=loop_order)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_flash_attention_causal_s_greater_than_t_vs_sdpa_with_end_aligned_mask():
    q, k, v = make_qkv(1, 2, 5, 12, 8, dtype=torch.float32)
    mask = torch.ones(5, 12, dtype=torch.bool).tril(diagonal=12 - 5)  # SDPA's is_causal aligns to the start
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True, block_q=2, block_k=5), expected)


def test_fa1_equals_fa2_with_custom_scale():
    q, k, v = make_qkv(2, 2, 19, 23, 6, 5)
    first = flash_attention(q, k, v, scale=0.3, block_q=4, block_k=6, loop_order="fa1", causal=True)
    second = flash_attention(q, k, v, scale=0.3, block_q=7, block_k=3, loop_order="fa2", causal=True)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, reference_attention(q, k, v, causal=True, scale=0.3))


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_fully_masked_rows_give_zeros_and_minus_infinity_lse(loop_order):
    # Causal with T > S aligned to the end: the first T - S queries see no key.
    q, k, v = make_qkv(1, 2, 9, 4, 3)
    out, lse = flash_attention(
        q, k, v, causal=True, block_q=2, block_k=3, loop_order=loop_order, return_lse=True
    )
    assert torch.isfinite(out).all()
    assert (out[:, :, :5] == 0).all() and torch.isneginf(lse[:, :, :5]).all()
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True))


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_huge_logits_stay_finite(loop_order):
    q, k, v = make_qkv(1, 2, 16, 16, 8, dtype=torch.float32)
    q = q * 1e3
    out, lse = flash_attention(
        q, k, v, causal=True, block_q=4, block_k=4, loop_order=loop_order, return_lse=True
    )
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal=True), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_half_precision_returns_input_dtype_and_is_close(dtype, loop_order):
    q, k, v = make_qkv(1, 2, 21, 21, 16, dtype=dtype)
    out, lse = flash_attention(
        q, k, v, causal=True, block_q=8, block_k=8, loop_order=loop_order, return_lse=True
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal=True), atol=2e-2, rtol=2e-2)


# --- causal skipping and the IO counts ------------------------------------------------------------


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_causal_skips_the_blocks_above_the_diagonal(loop_order):
    # T = S = 8 in blocks of 2: a 4 x 4 grid whose 6 blocks above the diagonal hold no visible key.
    stats = FlashStats()
    q, k, v = make_qkv(1, 1, 8, 8, 2)
    flash_attention(q, k, v, causal=True, block_q=2, block_k=2, loop_order=loop_order, stats=stats)
    assert (stats.block_pairs, stats.blocks_skipped, stats.blocks_computed) == (16, 6, 10)
    stats_full = FlashStats()
    flash_attention(q, k, v, block_q=2, block_k=2, loop_order=loop_order, stats=stats_full)
    assert stats_full.blocks_skipped == 0 and stats_full.elements_read > stats.elements_read


def test_causal_skipping_with_s_greater_than_t():
    # T = 2, S = 6, one query block, keys in blocks of 2: query 0 sees keys 0..4, query 1 all 6.
    stats = FlashStats()
    q, k, v = make_qkv(1, 1, 2, 6, 2)
    flash_attention(q, k, v, causal=True, block_q=2, block_k=2, stats=stats)
    assert stats.blocks_skipped == 0
    stats = FlashStats()
    q, k, v = make_qkv(1, 1, 6, 2, 2)  # T > S: queries 0..3 see nothing
    flash_attention(q, k, v, causal=True, block_q=2, block_k=2, stats=stats)
    assert (stats.block_pairs, stats.blocks_skipped) == (3, 2)


@given(
    T=st.integers(1, 30),
    S=st.integers(1, 30),
    d=st.integers(1, 5),
    block_q=st.integers(1, 12),
    block_k=st.integers(1, 12),
    loop_order=st.sampled_from(LOOP_ORDERS),
)
def test_io_cost_formula_equals_instrumented_counts(T, S, d, block_q, block_k, loop_order):
    stats = FlashStats()
    q, k, v = make_qkv(1, 1, T, S, d, dtype=torch.float32)
    flash_attention(q, k, v, block_q=block_q, block_k=block_k, loop_order=loop_order, stats=stats)
    cost = io_cost(T, d, S=S, block_q=block_q, block_k=block_k, loop_order=loop_order, bytes_per_element=4)
    assert cost.tiled_bytes == stats.bytes_moved(4)


def test_io_cost_standard_hand_count_and_paper_block_sizes():
    # N = 2, d = 1: read Q, K (4), write/read S and P (4 * 4), read V, write O (4) = 24 elements.
    assert io_cost(2, 1, block_q=1, block_k=1, bytes_per_element=2).standard_bytes == 48
    # M = 4096 bytes / 2 = 2048 elements, d = 16: B_c = ceil(2048 / 64) = 32, B_r = min(32, 16).
    cost = io_cost(100, 16, sram_bytes=4096, bytes_per_element=2)
    assert (cost.block_k, cost.block_q) == (32, 16)


def test_io_cost_follows_theorem_2():
    # Tiled traffic is Theta(N^2 d^2 / M): it falls as the SRAM grows and grows ~4x when N doubles.
    costs = [io_cost(8192, 64, sram_bytes=m * 1024).tiled_bytes for m in (32, 64, 128, 256)]
    assert all(a > b for a, b in zip(costs[:-1], costs[1:], strict=True))
    normalised = [c * m * 1024 / (8192**2 * 64**2) for c, m in zip(costs, (32, 64, 128, 256), strict=True)]
    assert max(normalised) / min(normalised) < 1.5
    growth = (
        io_cost(16384, 64, sram_bytes=192 * 1024).tiled_bytes
        / io_cost(8192, 64, sram_bytes=192 * 1024).tiled_bytes
    )
    assert 3.5 < growth < 4.5
    # With an A100-sized SRAM the tiled version moves several times fewer bytes than standard.
    assert io_cost(8192, 64, sram_bytes=192 * 1024).ratio > 4


# --- backward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize(
    "T, S, causal, block_q, block_k",
    [(5, 5, False, 2, 3), (4, 7, True, 3, 2), (1, 3, True, 1, 1), (6, 6, True, 8, 8)],
    ids=["T5-S5", "T4-S7-causal", "T1-S3-causal", "T6-causal-big-blocks"],
)
def test_gradcheck_float64(T, S, causal, block_q, block_k, loop_order):
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, T, S, 3, 2))

    def function(q, k, v):
        out, lse = flash_attention(
            q, k, v, causal=causal, block_q=block_q, block_k=block_k, loop_order=loop_order, return_lse=True
        )
        return out, lse

    assert torch.autograd.gradcheck(function, (q, k, v))


def test_gradients_with_fully_masked_rows_are_finite_and_match_reference():
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 1, 7, 3, 4))
    grad_out = torch.randn(1, 1, 7, 4, dtype=torch.float64)
    mine = torch.autograd.grad(
        flash_attention(q, k, v, causal=True, block_q=2, block_k=2), (q, k, v), grad_out
    )
    expected = torch.autograd.grad(reference_attention(q, k, v, causal=True), (q, k, v), grad_out)
    for a, b in zip(mine, expected, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_gradients_match_autograd_of_reference(causal):
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 2, 37, 45, 16, dtype=torch.float32))
    grad_out = torch.randn(2, 2, 37, 16)
    mine = torch.autograd.grad(
        flash_attention(q, k, v, causal=causal, block_q=8, block_k=16), (q, k, v), grad_out
    )
    expected = torch.autograd.grad(reference_attention(q, k, v, causal), (q, k, v), grad_out.double())
    for a, b in zip(mine, expected, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_half_precision_gradients_have_input_dtype():
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 1, 9, 9, 8, dtype=torch.bfloat16))
    flash_attention(q, k, v, causal=True, block_q=4, block_k=4).float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_saved_tensors_are_only_inputs_output_and_lse():
    T, S, D = 32, 40, 2
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 1, T, S, D))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        flash_attention(q, k, v, block_q=8, block_k=8)
    assert len(saved) == 5
    assert all(x.numel() < T * S for x in saved)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor any operation returns, backward pass included."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.operations += 1
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return result


def test_no_t_by_s_tensor_is_built_forward_or_backward():
    T, S, D = 48, 40, 2
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 1, T, S, D))
    with _LargestTensor() as forward:
        out = flash_attention(q, k, v, causal=True, block_q=8, block_k=8)
    with _LargestTensor() as backward:
        out.sum().backward()
    assert backward.operations > 100  # the detector really watched the block loops
    assert 8 * 8 <= forward.largest < T * S // 4
    assert backward.largest < T * S // 4
    with _LargestTensor() as dense:  # and it does see the T x S matrix of the dense reference
        reference_attention(q, k, v)
    assert dense.largest >= T * S


# --- the trace for the tile-walk widget -------------------------------------------------------------


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_trace_walks_every_tile_in_loop_order(loop_order):
    q, k, v = make_qkv(1, 1, 6, 6, 3)
    steps = flash_attention_trace(q, k, v, causal=True, block_q=2, block_k=3, loop_order=loop_order)
    assert len(steps) == 3 * 2 and sum(s.skipped for s in steps) == 1
    outer = [s.q_block if loop_order == "fa2" else s.k_block for s in steps]
    assert outer == sorted(outer)
    expected = reference_attention(q, k, v, causal=True)
    for q_block in range(3):
        last = [s for s in steps if s.q_block == q_block][-1]
        start, end = last.q_rows
        torch.testing.assert_close(last.output, expected[:, :, start:end])


# --- FlashDecoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 11, 12, 30], ids=lambda n: f"splits{n}")
def test_flash_decoding_equals_full_attention_for_every_split_count(num_splits):
    q, k, v = make_qkv(2, 3, 1, 11, 4, 5)
    out, lse = flash_decoding(q, k, v, num_splits=num_splits, return_lse=True)
    torch.testing.assert_close(out, reference_attention(q, k, v))
    torch.testing.assert_close(lse, reference_lse(q, k))


@pytest.mark.parametrize("T, S", [(3, 10), (5, 5), (7, 3)], ids=["T3-S10", "T5-S5", "T7-S3"])
def test_flash_decoding_several_queries_causal(T, S):
    q, k, v = make_qkv(1, 2, T, S, 3)
    out = flash_decoding(q, k, v, num_splits=4, causal=True)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True))
    assert torch.isfinite(out).all()


def test_flash_decoding_half_precision():
    q, k, v = make_qkv(1, 4, 1, 100, 16, dtype=torch.float16)
    out = flash_decoding(q, k, v, num_splits=7)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=2e-3, rtol=1e-2)


# --- quantised attention --------------------------------------------------------------------------------


def relative_error(approximation, exact):
    return ((approximation.double() - exact).norm() / exact.norm()).item()


def test_int8_attention_is_close_on_ordinary_inputs():
    q, k, v = make_qkv(1, 2, 40, 50, 32, dtype=torch.float32)
    out = quantized_attention(q, k, v, block_q=16, block_k=16)
    assert out.dtype == torch.float32
    exact = reference_attention(q, k, v)
    assert relative_error(out, exact) < 0.02
    # Fewer bits, more error: 4-bit codes are much coarser than 8-bit ones.
    coarse = quantized_attention(q, k, v, bits=4, block_q=16, block_k=16)
    assert relative_error(coarse, exact) > relative_error(out, exact)


def test_smoothing_k_lowers_the_error_when_k_has_a_channel_offset():
    q, k, v = make_qkv(1, 4, 64, 64, 32, dtype=torch.float32, seed=3)
    offset = torch.randn(32, generator=torch.Generator().manual_seed(4)) * 8
    k = k + offset  # the same large bias on every token, as in real K activations
    exact = reference_attention(q, k, v)
    plain = relative_error(quantized_attention(q, k, v, smooth_k=False), exact)
    smoothed = relative_error(quantized_attention(q, k, v, smooth_k=True), exact)
    assert smoothed < plain / 2


@pytest.mark.parametrize("number_format", ["int", "fp8"])
@pytest.mark.parametrize("rotation_kind", ["hadamard", "orthogonal"])
def test_rotation_lowers_the_error_on_outlier_channels(number_format, rotation_kind):
    q, k, v = make_qkv(1, 4, 64, 64, 32, dtype=torch.float32, seed=5)
    q[..., :2] *= 30  # two outlier channels set every block's scale
    k[..., :2] *= 30
    exact = reference_attention(q, k, v)
    rotation = random_hadamard(32, seed=1) if rotation_kind == "hadamard" else random_orthogonal(32, seed=1)
    plain = relative_error(quantized_attention(q, k, v, number_format=number_format), exact)
    rotated = relative_error(
        quantized_attention(q, k, v, number_format=number_format, rotation=rotation), exact
    )
    assert rotated < plain / 1.5


def test_quantized_attention_causal_and_fully_masked_rows():
    q, k, v = make_qkv(1, 2, 8, 5, 16, dtype=torch.float32)
    out = quantized_attention(q, k, v, causal=True, block_q=4, block_k=4)
    assert torch.isfinite(out).all() and (out[:, :, :3] == 0).all()
    assert relative_error(out, reference_attention(q, k, v, causal=True)) < 0.02


def test_quantized_attention_half_precision_input():
    q, k, v = make_qkv(1, 2, 16, 16, 16, dtype=torch.float16)
    out = quantized_attention(q, k, v)
    assert out.dtype == torch.float16
    assert relative_error(out, reference_attention(q, k, v)) < 0.03


def test_quantize_blocks_codes_and_scales():
    x = torch.randn(1, 2, 10, 4, dtype=torch.float64)
    codes, scales = quantize_blocks(x, bits=8, block_size=4)
    assert (codes == codes.round()).all() and codes.abs().max() <= 127
    assert (scales[..., 0:4] == scales[..., :1]).all() and (scales[..., 8:] == scales[..., 8:9]).all()
    # Round to nearest: each value is within half a step of its code.
    assert ((codes * scales.unsqueeze(-1) - x).abs() <= scales.unsqueeze(-1) / 2 + 1e-12).all()
    torch.testing.assert_close(scales[0, 0, 0], x[0, 0, :4].abs().max() / 127)
    zeros, zero_scales = quantize_blocks(torch.zeros(1, 1, 3, 2))
    assert (zeros == 0).all() and (zero_scales == 1).all()


@pytest.mark.parametrize("maker", [random_hadamard, random_orthogonal], ids=["hadamard", "orthogonal"])
def test_rotations_are_orthogonal_and_seeded(maker):
    rotation = maker(16, seed=7)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(16, dtype=torch.float64))
    assert torch.equal(rotation, maker(16, seed=7)) and not torch.equal(rotation, maker(16, seed=8))


def test_random_hadamard_entries_are_plus_minus_one_over_root_d():
    assert torch.allclose(random_hadamard(8).abs(), torch.full((8, 8), 8**-0.5, dtype=torch.float64))


# --- bad input ---------------------------------------------------------------------------------------------

_q, _k, _v = make_qkv(1, 1, 4, 4, 2, dtype=torch.float32)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: online_softmax(torch.ones(3)), TypeError, "blocks"),
        (lambda: online_softmax([]), ValueError, "blocks"),
        (lambda: online_softmax([torch.ones(2, 3), torch.ones(3, 3)]), ValueError, r"blocks\[1\]"),
        (lambda: online_softmax([torch.ones(3, dtype=torch.long)]), TypeError, r"blocks\[0\]"),
        (lambda: online_softmax([torch.ones(3)], return_stats=1), TypeError, "return_stats"),
        (lambda: merge_softmax_stats(torch.ones(2), [1.0], torch.ones(2), torch.ones(2)), TypeError, "sum_a"),
        (lambda: combine_partials([_v], []), ValueError, "lses"),
        (lambda: combine_partials([_v, _v], [_v[..., 0]]), ValueError, "same length"),
        (lambda: combine_partials(_v, [_v]), TypeError, "outputs"),
        (lambda: combine_partials([_v], [torch.zeros(1, 1, 5)]), ValueError, r"lses\[0\]"),
        (lambda: flash_attention(_q, _k, _v, block_q=0), ValueError, "block_q"),
        (lambda: flash_attention(_q, _k, _v, block_k=2.0), TypeError, "block_k"),
        (lambda: flash_attention(_q, _k, _v, loop_order="fa3"), ValueError, "loop_order"),
        (lambda: flash_attention(_q, _k, _v, causal="yes"), TypeError, "causal"),
        (lambda: flash_attention(_q, _k, _v, scale="big"), TypeError, "scale"),
        (lambda: flash_attention(_q, _k, _v, return_lse=None), TypeError, "return_lse"),
        (lambda: flash_attention(_q, _k, _v, stats={}), TypeError, "stats"),
        (lambda: flash_attention(_q[0], _k, _v), ValueError, "q"),
        (lambda: flash_attention(_q, _k[..., :1], _v), ValueError, "k"),
        (lambda: flash_attention_trace(_q, _k, _v, block_q=-1), ValueError, "block_q"),
        (lambda: flash_decoding(_q, _k, _v, num_splits=0), ValueError, "num_splits"),
        (lambda: flash_decoding(_q, _k, _v, num_splits=2.5), TypeError, "num_splits"),
        (lambda: flash_decoding(_q, _k, _v[:, :, :3], num_splits=2), ValueError, "v"),
        (lambda: io_cost(0, 4, block_q=1, block_k=1), ValueError, "N"),
        (lambda: io_cost(8, 4), ValueError, "sram_bytes"),
        (lambda: io_cost(8, 4, sram_bytes=-1), ValueError, "sram_bytes"),
        (lambda: io_cost(8, 4, block_q=0, block_k=2), ValueError, "block_q"),
        (lambda: io_cost(8, 4, block_q=1, block_k=1, loop_order="fa9"), ValueError, "loop_order"),
        (lambda: io_cost(8, 4, block_q=1, block_k=1, bytes_per_element=0), ValueError, "bytes_per_element"),
        (lambda: quantized_attention(_q, _k, _v, bits=1), ValueError, "bits"),
        (lambda: quantized_attention(_q, _k, _v, smooth_k="no"), TypeError, "smooth_k"),
        (lambda: quantized_attention(_q, _k, _v, rotation=torch.eye(3)), ValueError, "rotation"),
        (lambda: quantized_attention(_q, _k, _v, rotation=torch.ones(2, 2)), ValueError, "rotation"),
        (lambda: quantized_attention(_q, _k, _v, number_format="int4"), ValueError, "number_format"),
        (lambda: quantized_attention(_q, _k, _v, bits=4, number_format="fp8"), ValueError, "bits"),
        (lambda: quantized_attention(_q, _k, _v, block_k=0), ValueError, "^block_k=0"),
        (lambda: quantized_attention(_q, _k, _v, block_q=0), ValueError, "^block_q=0"),
        (lambda: quantize_blocks(_q[0]), ValueError, "x"),
        (lambda: random_hadamard(12), ValueError, "D"),
        (lambda: random_hadamard(8, seed=1.5), TypeError, "seed"),
        (lambda: random_orthogonal(0), ValueError, "D"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_stats_bytes_moved_checks_its_argument():
    with pytest.raises(ValueError, match="bytes_per_element"):
        FlashStats().bytes_moved(0)
    assert math.isclose(FlashStats(elements_read=3, elements_written=2).bytes_moved(2), 10)


def test_tile_gradients_of_one_whole_tile_equal_autograd():
    """With the tile holding every key, its shares are the full gradients of masked attention."""
    from course_lib.tiling import tile_gradients

    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 4, generator=generator, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 6, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=generator) > 0.3
    mask[:, 0] = True  # every row sees a key
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    scores = (leaves[0] @ leaves[1].transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ leaves[2]
    expected = torch.autograd.grad(out, leaves, grad_out)
    with torch.no_grad():
        row_terms = -(grad_out * out).sum(-1)
        actual = tile_gradients(q, k, v, grad_out, scores, scores.logsumexp(-1), row_terms, 0.5)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# --- the fold, the plain loops and the schedule ---------------------------------------------------


@given(
    cuts=st.lists(st.integers(0, 9), min_size=1, max_size=5), masked_fraction=st.sampled_from([0.0, 0.5, 1.0])
)
def test_fold_block_over_any_split_equals_dense_softmax(cuts, masked_fraction):
    n = sum(cuts)
    generator = torch.Generator().manual_seed(n)
    scores = 5 * torch.randn(3, 2, n, generator=generator, dtype=torch.float64)
    masked = torch.rand(3, 2, n, generator=generator) < masked_fraction
    scores = scores.masked_fill(masked, float("-inf"))
    values = torch.randn(3, n, 4, generator=generator, dtype=torch.float64)  # shared by the 2 rows
    state = start_fold((3, 2), 4, dtype=torch.float64, device="cpu")
    start = 0
    for size in cuts:
        block = slice(start, start + size)
        state = fold_block(*state, scores[..., block], values[:, block])
        start += size
    out, lse = finish_fold(*state)
    # Independent reference: the dense softmax of each row, zeros for a row with no visible key.
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    expected_out = torch.einsum("brn,bnd->brd", weights, values)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    assert not out.isnan().any()


def test_rescale_factor_is_zero_not_nan_for_a_row_that_saw_nothing():
    old = torch.tensor([float("-inf"), float("-inf"), 1.0])
    new = torch.tensor([float("-inf"), 2.0, 3.0])
    torch.testing.assert_close(rescale_factor(old, new), torch.tensor([0.0, 0.0, math.exp(-2.0)]))


@pytest.mark.parametrize("scale", [0.6, 0.0, -0.7], ids=["0.6", "zero", "negative"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T, S", [(1, 1), (7, 13), (13, 7), (0, 5), (5, 0)], ids=lambda x: str(x))
def test_plain_loops_forward_and_backward_equal_the_dense_reference(T, S, causal, scale):
    q, k, v = make_qkv(2, 2, T, S, 3, 5, seed=T + 10 * S)
    for forward in (flash_forward_fa1, flash_forward_fa2):
        out, lse = forward(q, k, v, scale=scale, causal=causal, block_q=3, block_k=4)
        torch.testing.assert_close(out, reference_attention(q, k, v, causal, scale=scale))
        torch.testing.assert_close(lse, reference_lse(q, k, causal, scale=scale))
    # The backward against autograd through the dense reference, with gradients on both outputs.
    generator = torch.Generator().manual_seed(7)
    grad_out = torch.randn(2, 2, T, 5, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(2, 2, T, generator=generator, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    scores = reference_scores(*leaves[:2], causal, scale=scale)
    dense_out = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ leaves[2]
    visible = torch.isfinite(scores).any(-1)  # rows with no key: lse -inf, no gradient through it
    dense_lse = torch.where(visible, torch.logsumexp(scores.masked_fill(~visible[..., None], 0), -1), 0)
    loss = (dense_out * grad_out).sum() + (dense_lse * grad_lse).sum()
    expected = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    grads = flash_backward(
        q, k, v, out, lse, grad_out, grad_lse=grad_lse, scale=scale, causal=causal, block_q=3, block_k=4
    )
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_plain_loops_compute_half_precision_in_float32():
    q, k, v = make_qkv(1, 2, 9, 9, 8, dtype=torch.float16)
    out, lse = flash_forward_fa2(q, k, v, causal=True, block_q=4, block_k=4)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal=True), atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize("T, S", [(6, 6), (5, 11), (11, 5), (0, 4)], ids=lambda x: str(x))
def test_tile_schedule_visits_every_pair_once_in_loop_order(T, S, loop_order):
    tiles = tile_schedule(T, S, block_q=2, block_k=3, causal=True, loop_order=loop_order)
    n_q, n_k = -(-T // 2), -(-S // 3)
    assert sorted((t.q_block, t.k_block) for t in tiles) == [(i, j) for i in range(n_q) for j in range(n_k)]
    outer = [t.q_block if loop_order == "fa2" else t.k_block for t in tiles]
    assert outer == sorted(outer)
    for tile in tiles:
        assert tile.q_rows == (2 * tile.q_block, min(2 * tile.q_block + 2, T))
        assert tile.k_rows == (3 * tile.k_block, min(3 * tile.k_block + 3, S))
        # From the mask itself: which keys of the tile its queries may see (j <= i + S - T).
        queries = torch.arange(*tile.q_rows).unsqueeze(1)
        keys = torch.arange(*tile.k_rows).unsqueeze(0)
        allowed = keys <= queries + (S - T)
        expected = "none" if not allowed.any() else "full" if allowed.all() else "partial"
        assert tile.visibility == expected


def test_flash_decoding_with_no_keys_or_no_queries():
    q, k, v = make_qkv(1, 2, 3, 0, 4, 5)
    out, lse = flash_decoding(q, k, v, num_splits=3, return_lse=True)
    assert out.shape == (1, 2, 3, 5) and (out == 0).all() and torch.isneginf(lse).all()
    q, k, v = make_qkv(1, 2, 0, 6, 4, 5)
    assert flash_decoding(q, k, v, num_splits=2).shape == (1, 2, 0, 5)


# --- the scale rule: any finite number, inf/NaN/bool refused ------------------------------------------

_SCALED = {
    "flash_attention": lambda q, k, v, **kw: flash_attention(
        q, k, v, causal=True, block_q=3, block_k=2, **kw
    ),
    "flash_attention_fa1": lambda q, k, v, **kw: flash_attention(
        q, k, v, causal=True, block_q=3, block_k=2, loop_order="fa1", **kw
    ),
    "flash_attention_trace": lambda q, k, v, **kw: (
        flash_attention_trace(q, k, v, causal=True, block_q=3, block_k=8, **kw)[-1].output
    ),
    "flash_decoding": lambda q, k, v, **kw: flash_decoding(q, k, v, num_splits=3, causal=True, **kw),
    "flash_forward_fa2": lambda q, k, v, **kw: flash_forward_fa2(
        q, k, v, causal=True, block_q=3, block_k=2, **kw
    )[0],
    "flash_forward_fa1": lambda q, k, v, **kw: flash_forward_fa1(
        q, k, v, causal=True, block_q=3, block_k=2, **kw
    )[0],
    "quantized_attention": lambda q, k, v, **kw: quantized_attention(
        q, k, v, causal=True, smooth_k=False, bits=8, **kw
    ),
}


@pytest.mark.parametrize("name", list(_SCALED))
def test_scale_zero_and_negative_are_used_and_inf_nan_bool_refused(name):
    call = _SCALED[name]
    q, k, v = make_qkv(
        1, 2, 3, 5, 4, 3, dtype=torch.float32 if name == "quantized_attention" else torch.float64
    )
    for scale in (0.0, -0.7):
        expected = reference_attention(q, k, v, causal=True, scale=scale)
        got = call(q, k, v, scale=scale).double()
        if name == "flash_attention_trace":  # the last step holds the last Q block
            expected = expected[:, :, -got.shape[2] :]
        tolerance = dict(atol=5e-2, rtol=5e-2) if name == "quantized_attention" else {}
        torch.testing.assert_close(got, expected, **tolerance)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            call(q, k, v, scale=bad)
    with pytest.raises(TypeError, match="scale"):
        call(q, k, v, scale=True)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: tile_schedule(4, 4, loop_order="fa3"), ValueError, "loop_order"),
        (lambda: tile_schedule(-1, 4), ValueError, "T"),
        (lambda: tile_schedule(4, 4, block_k=0), ValueError, "block_k"),
        (lambda: start_fold((2,), -1, dtype=torch.float32, device="cpu"), ValueError, "value_dim"),
        (
            lambda: fold_block(
                torch.zeros(2), torch.zeros(2), torch.zeros(2, 1), [1.0], torch.zeros(2, 1, 1)
            ),
            TypeError,
            "scores",
        ),
        (lambda: flash_forward_fa2(_q, _k, _v, block_q=0), ValueError, "block_q"),
        (lambda: flash_forward_fa1(_q, _k, _v, causal=1), TypeError, "causal"),
        (lambda: flash_backward(_q, _k, _v, _v, _q[..., 0], _v[:, :, :2]), ValueError, "grad_out"),
        (lambda: flash_backward(_q, _k, _v, _v, _q, _v), ValueError, "lse"),
        (lambda: flash_backward(_q, _k, _v, _v, _q[..., 0], _v, scale=float("inf")), ValueError, "scale"),
        (lambda: flash_backward(_q, _k, _v, _v, _q[..., 0], _v, scale=True), TypeError, "scale"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_of_the_plain_loops_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_fold_block_refuses_shapes_that_would_grow_the_running_state():
    from course_lib.tiling import fold_block, start_fold

    state = start_fold((2, 3), 4, dtype=torch.float32, device="cpu")
    values = torch.randn(2, 5, 4)
    fold_block(*state, torch.randn(2, 3, 5), values)  # (..., R, n) with (..., n, D_v): fine
    # Scores with an extra leading dim used to broadcast the state to (2, 2, 3) silently.
    with pytest.raises(ValueError, match=r"^scores must have shape \(2, 3, \*\)"):
        fold_block(*state, torch.randn(2, 2, 3, 5), values)
    with pytest.raises(ValueError, match="^values must have shape"):
        fold_block(*state, torch.randn(2, 3, 5), torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="^values must have at most 3 dims"):
        fold_block(*state, torch.randn(2, 3, 5), torch.randn(7, 2, 5, 4))


# --- the fast loops: the in-place base-2 fold, reused buffers, masks built once, decoding ------------


@given(
    cuts=st.lists(st.integers(0, 9), min_size=1, max_size=5), masked_fraction=st.sampled_from([0.0, 0.5, 1.0])
)
def test_fold_block_in_place_in_base_2_equals_the_readable_fold(cuts, masked_fraction):
    n = sum(cuts)
    generator = torch.Generator().manual_seed(n + 1)
    scores = 5 * torch.randn(3, 2, n, generator=generator, dtype=torch.float64)
    scores = scores.masked_fill(torch.rand(3, 2, n, generator=generator) < masked_fraction, float("-inf"))
    values = torch.randn(3, n, 4, generator=generator, dtype=torch.float64)
    readable = start_fold((3, 2), 4, dtype=torch.float64, device="cpu")
    fast = start_fold((3, 2), 4, dtype=torch.float64, device="cpu")
    start = 0
    for size in cuts:
        block = slice(start, start + size)
        readable = fold_block(*readable, scores[..., block], values[:, block])
        in_log2_units = scores[..., block] * LOG2E  # a copy: fold_block_ overwrites it with P~
        assert fold_block_(*fast, in_log2_units, values[:, block]) is None
        start += size
    row_max, row_sum, accumulator = fast
    torch.testing.assert_close(row_max / LOG2E, readable[0])  # the max, back in natural units
    torch.testing.assert_close(row_sum, readable[1])  # the sum of exp(s - m): the base does not matter
    torch.testing.assert_close(accumulator, readable[2])
    torch.testing.assert_close(
        finish_fold(row_max / LOG2E, row_sum, accumulator)[1], torch.logsumexp(scores, -1)
    )
    assert not accumulator.isnan().any()


class _Calls(TorchDispatchMode):
    """Records every operation: its name and the storage and shape of each tensor it returns."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = [
            x for x in (result if isinstance(result, (tuple, list)) else (result,)) if torch.is_tensor(x)
        ]
        self.calls.append(
            (func.overloadpacket.__name__, [(x.untyped_storage().data_ptr(), x.shape) for x in outputs])
        )
        return result

    def count(self, name):
        return sum(op == name for op, _ in self.calls)

    def storages(self, shape):
        return {ptr for _, outputs in self.calls for ptr, out_shape in outputs if tuple(out_shape) == shape}


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_every_step_reuses_the_same_tile_buffer(loop_order):
    # 8 x 8 = 64 tiles of (B*H, 8, 8) scores: one buffer for all of them, not one per step.
    q, k, v = make_qkv(1, 2, 64, 64, 4, dtype=torch.float32)
    with _Calls() as forward:
        flash_attention(q, k, v, block_q=8, block_k=8, loop_order=loop_order)
    assert forward.count("bmm") == 64
    assert len(forward.storages((2, 8, 8))) == 1
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = flash_attention(q, k, v, block_q=8, block_k=8)
    with _Calls() as backward:
        out.backward(torch.ones_like(out))
    assert backward.count("bmm") == 3 * 64  # S, dP and dQ's share of every tile (dK, dV: baddbmm_)
    assert len(backward.storages((2, 8, 8))) == 2  # P and dS


def test_the_causal_mask_of_the_diagonal_tiles_is_built_once():
    # T = S = 64 in blocks of 8: eight tiles on the diagonal, all cut the same way.
    q, k, v = make_qkv(1, 2, 64, 64, 4, dtype=torch.float32)
    with _Calls() as calls:
        flash_attention(q, k, v, causal=True, block_q=8, block_k=8)
    assert calls.count("masked_fill_") == 8
    assert calls.count("arange") == 2  # the row and column indices of one mask
    assert calls.count("bmm") == 8 * 9 // 2  # the 28 tiles above the diagonal are skipped


@pytest.mark.parametrize("S", [1, 300, 5000])
def test_a_decoding_query_takes_its_whole_cache_in_one_step(S):
    # T = 1 and blocks of 64 x 64: a step holds 64 * 64 = 4096 scores, so 4096 keys per step.
    q, k, v = make_qkv(2, 3, 1, S, 8, dtype=torch.float32)
    with _Calls() as calls:
        out, lse = flash_forward_fa2(q, k, v, causal=True, block_q=64, block_k=64)
    assert calls.count("bmm") == math.ceil(S / 4096)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, causal=True), atol=1e-5, rtol=1e-5)
    stats = FlashStats()  # the IO counts remain those of the 64 x 64 tiles
    flash_attention(q, k, v, causal=True, block_q=64, block_k=64, stats=stats)
    assert stats.block_pairs == math.ceil(S / 64)


def test_default_tiles_are_fixed_and_shared_by_the_loops_and_the_schedule():
    import inspect

    from course_lib.tiling import BLOCK_K, BLOCK_Q

    assert (BLOCK_Q, BLOCK_K) == (256, 256)
    for function in (flash_attention, flash_forward_fa2, flash_forward_fa1, flash_backward, tile_schedule):
        parameters = inspect.signature(function).parameters
        assert parameters["block_q"].default == BLOCK_Q and parameters["block_k"].default == BLOCK_K
    q, k, v = make_qkv(1, 2, 600, 530, 8, dtype=torch.float32)
    stats = FlashStats()
    out = flash_attention(q, k, v, causal=True, stats=stats)
    assert stats.block_pairs == 3 * 3
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "arguments, error, name",
    [
        ((torch.zeros(2), torch.zeros(2), torch.zeros(2, 1), [1.0], torch.zeros(1, 1)), TypeError, "scores"),
        (
            (torch.zeros(2), torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, 4), torch.zeros(4, 1)),
            ValueError,
            "row_sum",
        ),
        (
            (torch.zeros(2), torch.zeros(2), torch.zeros(2, 1), torch.zeros(3, 4), torch.zeros(4, 1)),
            ValueError,
            "scores",
        ),
        (
            (torch.zeros(2), torch.zeros(2), torch.zeros(1, 1), torch.zeros(2, 4), torch.zeros(4, 1)),
            ValueError,
            "accumulator",
        ),
        (
            (torch.zeros(2), torch.zeros(2), torch.zeros(2, 1), torch.zeros(2, 4), torch.zeros(5, 1)),
            ValueError,
            "values",
        ),
        (
            (torch.zeros(2), torch.zeros(2), torch.zeros(2, 1), torch.zeros(2, 4), torch.zeros(3, 4, 1)),
            ValueError,
            "values",
        ),
        (
            (
                torch.zeros(2, dtype=torch.long),
                torch.zeros(2),
                torch.zeros(2, 1),
                torch.zeros(2, 4),
                torch.zeros(4, 1),
            ),
            TypeError,
            "row_max",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_of_the_in_place_fold_names_the_argument(arguments, error, name):
    with pytest.raises(error, match=name):
        fold_block_(*arguments)
