"""Tests of course_lib.hardware: hand-counted intensities, roofline properties, measurements."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from course_lib import hardware
from course_lib.hardware import (
    ACCELERATORS,
    attention_bytes,
    attention_flops,
    attention_intensity,
    decode_intensity,
    gemm_intensity,
    gemv_intensity,
    measure_matmul_flops,
    measure_memory_bandwidth,
    prefill_intensity,
    ridge_point,
    roofline,
    time_bound,
)

# --- the accelerator table ------------------------------------------------------------------


def test_table_has_the_parts_the_course_uses():
    for name in ("A100-80GB-SXM", "H100-SXM", "H200-SXM", "RTX-4090", "RTX-4060-Laptop"):
        assert name in ACCELERATORS


@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_accelerator_figures_are_consistent(name):
    device = ACCELERATORS[name]
    assert device.sram_bytes == device.sm_count * device.sram_per_sm_bytes
    # SRAM is tiny next to HBM, and tensor cores beat plain fp32: the premise of the chapter.
    assert device.sram_bytes < device.memory_bytes / 1000
    assert device.peak_flops_16bit > device.peak_flops_fp32
    assert device.ridge_point == pytest.approx(device.peak_flops_16bit / device.memory_bandwidth)


def test_datasheet_dense_numbers_are_half_the_sparsity_numbers():
    # Datasheets headline "with sparsity" figures: H100/H200 1,979 and A100 624 TFLOPS bf16.
    assert ACCELERATORS["H100-SXM"].peak_flops_16bit == pytest.approx(1979e12 / 2, rel=1e-3)
    assert ACCELERATORS["H200-SXM"].peak_flops_16bit == pytest.approx(1979e12 / 2, rel=1e-3)
    assert ACCELERATORS["A100-80GB-SXM"].peak_flops_16bit == pytest.approx(624e12 / 2)


def test_h200_is_an_h100_with_more_and_faster_memory():
    h100, h200 = ACCELERATORS["H100-SXM"], ACCELERATORS["H200-SXM"]
    assert h200.peak_flops_16bit == h100.peak_flops_16bit
    assert h200.memory_bandwidth > h100.memory_bandwidth > ACCELERATORS["A100-80GB-SXM"].memory_bandwidth
    assert h200.memory_bytes > h100.memory_bytes


# --- arithmetic intensity, hand counted -------------------------------------------------------


def test_gemm_intensity_hand_count():
    # 2x2 @ 2x2: 2*2*2*2 = 16 FLOPs; 4 + 4 + 4 = 12 elements of 1 byte.
    assert gemm_intensity(2, 2, 2, bytes_per_element=1) == pytest.approx(16 / 12)
    # (3, 5) @ (5, 7): 210 FLOPs; 15 + 35 + 21 = 71 elements of 4 bytes.
    assert gemm_intensity(3, 7, 5, bytes_per_element=4) == pytest.approx(210 / 284)


def test_gemv_intensity_hand_count_and_ceiling():
    # A (3, 4) @ x (4): 24 FLOPs; 12 + 4 + 3 = 19 elements of 2 bytes.
    assert gemv_intensity(3, 4) == pytest.approx(24 / 38)
    assert gemv_intensity(4096, 4096) < 1.0  # below 2 / bytes_per_element, whatever the size


@pytest.mark.parametrize(
    "T, S, causal, pairs",
    [(2, 2, False, 4), (2, 2, True, 3), (3, 2, True, 3), (1, 5, True, 5), (2, 5, True, 9), (4, 4, True, 10)],
    ids=["T2-S2", "T2-S2-causal", "T3-S2-causal", "T1-S5-causal", "T2-S5-causal", "T4-S4-causal"],
)
def test_attention_flops_count_allowed_pairs(T, S, causal, pairs):
    # Pairs counted by hand with query i seeing keys 0 .. S - T + i; 4 D FLOPs per pair.
    assert attention_flops(T, S, 3, causal=causal) == 4 * 3 * pairs
    assert attention_flops(T, S, 3, batch_size=2, num_heads=5, causal=causal) == 4 * 3 * pairs * 10


def test_attention_bytes_hand_count_with_grouped_heads():
    # q and o: 2 * (1 * 2 heads * 1 token * 2 dims) = 8; k and v: 2 * (1 kv head * 4 * 2) = 16.
    assert attention_bytes(1, 4, 2, num_heads=2, num_kv_heads=1, bytes_per_element=2) == 48


def test_decode_is_memory_bound_at_about_one_flop_per_byte():
    # MHA in bf16: 4 S D FLOPs over ~2 S D elements of 2 bytes.
    assert decode_intensity(32768, 128, num_heads=32) == pytest.approx(1.0, rel=1e-3)
    # The batch does not help: every sequence has its own cache.
    assert decode_intensity(4096, 128, batch_size=64) == pytest.approx(decode_intensity(4096, 128))
    # Grouped-query attention with 8 query heads per KV head: about 8x.
    assert decode_intensity(32768, 128, num_heads=32, num_kv_heads=4) == pytest.approx(8.0, rel=1e-2)
    for device in ACCELERATORS.values():
        assert decode_intensity(4096, 128) < device.ridge_point


def test_prefill_intensity_grows_like_half_the_prompt():
    # Non-causal: 4 T^2 D FLOPs over 4 T D elements of 2 bytes.
    assert prefill_intensity(8192, 128, causal=False) == pytest.approx(8192 / 2)
    assert prefill_intensity(8192, 128) == pytest.approx(8192 / 4, rel=1e-3)  # causal: half the pairs
    assert prefill_intensity(8192, 128) > ACCELERATORS["H100-SXM"].ridge_point


@given(small=st.integers(1, 2000), extra=st.integers(1, 2000), D=st.integers(1, 256))
def test_prefill_intensity_increases_with_length(small, extra, D):
    assert prefill_intensity(small + extra, D) > prefill_intensity(small, D)


@given(n=st.integers(1, 300), extra=st.integers(1, 300))
def test_square_gemm_intensity_increases_with_size(n, extra):
    assert gemm_intensity(n + extra, n + extra, n + extra) > gemm_intensity(n, n, n)


def test_attention_intensity_is_flops_over_bytes():
    flops = attention_flops(5, 7, 3, num_heads=2, causal=True)
    moved = attention_bytes(5, 7, 3, num_heads=2, bytes_per_element=4)
    assert attention_intensity(5, 7, 3, num_heads=2, causal=True, bytes_per_element=4) == flops / moved


# --- roofline -------------------------------------------------------------------------------


def test_roofline_two_roofs_and_ridge():
    assert roofline(2.0, 100.0, 10.0) == 20.0  # memory roof
    assert roofline(50.0, 100.0, 10.0) == 100.0  # compute roof
    assert roofline(ridge_point(100.0, 10.0), 100.0, 10.0) == pytest.approx(100.0)
    assert roofline(0.0, 100.0, 10.0) == 0.0


def test_roofline_on_arrays_and_tensors():
    intensities = [0.5, 5.0, 50.0]
    expected = [5.0, 50.0, 100.0]
    np.testing.assert_allclose(roofline(np.array(intensities), 100.0, 10.0), expected)
    torch.testing.assert_close(roofline(torch.tensor(intensities), 100.0, 10.0), torch.tensor(expected))


@given(
    a=st.floats(0, 1e4),
    b=st.floats(0, 1e4),
    peak=st.floats(1e-3, 1e15),
    bandwidth=st.floats(1e-3, 1e13),
)
def test_roofline_is_monotone_and_capped(a, b, peak, bandwidth):
    low, high = sorted((a, b))
    assert roofline(low, peak, bandwidth) <= roofline(high, peak, bandwidth)
    assert roofline(high, peak, bandwidth) <= peak


def test_time_bound_hand_cases():
    assert time_bound(1e12, 1e9, 1e12, 1e12) == (1.0, "compute")
    seconds, roof = time_bound(1e6, 2e9, 1e12, 1e12)
    assert seconds == pytest.approx(2e-3) and roof == "memory"


# --- measurements ---------------------------------------------------------------------------


def test_measure_matmul_flops_is_positive_and_finite():
    flops = measure_matmul_flops(64, min_run_time=0.05)
    assert math.isfinite(flops) and flops > 0


def test_measure_memory_bandwidth_is_positive_and_finite():
    bandwidth = measure_memory_bandwidth(2**16, min_run_time=0.05)
    assert math.isfinite(bandwidth) and bandwidth > 0


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: gemm_intensity(0, 2, 2), ValueError, "M"),
        (lambda: gemm_intensity(2, 2, 2.5), TypeError, "K"),
        (lambda: gemm_intensity(2, 2, 2, bytes_per_element=0), ValueError, "bytes_per_element"),
        (lambda: gemv_intensity(3, 0), ValueError, "K"),
        (lambda: attention_flops(0, 2, 2), ValueError, "T"),
        (lambda: attention_flops(2, 2, 2, causal=1), TypeError, "causal"),
        (lambda: attention_bytes(2, 2, 2, num_kv_heads=0), ValueError, "num_kv_heads"),
        (lambda: attention_intensity(2, -1, 2), ValueError, "S"),
        (lambda: prefill_intensity(4, 0), ValueError, "D"),
        (lambda: decode_intensity(4, 2, batch_size=0), ValueError, "batch_size"),
        (lambda: roofline(-1.0, 1.0, 1.0), ValueError, "intensity"),
        (lambda: roofline("fast", 1.0, 1.0), TypeError, "intensity"),
        (lambda: roofline(np.array([1.0, -2.0]), 1.0, 1.0), ValueError, "intensity"),
        (lambda: roofline(1.0, 0.0, 1.0), ValueError, "peak_flops"),
        (lambda: roofline(1.0, 1.0, -5.0), ValueError, "bandwidth"),
        (lambda: ridge_point(1.0, 0.0), ValueError, "bandwidth"),
        (lambda: time_bound(-1.0, 1.0, 1.0, 1.0), ValueError, "flops"),
        (lambda: time_bound(1.0, 1.0, 1.0, 0.0), ValueError, "bandwidth"),
        (lambda: measure_matmul_flops(0), ValueError, "size"),
        (lambda: measure_matmul_flops(8, dtype=torch.int32), TypeError, "dtype"),
        (lambda: measure_matmul_flops(8, min_run_time=0), ValueError, "min_run_time"),
        (lambda: measure_memory_bandwidth(0), ValueError, "num_elements"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_module_exports_exist():
    for name in hardware.__all__:
        assert hasattr(hardware, name)
