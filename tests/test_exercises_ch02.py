"""Chapter 02's checkers against independent references: the closed forms of exercise 2.6 equal the library's
counts, the watching timer of exercise 2.5 accepts every honest way to time a copy and tells what it saw."""

import pytest
import torch

from course_lib import hardware
from course_lib.exercises.ch02 import (
    _pairs,
    _placement,
    _WatchingTimer,
    check_memory_bandwidth,
    check_place_attention,
)
from course_lib.measure import time_function


@pytest.mark.parametrize("causal", [False, True])
def test_the_closed_form_pair_count_equals_the_library_count(causal):
    for T in range(1, 14):
        for S in range(1, 14):
            expected = hardware.attention_flops(T, S, 1, causal=causal) // 4
            assert _pairs(T, S, causal) == expected, (T, S)
            counted = sum(min(S, max(0, i + S - T + 1)) for i in range(T)) if causal else T * S
            assert _pairs(T, S, causal) == counted


def test_the_placement_equals_the_library_roofline():
    for T, S, H, H_kv, causal in [(4096, 4096, 32, 32, True), (1, 8192, 32, 8, False), (7, 100, 8, 2, True)]:
        peak, bandwidth, seconds = 989.4e12, 3.35e12, 1e-3
        placed = _placement(T, S, 128, H, H_kv, causal, 2, seconds, peak, bandwidth)
        flops = hardware.attention_flops(T, S, 128, num_heads=H, causal=causal)
        moved = hardware.attention_bytes(T, S, 128, num_heads=H, num_kv_heads=H_kv)
        assert placed["flops"] == flops and placed["bytes"] == moved
        assert placed["attainable"] == hardware.roofline(flops / moved, peak, bandwidth)
        assert placed["bound"] == hardware.time_bound(flops, moved, peak, bandwidth)[1]


def _copy_with(kind):
    def bandwidth(num_elements, *, dtype=torch.float32, device="cpu", timer=time_function):
        source = torch.ones(num_elements, dtype=dtype, device=device)
        target = torch.zeros_like(source)
        if kind == "slice assignment":
            step = lambda: target.__setitem__(slice(None), source)  # noqa: E731
        elif kind == "out=":
            step = lambda: torch.add(source, 0, out=target)  # noqa: E731
        else:
            step = lambda: target.copy_(source)  # noqa: E731
        seconds = min(timer(step) for _ in range(3 if kind == "best of three" else 1))
        return 2 * num_elements * source.element_size() / seconds

    return bandwidth


@pytest.mark.parametrize("kind", ["copy_", "slice assignment", "out=", "best of three"])
def test_honest_ways_to_time_a_copy_pass(kind):
    outcome = check_memory_bandwidth.run(_copy_with(kind), seed=1)
    assert outcome, outcome.message


def test_the_watching_timer_records_what_runs_and_answers_its_seconds():
    timer = _WatchingTimer(0.25)
    source = torch.ones(1000, device="meta")
    target = torch.empty_like(source)
    assert timer(lambda: target.copy_(source)) == 0.25 and len(timer.calls) == 1
    (copy,) = timer.calls[0]
    assert copy["name"].startswith("copy_") and copy["mutable"] and copy["inputs"] == [1000, 1000]
    assert copy["devices"] == {"meta"}


def test_a_real_measurement_far_from_the_librarys_is_refused():
    def per_millisecond(num_elements, *, dtype=torch.float32, device="cpu", timer=time_function):
        source = torch.ones(num_elements, dtype=dtype, device=device)
        target = torch.empty_like(source)
        seconds = timer(lambda: target.copy_(source))
        factor = 1e-3 if device == "cpu" else 1  # right on the probe, bytes per millisecond for real
        return factor * 2 * num_elements * source.element_size() / seconds

    outcome = check_memory_bandwidth.run(per_millisecond, seed=0)
    assert outcome.status == "fail" and "more than 4 times apart" in outcome.message


def test_a_placement_without_every_key_is_told_which_are_missing():
    outcome = check_place_attention.run(lambda *args: {"flops": 1}, seed=0)
    assert outcome.status == "fail" and "bytes, intensity, attainable" in outcome.message
