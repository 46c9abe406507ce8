"""Chapter 06's benchmark: causal SDPA vs linear attention in its chunk and recurrent forms.

``python -m course_lib.bench linear`` runs SDPA (causal) and the chunk form from T = 512 to 16384
(one sequence, 8 heads, D = 64, elu+1 features, chunks of 64). The recurrent form is a Python loop
over tokens (about 0.15 s per call at T = 4096 on a quiet 2-core CPU, and it grows linearly), so it
has its own suite, ``linear_recurrent``, capped at ``RECURRENT_MAX_T`` = 4096 (``measure.sweep``
measures every method at every length). :func:`linear_sweep` runs both and merges them, so one table
shows all three
methods with ``-`` where the recurrent form was not run; :func:`crossover` reads off the first
measured T at which the chunk form beats SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..linear import linear_attention
from ..measure import Measurement, random_qkv, sweep

__all__ = ["SUITES", "RECURRENT_MAX_T", "linear_suite", "linear_recurrent_suite", "linear_sweep", "crossover"]

RECURRENT_MAX_T = 4096
BATCH, HEADS, HEAD_DIM, CHUNK = 1, 8, 64, 64
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]


def _methods(device, dtype, forms):
    def sdpa(T: int):
        q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def linear(form):
        def build(T: int):
            q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
            return lambda: linear_attention(q, k, v, form=form, chunk_size=CHUNK)

        return build

    return {"sdpa": sdpa, **{form: linear(form) for form in forms}}


def linear_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: SDPA vs linear attention's chunk form (elu+1 features); T = 512 .. 16384."""
    return _methods(device, dtype, ("chunk",)), "sdpa", list(LENGTHS)


def linear_recurrent_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: SDPA vs linear attention's chunk and recurrent forms; T = 512 .. 4096."""
    lengths = [T for T in LENGTHS if T <= RECURRENT_MAX_T]
    return _methods(device, dtype, ("chunk", "recurrent")), "sdpa", lengths


def linear_sweep(
    lengths: Sequence[int] = LENGTHS,
    *,
    recurrent_max_t: int = RECURRENT_MAX_T,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.2,
    progress: bool = False,
) -> list[Measurement]:
    """SDPA and the chunk form at every length, the recurrent form only up to ``recurrent_max_t``."""
    recurrent_max_t = check_int(recurrent_max_t, "recurrent_max_t", min=0)
    methods = _methods(device, dtype, ("chunk", "recurrent"))
    results = sweep(
        {name: methods[name] for name in ("sdpa", "chunk")},
        lengths,
        device=device,
        min_run_time=min_run_time,
        progress=progress,
    )
    short = [T for T in lengths if T <= recurrent_max_t]
    if short:
        results += sweep(
            {"recurrent": methods["recurrent"]},
            short,
            device=device,
            min_run_time=min_run_time,
            progress=progress,
        )
    return results


def crossover(results: Sequence[Measurement], method: str = "chunk", reference: str = "sdpa") -> int | None:
    """The smallest measured T from which on ``method`` is faster than ``reference`` (None if never)."""
    times = {(r.method, r.T): r.seconds for r in results}
    lengths = sorted(T for (m, T) in times if m == method and (reference, T) in times)
    faster = [times[(method, T)] < times[(reference, T)] for T in lengths]
    for i, T in enumerate(lengths):
        if all(faster[i:]):
            return T
    return None


for _suite in (linear_suite, linear_recurrent_suite):
    _suite.shape = {"B": BATCH, "H": HEADS, "D": HEAD_DIM, "chunk": CHUNK}
SUITES = {"linear": linear_suite, "linear_recurrent": linear_recurrent_suite}
