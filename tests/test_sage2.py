"""SageAttention2's simulated numerics against exact float64 attention and against SageAttention."""

from __future__ import annotations

import pytest
import torch

from course_lib.standard import attention
from course_lib.tiling import quantized_attention
from course_lib.tiling.sage2 import (
    AttentionError,
    attention_error,
    outlier_qkv,
    quantize_groups,
    sage2_attention,
    thread_groups,
    truncate_mantissa,
)


def exact(q, k, v, causal=False):
    return attention(q.double(), k.double(), v.double(), causal=causal)


@pytest.fixture(scope="module")
def outliers():
    """Realistic Q, K, V: per-channel offsets shared by all tokens, 4 outlier channels."""
    q, k, v = outlier_qkv(1, 4, 256, 256, 64, seed=1)
    return q, k, v, exact(q, k, v)


# --- quantisation groups, from the mma.m16n8k64 register layout -----------------------------------


def test_thread_groups_follow_the_mma_register_layout():
    block_q, block_k = 64, 64
    q_groups = thread_groups(128, operand="q", block_size=block_q)
    k_groups = thread_groups(128, operand="k", block_size=block_k)
    for lane in range(32):
        group_id, thread_in_group = lane // 4, lane % 4
        for warp in range(128 // 16):
            # The accumulators of one lane lie in rows group_id and group_id + 8 of its warp's slice.
            rows = [warp * 16 + group_id, warp * 16 + group_id + 8]
            assert q_groups[rows[0]] == q_groups[rows[1]]
        for block in range(128 // block_k):
            # ... and in the key columns 2t, 2t + 1 of every 8-key tile of the block.
            keys = [block * block_k + 8 * tile + 2 * thread_in_group + e for tile in range(8) for e in (0, 1)]
            assert len({int(k_groups[j]) for j in keys}) == 1
    # As coarse as the layout allows and no coarser: 8 Q scales per 16 rows, 4 K scales per block.
    assert len(q_groups.unique()) == 128 // 16 * 8 and len(k_groups.unique()) == 128 // block_k * 4
    assert torch.bincount(q_groups).eq(2).all() and torch.bincount(k_groups).eq(16).all()


def test_thread_groups_other_granularities_and_ragged_lengths():
    assert torch.equal(thread_groups(5, operand="q", block_size=2, granularity="token"), torch.arange(5))
    assert thread_groups(5, operand="k", block_size=2, granularity="block").tolist() == [0, 0, 1, 1, 2]
    groups = thread_groups(37, operand="q", block_size=20)  # blocks of 20 rows: warp slices of 16 + 4
    assert groups[0] == groups[8] and groups[16] != groups[0]  # the second warp slice of block 0
    assert groups[20] == groups[28] and groups[20] != groups[0]  # block 1 starts at row 20
    assert thread_groups(0, operand="k", block_size=4).shape == (0,)


def test_quantize_groups_codes_and_scales():
    x = torch.randn(2, 3, 10, 5, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    codes, scales = quantize_groups(x, groups, bits=4)
    assert codes.abs().max() <= 7 and torch.equal(codes, codes.round())
    for g in range(4):
        rows = (groups == g).nonzero().flatten()
        largest = x[:, :, rows].abs().amax(dim=(-1, -2))
        torch.testing.assert_close(scales[:, :, rows], (largest / 7).unsqueeze(-1).expand(-1, -1, len(rows)))
    assert ((codes * scales.unsqueeze(-1) - x).abs() <= scales.unsqueeze(-1) / 2 + 1e-12).all()
    zeros, unit = quantize_groups(torch.zeros(1, 1, 3, 2), torch.zeros(3, dtype=torch.long))
    assert (zeros == 0).all() and (unit == 1).all()


def test_truncate_mantissa_keeps_13_bits_toward_zero():
    one = torch.tensor([1.0, 1 + 2**-13, 1 + 2**-14, -(1 + 2**-14), 3 * 2**-20, 0.0])
    assert truncate_mantissa(one).tolist() == [1.0, 1 + 2**-13, 1.0, -1.0, 3 * 2**-20, 0.0]
    x = torch.randn(1000) * 100
    cut = truncate_mantissa(x)
    assert (cut.abs() <= x.abs()).all() and ((x - cut).abs() < x.abs() * 2**-13).all()
    assert torch.equal(truncate_mantissa(cut), cut)
    assert torch.equal(truncate_mantissa(x.double(), 52), x.double())


# --- the algebra of smoothing is exact --------------------------------------------------------------


def test_smoothing_q_and_k_is_exact_when_quantisation_is_lossless():
    # Rows of small integers with a +-7 in each, paired with their negation, so each query block
    # and the whole of K have mean zero and every per-token INT4 code is exact. Adding offsets
    # (per query block, per key channel) then tests only the smoothing algebra: the query means'
    # scores must be added back, the key mean must drop out.
    g = torch.Generator().manual_seed(0)

    def paired_integers(n, d):
        half = torch.randint(-6, 7, (1, 2, n // 2, d), generator=g).double()
        half[..., 0] = 7
        return torch.stack((half, -half), dim=3).reshape(1, 2, n, d)

    q = paired_integers(8, 6) + torch.randn(1, 2, 2, 6, generator=g).double().repeat_interleave(4, dim=2) * 5
    k = paired_integers(10, 6) + torch.randn(1, 2, 1, 6, generator=g).double() * 5
    v = torch.randn(1, 2, 10, 3, generator=g).double()
    out = sage2_attention(q, k, v, granularity="token", block_q=4, block_k=4, pv_format="full", scale=0.3)
    torch.testing.assert_close(out, attention(q, k, v, scale=0.3), atol=1e-10, rtol=1e-10)
    # Forgetting the query means' scores is measurably wrong on the same inputs.
    unsmoothed = sage2_attention(
        q, k, v, granularity="token", block_q=4, smooth_q=False, pv_format="full", scale=0.3
    )
    assert attention_error(unsmoothed, attention(q, k, v, scale=0.3)).relative_l1 > 1e-3


def test_smooth_v_is_exact_in_full_precision_and_helps_fp8_with_a_value_offset():
    q, k, v = outlier_qkv(1, 2, 64, 64, 32, seed=2)
    v = v + torch.randn(32) * 20  # a large per-channel offset in V
    reference = exact(q, k, v)
    plain = sage2_attention(q, k, v, bits=8, pv_format="full")
    smoothed = sage2_attention(q, k, v, bits=8, pv_format="full", smooth_v=True)
    torch.testing.assert_close(smoothed.double(), plain.double(), atol=1e-4, rtol=1e-4)
    fp8 = attention_error(sage2_attention(q, k, v, bits=8), reference).relative_l1
    fp8_smoothed = attention_error(sage2_attention(q, k, v, bits=8, smooth_v=True), reference).relative_l1
    assert fp8_smoothed < fp8 / 2


# --- error bounds on realistic inputs ------------------------------------------------------------------


def test_sage2_int4_meets_its_error_bound_on_outlier_channels(outliers):
    q, k, v, reference = outliers
    error = attention_error(sage2_attention(q, k, v), reference)
    assert error.cosine > 0.999 and error.relative_l1 < 0.05
    # Broken variants miss the bound by a wide margin.
    no_smooth_q = attention_error(sage2_attention(q, k, v, smooth_q=False), reference)
    no_smoothing = attention_error(sage2_attention(q, k, v, smooth_q=False, smooth_k=False), reference)
    assert no_smooth_q.relative_l1 > 3 * error.relative_l1 and no_smooth_q.cosine < 0.995
    assert no_smoothing.relative_l1 > no_smooth_q.relative_l1
    # SageAttention (1)'s recipe at 4 bits (K smoothing, block scales) is far worse.
    sage1_int4 = attention_error(quantized_attention(q, k, v, bits=4), reference)
    assert sage1_int4.relative_l1 > 3 * error.relative_l1


def test_granularity_per_thread_is_between_per_token_and_per_block(outliers):
    q, k, v, reference = outliers
    errors = {
        granularity: attention_error(
            sage2_attention(q, k, v, granularity=granularity, pv_format="full"), reference
        ).relative_l1
        for granularity in ("token", "thread", "block")
    }
    assert errors["token"] < errors["thread"] < 0.9 * errors["block"]


def test_int8_with_full_pv_is_as_accurate_as_sageattention(outliers):
    q, k, v, reference = outliers
    sage1 = attention_error(quantized_attention(q, k, v), reference).relative_l1
    sage2_8b = attention_error(sage2_attention(q, k, v, bits=8, pv_format="full"), reference).relative_l1
    assert sage2_8b < 0.003 and sage2_8b < 2 * sage1
    # FP8 P V costs accuracy of its own, visible at 8 bits where Q K^T is nearly exact.
    fp8 = attention_error(sage2_attention(q, k, v, bits=8), reference).relative_l1
    assert sage2_8b < fp8 < 0.04


def test_two_level_accumulation_stays_close_to_an_ideal_accumulator():
    # Identical quantisation, three accumulators: the FP22 register over the whole row drifts
    # step after step; confined to one key block it stays within a few FP22 roundings.
    q, k, v = outlier_qkv(1, 2, 32, 2048, 32, seed=3)
    ideal = sage2_attention(q, k, v, bits=8, accumulation="fp32")
    two_level = attention_error(sage2_attention(q, k, v, bits=8, accumulation="two_level"), ideal)
    single = attention_error(sage2_attention(q, k, v, bits=8, accumulation="fp22"), ideal)
    assert two_level.relative_l1 < 1e-4
    assert single.relative_l1 > 10 * two_level.relative_l1 and single.relative_l1 > 3e-4


# --- shapes, masks, dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("T,S,D,D_v", [(1, 1, 8, 8), (1, 50, 16, 16), (37, 37, 7, 5), (70, 29, 16, 24)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_awkward_shapes_stay_close_to_exact(T, S, D, D_v, causal):
    q, k, v = outlier_qkv(2, 2, T, S, max(D, D_v), seed=4)
    q, k, v = q[..., :D], k[..., :D], v[..., :D_v]
    out = sage2_attention(q, k, v, causal=causal, block_q=32, block_k=16)
    assert out.shape == (2, 2, T, D_v) and out.dtype == torch.float32
    reference = exact(q, k, v, causal=causal)
    if causal and T > S:  # the first T - S queries see nothing: zeros, not NaN
        assert (out[:, :, : T - S] == 0).all()
    assert torch.isfinite(out).all()
    assert attention_error(out, reference).relative_l1 < 0.1


def test_empty_sequences():
    q, k, v = outlier_qkv(1, 2, 4, 6, 8)
    assert sage2_attention(q[:, :, :0], k, v).shape == (1, 2, 0, 8)
    assert (sage2_attention(q, k[:, :, :0], v[:, :, :0]) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, k, v = outlier_qkv(1, 2, 64, 64, 32, seed=5, dtype=dtype)
    out = sage2_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    error = attention_error(out, exact(q, k, v, causal=True))
    assert error.cosine > 0.998 and error.relative_l1 < 0.06


def test_attention_error_metrics():
    exact_values = torch.tensor([1.0, -2.0, 2.0, 0.0])
    error = attention_error(exact_values + torch.tensor([0.0, 0.5, 0.0, -0.5]), exact_values)
    assert isinstance(error, AttentionError)
    assert error.relative_l1 == pytest.approx(1.0 / 5.0) and error.rmse == pytest.approx((0.5 / 4) ** 0.5)
    assert attention_error(exact_values, exact_values).cosine == pytest.approx(1.0)


def test_outlier_qkv_has_channel_offsets_and_is_seeded():
    q, k, v = outlier_qkv(1, 2, 500, 400, 16, outlier_channels=2, seed=7)
    assert q.shape == (1, 2, 500, 16) and k.shape == (1, 2, 400, 16)
    channel_means = k.mean(dim=2).abs()
    assert (channel_means.amax(-1) > 5 * channel_means.median(-1).values).all()  # outlier channels
    assert torch.equal(outlier_qkv(1, 2, 5, 5, 16, seed=7)[0], outlier_qkv(1, 2, 5, 5, 16, seed=7)[0])


# --- bad input ---------------------------------------------------------------------------------------------

_q, _k, _v = outlier_qkv(1, 2, 4, 4, 8)


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: sage2_attention(_q, _k, _v, bits=3), ValueError, "bits"),
        (lambda: sage2_attention(_q, _k, _v, granularity="warp"), ValueError, "granularity"),
        (lambda: sage2_attention(_q, _k, _v, smooth_q=1), TypeError, "smooth_q"),
        (lambda: sage2_attention(_q, _k, _v, smooth_v="yes"), TypeError, "smooth_v"),
        (lambda: sage2_attention(_q, _k, _v, pv_format="int8"), ValueError, "pv_format"),
        (lambda: sage2_attention(_q, _k, _v, accumulation="fp16"), ValueError, "accumulation"),
        (lambda: sage2_attention(_q, _k, _v, block_q=0), ValueError, "block_q"),
        (lambda: sage2_attention(_q, _k, _v, block_k=-1), ValueError, "block_k"),
        (lambda: sage2_attention(_q, _k, _v, mma_k=0), ValueError, "mma_k"),
        (lambda: sage2_attention(_q, _k, _v, scale=float("nan")), ValueError, "scale"),
        (lambda: sage2_attention(_q, _k[..., :4], _v), ValueError, "k"),
        (lambda: sage2_attention(_q.half(), _k, _v), TypeError, "q, k and v"),
        (lambda: thread_groups(4, operand="v", block_size=2), ValueError, "operand"),
        (lambda: thread_groups(4, operand="q", block_size=0), ValueError, "block_size"),
        (lambda: quantize_groups(_q, torch.zeros(3, dtype=torch.long)), ValueError, "groups"),
        (lambda: quantize_groups(_q, torch.zeros(4, dtype=torch.long), bits=9), ValueError, "bits"),
        (lambda: truncate_mantissa(torch.ones(2), -1), ValueError, "mantissa_bits"),
        (lambda: truncate_mantissa([1.0]), TypeError, "x"),
        (lambda: outlier_qkv(1, 2, 4, 4, 8, outlier_channels=9), ValueError, "outlier_channels"),
        (lambda: attention_error(torch.ones(2), torch.ones(3)), ValueError, "approximate"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_attention_error_of_identical_outputs_is_perfect_even_when_zero():
    # cosine_similarity of two zero vectors is 0: identical (zero) outputs were reported as unrelated.
    zeros = torch.zeros(1, 2, 3, 4)
    assert attention_error(zeros, zeros) == AttentionError(cosine=1.0, relative_l1=0.0, rmse=0.0)
    assert attention_error(zeros, torch.ones(1, 2, 3, 4)).cosine == 0.0
