"""Chapter 07's benchmark: chunk vs recurrent forms of GLA, the delta rule and SSD, with SDPA as reference.

``python -m course_lib.bench recurrent`` times causal SDPA and, for ``gla``, ``delta_rule`` and
``ssd``, the chunk form and the recurrent form (one sequence, H = 4 heads, D = 64, chunks of 64;
SSD with P = N = 64) from T = 256 to 4096. The recurrent forms are Python loops over tokens, 0.2 to
0.4 s per call at T = 4096 on a quiet 2-core CPU; their time grows linearly, so beyond
``RECURRENT_MAX_T`` = 4096 :func:`recurrent_sweep` leaves them out (``measure.sweep`` itself
measures every method at every length). On a CPU a token step costs a few microseconds of
overhead per op, so the chunk forms win by a single-digit to low double-digit factor; on a GPU,
where every op of the loop is a kernel launch, the gap is far larger.
``python -m course_lib.bench recurrent_chunk`` times SDPA and the chunk forms alone, 256 .. 16384.
:func:`speedups` reads off recurrent time / chunk time per method and length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..measure import Measurement, random_qkv, sweep

# The inputs live in a study (chapter 08 times the same ones); still importable from here.
from ..studies.inputs import HEAD_DIM, HEADS, METHODS, recurrent_inputs, run_method

__all__ = [
    "SUITES",
    "RECURRENT_MAX_T",
    "METHODS",
    "recurrent_inputs",
    "run_method",
    "recurrent_suite",
    "recurrent_chunk_suite",
    "recurrent_sweep",
    "speedups",
]

RECURRENT_MAX_T = 4096
LENGTHS = [256, 512, 1024, 2048, 4096]
CHUNK_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
CHUNK = 64


def _method(name: str, form: str, device, dtype):
    def build(T: int):
        x = recurrent_inputs(T, device, dtype)
        return lambda: run_method(name, x, form=form, chunk_size=CHUNK)

    return build


def _sdpa(device, dtype):
    def build(T: int):
        q, k, v = random_qkv(T, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return build


def _methods(device, dtype, forms):
    methods = {"sdpa": _sdpa(device, dtype)}
    for name in METHODS:
        for form in forms:
            methods[f"{name} {form}"] = _method(name, form, device, dtype)
    return methods


def recurrent_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: SDPA vs chunk and recurrent forms of GLA, the delta rule, SSD; T = 256 .. 4096."""
    lengths = [T for T in LENGTHS if T <= RECURRENT_MAX_T]
    return _methods(device, dtype, ("chunk", "recurrent")), "sdpa", lengths


def recurrent_chunk_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: SDPA vs the chunk forms of GLA, the delta rule and SSD; T = 256 .. 16384."""
    return _methods(device, dtype, ("chunk",)), "sdpa", list(CHUNK_LENGTHS)


def recurrent_sweep(
    lengths: Sequence[int] = LENGTHS,
    *,
    recurrent_max_t: int = RECURRENT_MAX_T,
    methods: Sequence[str] = METHODS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.2,
    measure_memory: bool = True,
    progress: bool = False,
) -> list[Measurement]:
    """SDPA and the chunk forms at every length, the recurrent forms only up to ``recurrent_max_t``."""
    recurrent_max_t = check_int(recurrent_max_t, "recurrent_max_t", min=0)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods {unknown} unknown; known: {', '.join(METHODS)}")
    every = _methods(device, dtype, ("chunk", "recurrent"))
    options = {
        "device": device,
        "min_run_time": min_run_time,
        "measure_memory": measure_memory,
        "progress": progress,
    }
    fast = {name: every[name] for name in ["sdpa", *(f"{m} chunk" for m in methods)]}
    results = sweep(fast, lengths, **options)
    short = [T for T in lengths if T <= recurrent_max_t]
    if short:
        results += sweep({f"{m} recurrent": every[f"{m} recurrent"] for m in methods}, short, **options)
    return results


def speedups(results: Sequence[Measurement]) -> dict[tuple[str, int], float]:
    """``(method, T) -> recurrent seconds / chunk seconds`` wherever both forms were measured."""
    times = {(r.method, r.T): r.seconds for r in results}
    out = {}
    for (name, T), seconds in times.items():
        if name.endswith(" chunk") and (name.replace(" chunk", " recurrent"), T) in times:
            out[(name.removesuffix(" chunk"), T)] = times[(name.replace(" chunk", " recurrent"), T)] / seconds
    return out


for _suite in (recurrent_suite, recurrent_chunk_suite):
    _suite.shape = {"B": 1, "H": HEADS, "D": HEAD_DIM, "chunk": CHUNK}
SUITES = {"recurrent": recurrent_suite, "recurrent_chunk": recurrent_chunk_suite}
