"""Exercises of notebook 02: the intensity of a GEMM, the roofline, measuring this machine's memory bandwidth
and placing an attention call on a roofline (build); one decode step's time on an H100 and the batch that
makes a linear layer compute-bound (predict); why naive attention's prefill is memory-bound (explain).

Expected values are closed forms written out here (FLOPs, bytes, pairs of a causal mask), not the library's
functions; a measured bandwidth is judged by what the function times (a watching timer on the meta device)
and by how close it comes to the library's own measurement.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .common import Case, Draw, Mismatch, checker, compare_number, declare

__all__ = [
    "check_gemm_intensity",
    "check_roofline",
    "check_memory_bandwidth",
    "check_place_attention",
]

declare("2.3", kind="predict", title="one decode step's time per layer on an H100")
declare("2.4", kind="predict", title="the batch from which a decode-time linear layer is compute-bound")
declare("2.7", kind="explain", title="why naive attention's prefill is memory-bound", points=2)


def _gemm_case(M: int, N: int, K: int, size: int, name: str) -> Case:
    flops = 2 * M * N * K  # M*N outputs, each a K-term dot product: K multiplies and K adds
    moved = (M * K + K * N + M * N) * size
    variants = {
        "M*N*K FLOPs over the bytes (a multiply-add is 2 FLOPs)": M * N * K / moved,
        "FLOPs over the bytes of A and B only (the output C is written too)": flops
        / ((M * K + K * N) * size),
        "FLOPs per element, not per byte (times bytes_per_element missing)": flops / (M * K + K * N + M * N),
        "bytes over FLOPs (the ratio upside down)": moved / flops,
    }

    def judge(got, expected):
        compare_number(got, expected, "intensity", rel=1e-12, variants=variants)

    return Case(
        name,
        (M, N, K, size),
        expected=flops / moved,
        compare=judge,
        inputs=["M", "N", "K", "bytes_per_element"],
    )


@checker("2.1", title="the intensity of a GEMM", points=1, task="the GEMM's intensity")
def check_gemm_intensity(draw: Draw):
    """``fn(M, N, K, bytes_per_element)``: FLOPs per byte of ``(M, K) @ (K, N)``, each matrix moved once."""
    for name, (M, N, K) in [
        ("a large square GEMM", (2 ** draw.int(10, 13),) * 3),
        ("a GEMV (N = 1)", (draw.int(1000, 8000), 1, draw.int(1000, 8000))),
        ("one token (M = 1)", (1, draw.int(1000, 8000), draw.int(1000, 8000))),
        ("an uneven shape", (draw.int(3, 300), draw.int(3, 300), draw.int(3, 300))),
        ("the smallest GEMM (1, 1, 1)", (1, 1, 1)),
    ]:
        yield _gemm_case(M, N, K, draw.choice([1, 2, 4]), name)


@checker("2.2", title="the roofline", points=1, task="the roofline", fallback="course_lib.hardware:roofline")
def check_roofline(draw: Draw):
    """``fn(intensity, peak_flops, bandwidth)``: attainable FLOP/s, the lower of the two roofs."""
    peak, bandwidth = draw.float(50e12, 2000e12), draw.float(0.5e12, 5e12)
    ridge = peak / bandwidth
    for name, intensity in [
        ("memory-bound (left of the ridge)", draw.float(0.1, 0.5) * ridge),
        ("compute-bound (right of the ridge)", draw.float(2.0, 50.0) * ridge),
        ("exactly at the ridge point", ridge),
        ("zero intensity", 0.0),
        ("one FLOP per byte", 1.0),
    ]:
        expected = min(peak, intensity * bandwidth)
        variants = {
            "the higher roof (max instead of min)": max(peak, intensity * bandwidth),
            "intensity x bandwidth without the compute roof": intensity * bandwidth,
            "the compute roof alone": peak,
            "intensity x peak": intensity * peak,
        }

        def judge(got, expected, variants=variants):
            compare_number(
                got,
                expected,
                "attainable FLOP/s",
                rel=1e-12,
                variants={k: v for k, v in variants.items() if v != expected},
            )

        yield Case(
            name,
            (intensity, peak, bandwidth),
            expected=expected,
            compare=judge,
            inputs=["intensity", "peak_flops", "bandwidth"],
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 2.5: measuring this machine's memory bandwidth.

# ATen ops that only create a tensor (their output is new memory, whatever they read).
_FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn", "randint", "arange", "scalar_tensor")


class _WatchingTimer(TorchDispatchMode):
    """The ``timer`` the checker hands to the reader's function: it runs ``fn`` once, records the ATen ops
    that ``fn`` runs (what is timed), and answers a fixed number of seconds, so the bandwidth the function
    computes from it can be checked exactly. The checker runs it on the meta device: no memory is touched."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.calls: list[list[dict]] = []  # the ops of each call

    def __call__(self, fn):
        self.calls.append([])
        with self:
            fn()
        return self.seconds

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        outputs = [
            o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)
        ]
        self.calls[-1].append(
            {
                "name": func.name().removeprefix("aten::"),
                "mutable": schema.is_mutable,
                "inputs": [t.numel() for t in inputs],
                "outputs": [t.numel() for t in outputs],
                "devices": {str(t.device) for t in inputs + outputs},
            }
        )
        return out


def _judge_timed(timer: _WatchingTimer, n: int, device: str) -> None:
    """Raise :class:`Mismatch` unless each call of the timer timed one copy of ``n`` elements, no more."""
    if not timer.calls:
        raise Mismatch(
            "your function never called timer: time the copy with `seconds = timer(lambda: ...)` (the "
            "checker passes a timer that watches what you time; in the notebook the default really times)"
        )
    for ops in timer.calls:
        _judge_one_call(ops, n, device)


def _judge_one_call(ops: list[dict], n: int, device: str) -> None:
    big = [op for op in ops if max(op["outputs"] + op["inputs"] + [0]) >= n]
    if not big:
        largest = max((max(op["outputs"] + op["inputs"] + [0]) for op in ops), default=0)
        raise Mismatch(
            f"the function you time touches at most {largest} elements, not num_elements={n}: time a copy of "
            "the whole tensor"
        )
    wrong_device = sorted({d for op in big for d in op["devices"]} - {device})
    if wrong_device:
        raise Mismatch(
            f"your tensors are on {', '.join(wrong_device)}, not on device={device!r} that the checker asked "
            "for: create them with device=device"
        )
    for op in big:
        base = op["name"].split(".")[0]
        if (
            base in _FACTORIES
            or base.startswith(tuple(f + "_" for f in _FACTORIES))
            or (not op["mutable"] and max(op["outputs"] + [0]) >= n)
        ):
            raise Mismatch(
                f"the function you time allocates a new tensor of {max(op['outputs'])} elements on every "
                f"call (aten.{op['name']}): you would time the allocator and the page faults too. Allocate "
                "the source and the target once, outside, and time only target.copy_(source)"
            )
    copies = [op for op in big if op["mutable"] and sum(size >= n for size in op["inputs"]) >= 2]
    if not copies:
        only = big[0]
        what = "only writes" if only["mutable"] else "only reads"
        raise Mismatch(
            f"the function you time {what} its {n} elements (aten.{only['name']}): a copy reads every "
            "element once and writes it once; time target.copy_(source)"
        )
    if len(copies) > 1:
        raise Mismatch(
            f"the function you time runs {len(copies)} copies of {n} elements "
            f"({', '.join('aten.' + op['name'] for op in copies)}): time one copy, or count the bytes of all"
        )


@checker(
    "2.5",
    title="measuring this machine's memory bandwidth",
    points=2,
    task="the bandwidth measurement",
    allow=("course_lib.measure.time_function", "course_lib.exercises.ch02._WatchingTimer"),
    fallback="course_lib.hardware:measure_memory_bandwidth",
)
def check_memory_bandwidth(draw: Draw):
    """``fn(num_elements, *, dtype=torch.float32, device="cpu", timer=time_function)``: bytes per second of a
    copy of ``num_elements`` elements from one tensor into another, each element read once and written once;
    ``timer(fn)`` returns the seconds of one call of ``fn()``."""
    for name, dtype in [
        ("float32", torch.float32),
        ("float16: 2 bytes per element", torch.float16),
        ("float64: 8 bytes per element", torch.float64),
        ("bfloat16, a length that is not a power of two", torch.bfloat16),
    ]:
        n = draw.int(2**16, 2**21) | 1 if "power" in name else 2 ** draw.int(16, 21)
        seconds = draw.float(1e-5, 1e-2)
        size = torch.empty((), dtype=dtype).element_size()
        timer = _WatchingTimer(seconds)
        expected = 2 * n * size / seconds
        variants = {
            "the bytes read only, over the seconds (a copy also writes every byte)": n * size / seconds,
            "elements per second, not bytes (times the element size missing)": 2 * n / seconds,
            "bits per second, not bytes": 16 * n * size / seconds,
            "GB/s (divided by 1e9): return bytes per second": expected / 1e9,
            "GiB/s (divided by 2**30): return bytes per second": expected / 2**30,
            "seconds per byte (the ratio upside down)": seconds / (2 * n * size),
        }
        if size != 4:
            variants["4 bytes per element whatever the dtype: use tensor.element_size()"] = 8 * n / seconds

        def judge(got, expected, timer=timer, n=n, variants=variants):
            _judge_timed(timer, n, "meta")
            compare_number(got, expected, "bytes per second", rel=1e-9, variants=variants)

        yield Case(
            f"{name}: {n} elements, a watching timer that answers {seconds:.3g} s (on the meta device, so "
            "nothing is allocated)",
            (n,),
            {"dtype": dtype, "device": "meta", "timer": timer},
            expected=expected,
            compare=judge,
            inputs=["num_elements"],
            copy_args=False,
        )
    n = 2**22  # 16 MiB per buffer in float32: more than most caches, quick to copy

    def measured() -> float:
        from ..hardware import measure_memory_bandwidth

        return measure_memory_bandwidth(n, min_run_time=0.1, device="cpu")

    def plausible(got, expected):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got) or got <= 0:
            raise Mismatch(f"expected a positive number of bytes per second, got {got!r}")
        ratio = got / expected
        if not 0.25 <= ratio <= 4:
            raise Mismatch(
                f"your measurement says {got / 1e9:.3g} GB/s, the library's measure_memory_bandwidth "
                f"{expected / 1e9:.3g} GB/s on the same copy ({ratio:.2g} times): more than 4 times apart "
                "even on a busy machine. Is the timer's answer seconds per call, and is every byte counted "
                "once?"
            )

    yield Case(
        f"for real on the CPU with your default timer: {n} float32 elements, compared with the library's "
        "measurement (within a factor of 4: timings are noisy)",
        (n,),
        {"dtype": torch.float32, "device": "cpu"},
        expected=measured,
        compare=plausible,
        inputs=["num_elements"],
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 2.6: one attention call placed on a roofline.


def _pairs(T: int, S: int, causal: bool, *, start_aligned: bool = False) -> int:
    """(query, key) pairs computed: T*S, or with the causal mask aligned to the end (query i sees keys
    j <= i + S - T) the closed form below; ``start_aligned`` is the wrong mask j <= i."""
    if not causal:
        return T * S
    if start_aligned:  # query i sees min(i + 1, S) keys
        m = min(T, S)
        return m * (m + 1) // 2 + (T - m) * S
    seeing = min(T, S)  # queries that see at least one key: the last min(T, S)
    first = max(0, T - S) + S - T + 1  # keys seen by the first of them; the last sees all S
    return (first + S) * seeing // 2


PLACEMENT_KEYS = ("flops", "bytes", "intensity", "attainable", "achieved", "fraction", "bound")


def _placement(T, S, D, num_heads, num_kv_heads, causal, b, seconds, peak, bandwidth, **wrong) -> dict:
    pairs = _pairs(T, S, causal, start_aligned=wrong.get("start_aligned", False))
    if wrong.get("half_pairs") and causal:
        pairs = T * S / 2
    flops = (2 if wrong.get("two_d") else 4) * D * num_heads * pairs
    kv_heads = num_heads if wrong.get("kv_as_query_heads") else num_kv_heads
    query_side = (1 if wrong.get("no_output") else 2) * num_heads * T * D
    moved = (query_side + 2 * kv_heads * S * D) * b
    intensity = flops / moved
    attainable = min(peak, intensity * bandwidth)
    achieved = flops / seconds
    return {
        "flops": flops,
        "bytes": moved,
        "intensity": intensity,
        "attainable": attainable,
        "achieved": achieved,
        "fraction": achieved / attainable,
        "bound": "memory" if intensity < peak / bandwidth else "compute",
    }


@checker("2.6", title="placing an attention call on the roofline", points=2, task="the placement")
def check_place_attention(draw: Draw):
    """``fn(T, S, D, num_heads, num_kv_heads, causal, bytes_per_element, seconds, peak_flops, bandwidth)`` ->
    a dict with ``flops`` (4 D per computed pair and query head), ``bytes`` (q and o once per query head, k
    and v once per KV head), ``intensity``, ``attainable`` (the roofline there), ``achieved`` (flops per
    second), ``fraction`` (achieved / attainable) and ``bound`` ("memory" left of the ridge, else
    "compute")."""
    for name, T, S, D, H, H_kv, causal, b in [
        ("causal prefill, T = S, MHA, bf16", (n := draw.int(512, 8192)), n, 128, (h := draw.choice([8, 32])),
         h, True, 2),
        ("decoding: one query, GQA", 1, draw.int(1000, 40000), 128, 32, draw.choice([4, 8]), False, 2),
        ("a causal chunk after a cached prefix (T < S), GQA", draw.int(16, 512), draw.int(600, 4000), 64,
         16, 4, True, 2),
        ("causal with T > S: the first queries see no key", draw.int(40, 90), draw.int(5, 30), 16, 4, 2,
         True, 4),
        ("cross-attention, T != S, float32", draw.int(3, 60), draw.int(61, 300), draw.choice([32, 80]), 8, 8,
         False, 4),
        ("a small odd shape", draw.int(2, 9), draw.int(2, 9), draw.choice([3, 7]), 3, 1, True, 2),
    ]:  # fmt: skip
        peak, bandwidth = draw.float(20e12, 1000e12), draw.float(0.1e12, 5e12)
        exact = _placement(T, S, D, H, H_kv, causal, b, 1.0, peak, bandwidth)
        best = max(exact["flops"] / peak, exact["bytes"] / bandwidth)
        seconds = best * draw.float(1.2, 6.0)
        args = (T, S, D, H, H_kv, causal, b, seconds, peak, bandwidth)
        expected = _placement(*args)

        def judge(got, expected, args=args):
            _judge_placement(got, expected, args)

        yield Case(
            f"{name}: T={T}, S={S}, D={D}, {H} query heads, {H_kv} KV heads, {b}-byte elements",
            args,
            expected=expected,
            compare=judge,
            inputs=["T", "S", "D", "num_heads", "num_kv_heads", "causal", "bytes_per_element", "seconds",
                    "peak_flops", "bandwidth"],
        )  # fmt: skip


def _judge_placement(got: object, expected: dict, args: tuple) -> None:
    if not isinstance(got, dict):
        raise Mismatch(f"expected a dict with the keys {', '.join(PLACEMENT_KEYS)}, got {type(got).__name__}")
    missing = [key for key in PLACEMENT_KEYS if key not in got]
    if missing:
        raise Mismatch(f"your dict lacks the key(s) {', '.join(missing)}")
    T, S, D, H, H_kv, causal, b, seconds, peak, bandwidth = args

    def wrong(**options) -> dict:
        return _placement(*args, **options)

    named = {
        "flops": {
            "4 D x T x S / 2 pairs: half the square, which holds for no causal T x S mask": "half_pairs",
            "the causal mask aligned to the start (query i sees keys j <= i)": "start_aligned",
            "2 D per pair (q . k and the weighted sum of v are 2 D each)": "two_d",
        },
        "bytes": {
            "k and v read once per query head (with GQA they are read once per KV head)": "kv_as_query_heads",
            "q read but the output o never written": "no_output",
        },
    }
    for key in ("flops", "bytes"):
        variants = {}
        for label, option in named[key].items():
            value = wrong(**{option: True})[key]
            if value != expected[key]:
                variants[label] = value
        compare_number(got[key], expected[key], key, rel=1e-9, variants=variants)
    compare_number(
        got["intensity"],
        expected["intensity"],
        "intensity",
        rel=1e-9,
        variants={"bytes / flops": 1 / expected["intensity"]},
    )
    I = expected["intensity"]
    compare_number(
        got["attainable"],
        expected["attainable"],
        "attainable",
        rel=1e-9,
        variants={
            k: v
            for k, v in {
                "max(peak, intensity x bandwidth): the higher roof": max(peak, I * bandwidth),
                "intensity x bandwidth without the compute roof": I * bandwidth,
                "the compute roof alone": peak,
            }.items()
            if v != expected["attainable"]
        },
    )
    compare_number(
        got["achieved"],
        expected["achieved"],
        "achieved",
        rel=1e-9,
        variants={"the bytes moved per second": expected["bytes"] / seconds},
    )
    compare_number(
        got["fraction"],
        expected["fraction"],
        "fraction",
        rel=1e-9,
        variants={
            k: v
            for k, v in {
                "achieved / peak_flops: the fraction of the compute roof, not of the roof at this "
                "intensity": expected["achieved"] / peak,
                "attainable / achieved (upside down)": 1 / expected["fraction"],
            }.items()
            if not math.isclose(v, expected["fraction"], rel_tol=1e-9)
        },
    )
    if got["bound"] != expected["bound"]:
        ridge = peak / bandwidth
        raise Mismatch(
            f"bound: got {got['bound']!r}, expected {expected['bound']!r}: the intensity {I:.4g} FLOP/byte "
            f"is {'left' if I < ridge else 'right'} of the ridge point peak / bandwidth = {ridge:.4g} (the "
            "intensity decides it, not how close the achieved FLOP/s comes to a roof)"
        )
