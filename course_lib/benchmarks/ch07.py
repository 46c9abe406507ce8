"""Chapter 07's benchmark: the forms of every gated recurrence of the chapter, with SDPA as reference.

``python -m course_lib.bench recurrent`` times causal SDPA and, for every recurrent mechanism of
chapter 07 in the catalogue (``catalogue.mechanisms(chapter=7, has="recurrent")``: RetNet, GLA,
Mamba-2, mLSTM, DeltaNet, Gated DeltaNet, TTT, RWKV, Mamba-1, HGRN, ...), each of its forms
(``Mechanism.forms``: the chunk form, the token-by-token recurrent form, and Mamba-1's and HGRN's
parallel scan), on one sequence, H = 4 heads, D = 64, each mechanism on its own seeded inputs
(``Mechanism.make_inputs``) with its declared options (chunks of 64), from T = 256 to 4096.
The recurrent forms are Python loops over tokens, a few tenths of a second per call at T = 4096 on
a quiet 2-core CPU; their time grows linearly, so every form but the chunk form (the token loop,
and the scan that materialises every state) is left out beyond ``RECURRENT_MAX_T`` = 4096 by
:func:`recurrent_sweep` and the suites (``measure.sweep`` itself measures every method at every
length). On a CPU a token step costs a few microseconds of overhead per op, so the chunk forms win
by a single-digit to low double-digit factor; on a GPU, where every op of the loop is a kernel
launch, the gap is far larger. ``python -m course_lib.bench recurrent_chunk`` times SDPA and the
chunk forms alone, 256 .. 16384. :func:`speedups` reads off recurrent time / chunk time per
mechanism and length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import catalogue
from ..catalogue import Geometry, Mechanism
from ..checks import check_int
from ..measure import Measurement, sweep

__all__ = [
    "SUITES",
    "GEOMETRY",
    "RECURRENT_MAX_T",
    "mechanisms",
    "max_length",
    "recurrent_suite",
    "recurrent_chunk_suite",
    "recurrent_sweep",
    "speedups",
]

GEOMETRY = Geometry(batch=1, heads=4, head_dim=64)
RECURRENT_MAX_T = 4096
LENGTHS = [256, 512, 1024, 2048, 4096]
CHUNK_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
REFERENCE = "sdpa"


def mechanisms() -> tuple[Mechanism, ...]:
    """The chapter's recurrent mechanisms, in the catalogue's order."""
    return catalogue.mechanisms(chapter=7, has="recurrent")


def max_length(form: str, recurrent_max_t: int = RECURRENT_MAX_T) -> int | None:
    """The longest T a form is timed at: every length for the chunk form, ``recurrent_max_t`` for
    the others (the token loop grows linearly and slowly; a scan keeps every state in memory)."""
    return None if form == "chunk" else recurrent_max_t


def _method(mechanism: Mechanism, form: str | None, device, dtype, max_t: int | None):
    def build(T: int):
        if max_t is not None and T > max_t:
            return None
        x = mechanism.make_inputs(T, GEOMETRY, dtype=dtype, device=device)
        options = {} if form is None else {"form": form}
        return lambda: mechanism.run(x, **options)

    return build


def _methods(device, dtype, forms, names=None, recurrent_max_t: int = RECURRENT_MAX_T):
    """``{"sdpa": ..., "gla chunk": ..., "gla recurrent": ...}``: SDPA and the ``forms`` (those a
    mechanism has) of the mechanisms ``names`` (default: all of the chapter)."""
    chosen = mechanisms() if names is None else tuple(catalogue.get(name) for name in names)
    methods = {REFERENCE: _method(catalogue.get(REFERENCE), None, device, dtype, None)}
    for mechanism in chosen:
        for form in mechanism.forms:
            if form in forms:
                limit = max_length(form, recurrent_max_t)
                methods[f"{mechanism.name} {form}"] = _method(mechanism, form, device, dtype, limit)
    return methods


def recurrent_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: SDPA vs every form of every gated recurrence of chapter 07; T = 256 .. 4096."""
    forms = {form for m in mechanisms() for form in m.forms}
    return _methods(device, dtype, forms), REFERENCE, list(LENGTHS)


def recurrent_chunk_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Causal forward: SDPA vs the chunk forms of every gated recurrence of chapter 07; T = 256 .. 16384."""
    return _methods(device, dtype, ("chunk",)), REFERENCE, list(CHUNK_LENGTHS)


def recurrent_sweep(
    lengths: Sequence[int] = LENGTHS,
    *,
    recurrent_max_t: int = RECURRENT_MAX_T,
    methods: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.2,
    measure_memory: bool = True,
    progress: bool = False,
) -> list[Measurement]:
    """SDPA and the chunk forms at every length, the other forms only up to ``recurrent_max_t``.

    ``methods``: catalogue names of chapter-07 mechanisms (default: all of them, :func:`mechanisms`).
    """
    recurrent_max_t = check_int(recurrent_max_t, "recurrent_max_t", min=0)
    known = [m.name for m in mechanisms()]
    unknown = [] if methods is None else [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"methods {unknown} unknown; known: {', '.join(known)}")
    other_forms = {form for m in mechanisms() for form in m.forms} - {"chunk"}
    options = {
        "device": device,
        "min_run_time": min_run_time,
        "measure_memory": measure_memory,
        "progress": progress,
    }
    # SDPA and the chunk forms at every length first, then the other forms: the table reads the
    # fast forms side by side.
    results = sweep(_methods(device, dtype, ("chunk",), methods), lengths, **options)
    slow = _methods(device, dtype, other_forms, methods, recurrent_max_t)
    del slow[REFERENCE]
    short = [T for T in lengths if T <= recurrent_max_t]
    if short and slow:
        results += sweep(slow, short, **options)
    return results


def speedups(results: Sequence[Measurement]) -> dict[tuple[str, int], float]:
    """``(mechanism, T) -> recurrent seconds / chunk seconds`` wherever both forms were measured."""
    times = {(r.method, r.T): r.seconds for r in results}
    out = {}
    for (name, T), seconds in times.items():
        if name.endswith(" chunk") and (name.replace(" chunk", " recurrent"), T) in times:
            out[(name.removesuffix(" chunk"), T)] = times[(name.replace(" chunk", " recurrent"), T)] / seconds
    return out


_CHUNKS = sorted({m.options["chunk_size"] for m in mechanisms() if "chunk_size" in m.options})
for _suite in (recurrent_suite, recurrent_chunk_suite):
    _suite.shape = {"B": GEOMETRY.batch, "H": GEOMETRY.heads, "D": GEOMETRY.head_dim}
    _suite.shape["chunk"] = _CHUNKS[0] if len(_CHUNKS) == 1 else _CHUNKS
SUITES = {"recurrent": recurrent_suite, "recurrent_chunk": recurrent_chunk_suite}
