"""Chapter 03's benchmark: the course's FlashAttention against SDPA and dense attention, phase by phase.

Four phases, one sequence of 8 heads with D = 64, float32:

- ``forward``: full (non-causal) attention, T = S, up to T = 4096;
- ``causal``: causal forward, up to T = 8192 (where dense attention's T x T matrices take GiBs);
- ``train``: causal forward + backward (gradients of q, k and v), up to T = 4096;
- ``decode``: one query against a KV cache of T entries (1K-16K).

In each, ``flash`` is :func:`course_lib.tiling.flash_attention` with its fixed default tiles,
``sdpa`` PyTorch's fused ``scaled_dot_product_attention``, ``dense`` the course's
:func:`course_lib.standard.attention`, which builds the T x S scores. One more method, ``matmul``,
times a 2048 x 2048 x 2048 float32 matmul once, in the same run: the rate this machine's BLAS
reaches, against which every method's GFLOP/s is read.

GFLOP/s count the work of the algorithm on the visible (query, key) pairs, the same for all three
methods: 2 matmuls of ``2 D`` FLOPs per pair forward, and 5 backward (FlashAttention-2's count,
which includes recomputing the scores). The table prints, per phase and T, the time and GFLOP/s of
each method, flash's time over SDPA's and dense's, flash's share of the matmul rate and the peak
memory of flash and dense; the report below it checks the targets of issue 18.

``python -m course_lib.bench flash --threads 1`` runs it; ``flash_tuned`` first picks the fastest
tiles for this machine (an opt-in: the library's defaults are fixed so results and IO counts do
not depend on the machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..checks import check_choice
from ..measure import Measurement, format_bytes, random_qkv, time_function
from ..standard import attention
from ..tiling import BLOCK_K, BLOCK_Q, flash_attention

__all__ = [
    "SUITES",
    "PHASES",
    "PHASE_MAX_T",
    "METHODS",
    "flash_suite",
    "flash_tuned_suite",
    "flash_methods",
    "phase_flops",
    "flash_table",
    "flash_report",
    "plot_phases",
    "tune_blocks",
    "MATMUL_SIZE",
]

BATCH, HEADS, HEAD_DIM = 1, 8, 64
PHASES = ("forward", "causal", "train", "decode")
PHASE_MAX_T = {"forward": 4096, "causal": 8192, "train": 4096, "decode": 16384}
METHODS = ("flash", "sdpa", "dense")
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
MATMUL_SIZE = 2048
# Issue 18's targets: flash's time over SDPA's, and flash's peak memory over dense's.
TARGETS = {("forward", 4096): 1.5, ("causal", 4096): 1.5, ("train", 2048): 1.4, ("decode", 16384): 1.5}
MEMORY_TARGET = ("causal", 8192, 1 / 30)


def phase_flops(
    phase: str, T: int, *, batch: int = BATCH, heads: int = HEADS, head_dim: int = HEAD_DIM
) -> int:
    """FLOPs of one call in ``phase`` at length ``T``: ``2 D`` per matmul and visible pair.

    ``forward``: T^2 pairs, 2 matmuls; ``causal``: T (T + 1) / 2 pairs; ``train``: the causal pairs,
    2 matmuls forward and 5 backward; ``decode``: T pairs (one query), 2 matmuls.
    """
    check_choice(phase, "phase", PHASES)
    pairs = {"forward": T * T, "causal": T * (T + 1) // 2, "train": T * (T + 1) // 2, "decode": T}[phase]
    matmuls = 7 if phase == "train" else 2
    return 2 * head_dim * matmuls * pairs * batch * heads


def _inputs(phase: str, T: int, device, dtype) -> tuple[torch.Tensor, ...]:
    q, k, v = random_qkv(T, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, device=device, dtype=dtype)
    if phase == "decode":  # the last token's query against the cache of all T
        q = q[:, :, -1:].contiguous()
    return q, k, v


def _call(phase: str, method: str, q, k, v, blocks: tuple[int, int]) -> Callable[[], object]:
    causal = phase != "forward"
    if method == "flash":

        def run(q, k, v):
            return flash_attention(q, k, v, causal=causal, block_q=blocks[0], block_k=blocks[1])
    elif method == "sdpa":
        # One decoding query sees the whole cache: no mask (SDPA's is_causal would align it to key 0).
        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and phase != "decode")
    else:

        def run(q, k, v):
            return attention(q, k, v, causal=causal)

    if phase != "train":
        return lambda: run(q, k, v)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)
    return lambda: torch.autograd.grad(run(*leaves), leaves, grad_out)


def flash_methods(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    blocks: tuple[int, int] = (BLOCK_Q, BLOCK_K),
) -> dict[str, Callable[[int], Callable[[], object] | None]]:
    """``{"phase/method": builder}`` for every phase and method, and ``"matmul"``.

    ``builder(T)`` returns the callable to time at length T (or None where the phase stops, see
    :data:`PHASE_MAX_T`), carrying ``extra = {"phase", "flops"}``. ``matmul`` is measured once per
    suite: its builder returns the callable on its first call only.
    """
    methods: dict[str, Callable[[int], Callable[[], object] | None]] = {}
    for phase in PHASES:
        for method in METHODS:

            def build(T: int, phase: str = phase, method: str = method):
                if T > PHASE_MAX_T[phase]:
                    return None
                call = _call(phase, method, *_inputs(phase, T, device, dtype), blocks)
                call.extra = {"phase": phase, "method": method, "flops": phase_flops(phase, T)}
                return call

            methods[f"{phase}/{method}"] = build
    measured = []

    def matmul(T: int):
        if measured:
            return None
        measured.append(T)
        generator = torch.Generator().manual_seed(1)
        a, b = (
            torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(device, dtype) for _ in range(2)
        )
        call = lambda: a @ b  # noqa: E731
        call.extra = {"phase": "matmul", "method": "matmul", "flops": 2 * MATMUL_SIZE**3}
        return call

    methods["matmul"] = matmul
    return methods


def flash_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Flash vs SDPA vs dense: forward, causal, forward+backward and decode, with GFLOP/s vs matmul.

    One sequence, 8 heads, D = 64, float32; T = 512 .. 16384 (each phase up to its
    :data:`PHASE_MAX_T`). Reference: SDPA. See the module's docstring.
    """
    return flash_methods(device, dtype), "forward/sdpa", list(LENGTHS)


def tune_blocks(
    device: torch.device | str = "cpu",
    *,
    T: int = 2048,
    candidates: Sequence[tuple[int, int]] = ((128, 128), (128, 256), (256, 256), (256, 512), (512, 512)),
    min_run_time: float = 0.2,
) -> tuple[int, int]:
    """The ``(block_q, block_k)`` of ``candidates`` with the least causal forward time at ``T`` here."""
    q, k, v = _inputs("causal", T, device, torch.float32)
    times = {
        blocks: time_function(_call("causal", "flash", q, k, v, blocks), min_run_time=min_run_time)
        for blocks in candidates
    }
    return min(times, key=times.get)


def flash_tuned_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The flash suite with tiles tuned for this machine first (opt-in; the defaults are fixed).

    Times the causal forward at T = 2048 for a few tile sizes, keeps the fastest (stored in the
    suite's ``shape``) and runs :func:`flash_suite`'s phases with it.
    """
    blocks = tune_blocks(device)
    flash_tuned_suite.shape = {**flash_suite.shape, "block": f"{blocks[0]}x{blocks[1]} (tuned)"}
    return flash_methods(device, dtype, blocks=blocks), "forward/sdpa", list(LENGTHS)


# --- the table and the report -----------------------------------------------------------------------


def _by_phase(results: Sequence[Measurement]) -> tuple[dict, float | None]:
    """``{(phase, T): {method: Measurement}}`` and the matmul's GFLOP/s (None if not measured)."""
    table: dict[tuple[str, int], dict[str, Measurement]] = {}
    matmul = None
    for r in results:
        phase, method = r.extra.get("phase"), r.extra.get("method")
        if phase == "matmul":
            matmul = r.extra["flops"] / r.seconds / 1e9
        elif phase is not None:
            table.setdefault((phase, r.T), {})[method] = r
    return table, matmul


def _gflops(r: Measurement | None) -> float | None:
    return None if r is None else r.extra["flops"] / r.seconds / 1e9


def flash_table(results: Sequence[Measurement]) -> str:
    """One row per phase and T: ms and GFLOP/s of flash, SDPA and dense; flash / SDPA and flash /
    dense times; flash's GFLOP/s as a share of the matmul's; peak memory of flash and dense."""
    rows_by_key, matmul = _by_phase(results)
    header = ["phase", "T"]
    for method in METHODS:
        header += [f"{method} ms", "GFLOP/s"]
    header += ["flash/sdpa", "flash/dense", "flash/matmul", "flash peak", "dense peak"]
    rows = [header]
    for phase in PHASES:
        for T in sorted(T for p, T in rows_by_key if p == phase):
            found = rows_by_key[(phase, T)]
            row = [phase, str(T)]
            for method in METHODS:
                r = found.get(method)
                row += [f"{r.seconds * 1e3:.2f}" if r else "-", f"{_gflops(r):.1f}" if r else "-"]
            flash, sdpa, dense = (found.get(m) for m in METHODS)
            row.append(f"{flash.seconds / sdpa.seconds:.2f}x" if flash and sdpa else "-")
            row.append(f"{flash.seconds / dense.seconds:.2f}x" if flash and dense else "-")
            row.append(f"{_gflops(flash) / matmul:.0%}" if flash and matmul else "-")
            row += [format_bytes(r.peak_bytes) if r else "-" for r in (flash, dense)]
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if matmul is not None:
        lines.append(f"matmul {MATMUL_SIZE}^3 float32 in the same run: {matmul:.1f} GFLOP/s")
    return "\n".join(lines)


def flash_report(results: Sequence[Measurement]) -> str:
    """Issue 18's targets against this run: flash / SDPA time where measured, peak memory at 8192."""
    rows_by_key, _ = _by_phase(results)
    lines = ["targets (flash time / SDPA time, one process; timings on a shared machine are noisy):"]
    for (phase, T), target in TARGETS.items():
        found = rows_by_key.get((phase, T), {})
        if "flash" in found and "sdpa" in found:
            ratio = found["flash"].seconds / found["sdpa"].seconds
            verdict = "met" if ratio <= target else "NOT met"
            lines.append(f"  {phase:<8} T={T:<6} {ratio:.2f}x  (target <= {target}x: {verdict})")
        else:
            lines.append(f"  {phase:<8} T={T:<6} not measured")
    phase, T, fraction = MEMORY_TARGET
    found = rows_by_key.get((phase, T), {})
    flash, dense = found.get("flash"), found.get("dense")
    if flash and dense and flash.peak_bytes is not None and dense.peak_bytes:
        share = flash.peak_bytes / dense.peak_bytes
        verdict = "met" if share <= fraction else "NOT met"
        lines.append(
            f"  peak memory, {phase} T={T}: flash {format_bytes(flash.peak_bytes)} = {share:.4f} of dense's "
            f"{format_bytes(dense.peak_bytes)} (target <= 1/{round(1 / fraction)}: {verdict})"
        )
    else:
        lines.append(f"  peak memory, {phase} T={T}: not measured")
    return "\n".join(lines)


def plot_phases(results: Sequence[Measurement]):
    """Time vs T of flash, SDPA and dense on log-log axes, one panel per phase; returns the figure."""
    import matplotlib.pyplot as plt

    from ..viz import STYLE

    rows_by_key, _ = _by_phase(results)
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, len(PHASES), figsize=(3.6 * len(PHASES), 3.4))
        for ax, phase in zip(axes, PHASES, strict=True):
            for method in METHODS:
                points = sorted((T, found[method].seconds) for (p, T), found in rows_by_key.items()
                                if p == phase and method in found)  # fmt: skip
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(phase)
            ax.set_xlabel("T (decode: cache length)")
        axes[0].set_ylabel("seconds per call")
        axes[0].legend(frameon=False)
        figure.tight_layout()
    return figure


def _plot(results: Sequence[Measurement], path) -> None:
    import matplotlib.pyplot as plt

    figure = plot_phases(results)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


flash_suite.shape = {"B": BATCH, "H": HEADS, "D": HEAD_DIM, "block": f"{BLOCK_Q}x{BLOCK_K}"}
flash_suite.table, flash_suite.report, flash_suite.plot = flash_table, flash_report, _plot
flash_tuned_suite.shape = dict(flash_suite.shape)
flash_tuned_suite.table, flash_tuned_suite.report, flash_tuned_suite.plot = flash_table, flash_report, _plot
SUITES = {"flash": flash_suite, "flash_tuned": flash_tuned_suite}
