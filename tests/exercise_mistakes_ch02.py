"""Wrong solutions of chapter 02's new build exercises (2.5, 2.6), one per misconception: each must fail its
checker with a message that names it (the fragment listed). Loaded by tests/exercise_mistakes.py."""

import time

import torch

import course_lib
from course_lib.measure import time_function


def _bandwidth(num_elements, *, dtype=torch.float32, device="cpu", timer=time_function, mistake=None):
    """A student's measurement with one misconception."""
    source = torch.ones(num_elements, dtype=dtype, device="cpu" if mistake == "device" else device)
    target = torch.empty_like(source)
    size = 4 if mistake == "4 bytes" else source.element_size()
    if mistake == "clone":
        seconds = timer(lambda: source.clone())
    elif mistake == "fill":
        seconds = timer(lambda: target.fill_(1.0))
    elif mistake == "twice":
        seconds = timer(lambda: (target.copy_(source), source.copy_(target)))
    elif mistake == "nothing":
        seconds = timer(lambda: None)
    elif mistake == "no timer":
        start = time.perf_counter()
        target.copy_(source)
        seconds = time.perf_counter() - start
    else:
        seconds = timer(lambda: target.copy_(source))
    moved = (1 if mistake == "read only" else 2) * num_elements * (1 if mistake == "elements" else size)
    return moved / seconds / (1e9 if mistake == "GB/s" else 1)


def _bandwidth_with(mistake):
    return lambda num_elements, **kwargs: _bandwidth(num_elements, **kwargs, mistake=mistake)


def _place(T, S, D, H, H_kv, causal, b, seconds, peak, bandwidth, *, mistake=None):
    """A student's placement with one misconception."""
    if not causal:
        pairs = T * S
    elif mistake == "half":
        pairs = T * S / 2
    elif mistake == "start":
        pairs = sum(min(S, i + 1) for i in range(T))
    else:
        pairs = sum(min(S, max(0, i + S - T + 1)) for i in range(T))
    flops = (2 if mistake == "2D" else 4) * D * H * pairs
    kv_heads = H if mistake == "GQA ignored" else H_kv
    moved = ((1 if mistake == "no output" else 2) * H * T * D + 2 * kv_heads * S * D) * b
    intensity = flops / moved
    attainable = (max if mistake == "max" else min)(peak, intensity * bandwidth)
    achieved = flops / seconds
    fraction = achieved / (peak if mistake == "of peak" else attainable)
    if mistake == "bound from achieved":
        bound = "compute" if achieved >= peak else "memory"
    else:
        bound = "memory" if intensity < peak / bandwidth else "compute"
    return {"flops": flops, "bytes": moved, "intensity": intensity, "attainable": attainable,
            "achieved": achieved, "fraction": fraction, "bound": bound}  # fmt: skip


def _place_with(mistake):
    return lambda *args: _place(*args, mistake=mistake)


def _library_placement(T, S, D, H, H_kv, causal, b, seconds, peak, bandwidth):
    hardware = course_lib.hardware
    flops = hardware.attention_flops(T, S, D, num_heads=H, causal=causal)
    moved = hardware.attention_bytes(T, S, D, num_heads=H, num_kv_heads=H_kv, bytes_per_element=b)
    return _place(T, S, D, H, H_kv, causal, b, seconds, peak, bandwidth) | {"flops": flops, "bytes": moved}


MISTAKES = {
    "2.5": [
        ("the bytes read only", "the bytes read only", _bandwidth_with("read only")),
        ("elements, not bytes", "elements per second, not bytes", _bandwidth_with("elements")),
        ("GB/s", "GB/s (divided by 1e9)", _bandwidth_with("GB/s")),
        (
            "4 bytes per element whatever the dtype",
            "4 bytes per element whatever",
            _bandwidth_with("4 bytes"),
        ),
        ("an allocation inside the timed function", "allocates a new tensor", _bandwidth_with("clone")),
        ("a fill instead of a copy", "only writes", _bandwidth_with("fill")),
        ("two copies timed, one counted", "runs 2 copies", _bandwidth_with("twice")),
        ("time.perf_counter instead of the timer", "never called timer", _bandwidth_with("no timer")),
        ("the device ignored", "not on device='meta'", _bandwidth_with("device")),
        ("nothing timed", "touches at most 0 elements", _bandwidth_with("nothing")),
        (
            "the library's private timer",
            "course's own code",
            lambda num_elements, **kwargs: (
                2 * num_elements * 4 / course_lib.hardware._timer_median("1 + 1", {}, 0.01)
            ),
        ),
        (
            "the library's measure_memory_bandwidth",
            "course's own code",
            lambda num_elements, **kwargs: course_lib.hardware.measure_memory_bandwidth(
                num_elements, dtype=kwargs.get("dtype", torch.float32), device=kwargs.get("device", "cpu")
            ),
        ),
    ],
    "2.6": [
        ("causal pairs as T S / 2", "half the square", _place_with("half")),
        ("the causal mask aligned to the start", "aligned to the start", _place_with("start")),
        ("2 D FLOPs per pair", "2 D per pair", _place_with("2D")),
        ("GQA ignored in the bytes", "once per query head", _place_with("GQA ignored")),
        ("the output not written", "never written", _place_with("no output")),
        ("the higher roof", "the higher roof", _place_with("max")),
        ("the fraction of the peak", "fraction of the compute roof", _place_with("of peak")),
        (
            "the bound from the achieved FLOP/s",
            "the intensity decides it",
            _place_with("bound from achieved"),
        ),
        ("the library's attention_flops and attention_bytes", "course's own code", _library_placement),
    ],
}
