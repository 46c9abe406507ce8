"""Measuring time and peak memory: the one timing helper every chapter uses.

Time comes from :mod:`torch.utils.benchmark` (warm-up, CUDA synchronisation, median of blocked
runs). Peak memory is measured, not computed: on CUDA from the caching allocator's peak
counter, on Linux CPUs from the process's peak resident set (``VmHWM``), reset before each run.
:func:`sweep` measures a set of methods over sequence lengths, :func:`format_table` prints them,
:func:`save_json` stores them with the environment they ran in. The command that runs the
chapters' benchmark suites is :mod:`course_lib.bench`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark
from tqdm.auto import tqdm

from .checks import check_choice, check_float, check_int

__all__ = [
    "SuiteUnavailable",
    "Measurement",
    "time_function",
    "peak_memory_bytes",
    "sweep",
    "format_table",
    "format_bytes",
    "loglog_slope",
    "environment_summary",
    "save_json",
    "random_qkv",
]


@dataclass
class Measurement:
    """One benchmark point: a method at a sequence length."""

    method: str
    T: int
    seconds: float
    peak_bytes: int | None
    extra: dict = field(default_factory=dict)


# --- timing ---------------------------------------------------------------------------------


def time_function(fn: Callable[[], object], *, min_run_time: float = 0.2) -> float:
    """Median wall time of ``fn()`` in seconds, measured by ``torch.utils.benchmark``."""
    min_run_time = check_float(min_run_time, "min_run_time", min=0.0, min_open=True)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


# --- peak memory ----------------------------------------------------------------------------

# glibc's mallopt parameters: M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator alone
        return None


def _allocator_for_memory() -> None:
    """Make glibc hand freed blocks back to the OS, so resident memory tracks live tensors.

    glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, where a later
    allocation reuses them without raising the resident set: the peak would be hidden. Serving
    every block of 64 KiB or more with mmap, and trimming the heap now, makes the peak visible.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


def _allocator_for_timing() -> None:
    """Undo :func:`_allocator_for_memory` for timing: keep freed blocks (up to 32 MiB) for reuse.

    With the 64 KiB mmap threshold every medium-sized temporary costs an mmap, a munmap and page
    faults, which slows loops of small tensor ops (a token-by-token recurrence) by up to 6x and
    would time the allocator instead of the method. 32 MiB is the ceiling that glibc's own
    adaptive threshold reaches in a warmed-up process.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def _resident_bytes() -> tuple[int, int]:
    """(peak, current) resident set size of this process, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    current = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return peak, current


def _can_measure_cpu_memory() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak memory that ``fn()`` allocates above what was in use before the call, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the rise of the peak resident set size
    (Linux only; returns ``None`` elsewhere). Includes every temporary the call creates.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    if not _can_measure_cpu_memory():
        return None
    _allocator_for_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        _, before = _resident_bytes()
        result = fn()
        peak, _ = _resident_bytes()
        del result
    finally:
        _allocator_for_timing()
    return max(peak - before, 0)


# --- sweeps and reports ---------------------------------------------------------------------


def sweep(
    methods: dict[str, Callable[[int], Callable[[], object]]],
    lengths: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    min_run_time: float = 0.2,
    measure_memory: bool = True,
    progress: bool = True,
) -> list[Measurement]:
    """Time (and measure the peak memory of) every method at every length.

    ``methods[name](T)`` builds the inputs for length ``T`` and returns a zero-argument callable
    to measure, so input creation is neither timed nor counted as peak memory. A dict in the
    callable's ``extra`` attribute (e.g. an accuracy) is stored with the measurement. A builder
    may return ``None`` to leave that length out (e.g. a phase measured over a shorter range).
    """
    if not methods:
        raise ValueError("methods must name at least one method")
    for T in lengths:
        check_int(T, "lengths", min=1)
    results = []
    jobs = [(T, name) for T in lengths for name in methods]
    # The objects alive before the sweep (modules, the catalogue, ...) cannot be the garbage that
    # peak_memory_bytes collects before each call; moved out of the collector's reach, they no
    # longer cost every point a full collection (about 0.4 s with torch loaded).
    gc.freeze()
    try:
        for T, name in tqdm(jobs, desc="benchmark", disable=not progress, leave=False):
            call = methods[name](T)
            if call is None:
                continue
            peak = peak_memory_bytes(call, device) if measure_memory else None
            seconds = time_function(call, min_run_time=min_run_time)
            results.append(Measurement(name, T, seconds, peak, dict(getattr(call, "extra", None) or {})))
            del call
    finally:
        gc.unfreeze()
    return results


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Slope of the least-squares line through ``(log x, log y)``: 2 means quadratic growth."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x and y must have the same length >= 2, got {len(x)} and {len(y)}")
    if min(x) <= 0 or min(y) <= 0:
        raise ValueError("x and y must be positive for a log-log fit")
    log_x = torch.tensor([math.log(v) for v in x], dtype=torch.float64)
    log_y = torch.tensor([math.log(v) for v in y], dtype=torch.float64)
    centred_x = log_x - log_x.mean()
    return float((centred_x * (log_y - log_y.mean())).sum() / (centred_x**2).sum())


def format_bytes(n: float | None) -> str:
    """Human-readable bytes in powers of 1024: ``format_bytes(2**31) == '2.0 GiB'``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_table(results: Sequence[Measurement], reference: str | None = None) -> str:
    """A text table: one row per length, time and peak memory per method, and the time ratio
    of each method to ``reference`` (measured in the same process, so the ratio is what counts)."""
    methods = list(dict.fromkeys(r.method for r in results))
    lengths = sorted({r.T for r in results})
    if reference is not None:
        check_choice(reference, "reference", methods)
    by_key = {(r.method, r.T): r for r in results}
    header = ["T"]
    for m in methods:
        header += [f"{m} ms", f"{m} peak"]
        if reference is not None and m != reference:
            header.append(f"{m}/{reference}")
    rows = [header]
    for T in lengths:
        row = [str(T)]
        for m in methods:
            r = by_key.get((m, T))
            row += [f"{r.seconds * 1e3:.2f}" if r else "-", format_bytes(r.peak_bytes) if r else "-"]
            if reference is not None and m != reference:
                ref = by_key.get((reference, T))
                row.append(f"{r.seconds / ref.seconds:.2f}x" if r and ref else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m in methods:
        points = [(r.T, r.seconds) for r in results if r.method == m]
        if len(points) >= 2:
            slope = loglog_slope([p[0] for p in points], [p[1] for p in points])
            lines.append(f"log-log slope of time vs T for {m}: {slope:.2f}")
    return "\n".join(lines)


def environment_summary(device: torch.device | str = "cpu") -> dict:
    """What a result depends on: versions, device, threads."""
    device = torch.device(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def save_json(
    results: Sequence[Measurement],
    path: str | Path,
    *,
    suite: str,
    device: str = "cpu",
    shape: dict | None = None,
) -> Path:
    """Write the measurements and the environment they came from as JSON.

    ``shape`` (e.g. ``{"B": 1, "H": 8, "D": 64}``, the batch, heads and head dim of the run) is
    stored beside the environment when given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite, "environment": environment_summary(device)}
    if shape is not None:
        payload["shape"] = dict(shape)
    payload["results"] = [asdict(r) for r in results]
    path.write_text(json.dumps(payload, indent=2))
    return path


# --- inputs ---------------------------------------------------------------------------------


def random_qkv(
    T: int,
    *,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Seeded ``(batch, heads, T, head_dim)`` queries, keys and values for a benchmark point."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, heads, T, head_dim)
    return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(3)]


class SuiteUnavailable(RuntimeError):
    """A benchmark suite cannot run here (e.g. chapter 09's kernels without a GPU); the message says why."""
