"""Chapter 08's benchmarks: every mechanism side by side in three phases, and quality on recall.

``python -m course_lib.bench all`` measures, in one process run, time and peak memory of every
mechanism of the catalogue that has a functional form (``catalogue.mechanisms(has="run")``; one
sequence, H = 4 heads, D = 64, float32, each on its own seeded inputs) in three phases:

- ``train``: the forward pass and its backward (gradients of every trainable input), T = 256 .. 2048;
- ``prefill``: one forward pass, T = 256 .. 2048;
- ``decode``: one decoding step at a context of T = 256 .. 16384 tokens. The mechanisms with a KV
  cache attend one new query to the cache of T entries (the sliding window only to its last
  w = 256 entries; MLA to its latent cache, SwitchHead to its layer's KV cache); the recurrent
  ones do one step of their ``form="recurrent"`` from the state that their chunk form left after
  the first T - 1 tokens: O(1) in T.

The phases, the lengths and the inputs are the study :mod:`course_lib.studies.phases`. Each
phase's table gives, per mechanism and T, the time per call (with the ratio to SDPA, the
reference of each phase), the peak memory and the KV cache or state one sequence keeps per layer
after T tokens (``Mechanism.state_bytes``), each with its fitted log-log slope against T. MLA and
SwitchHead are measured as whole layers (projections, routers and experts included; see
:mod:`course_lib.catalogue.layers`), and the table says so. A phase that does not apply to a
mechanism (no decoding step for a mechanism that is not causal or declares none) is left out of
the sweep and listed under the phase's table with the reason, as are the entries without a
functional form (ring attention, the hybrid stack); the mechanisms whose cost model materialises
the T x T scores (naive attention, MQA, GQA, top-k, MLA, differential attention, SwitchHead)
stop train and prefill at T = 1024. Beside each phase's table, the entry's cost model
(``Mechanism.cost``; "no model" where an entry declares none) gives the FLOPs and the bytes
moved, and :func:`all_report` compares the model's log-log slopes with the measured ones.
``all_train``, ``all_prefill`` and ``all_decode`` run one phase alone. The stored
``results/all_small.json`` (all three phases, every mechanism with a functional form) comes from
the command below, run on one thread because the 2-core machine was shared with other jobs (its
numbers are noisy: read ratios and slopes)::

    python -m course_lib.bench all --threads 1 --min-run-time 0.1 --json results/all_small.json

``python -m course_lib.bench recall`` trains a tiny model per mixer (:mod:`course_lib.recall`)
on MQAR at each sequence length (the study :mod:`course_lib.studies.recall_grid`: ``num_pairs =
T / 16``, as in Zoology's grid) for 600 steps of batch 16 at learning rate 3e-3, then times one
evaluation forward pass of a batch of 64; the held-out answer accuracy, the decoding state size
and the training settings go into the JSON (``extra``) and into a table printed after the timings.
It is a quick look, not a finding: one fixed learning rate and 600 steps under-train most mixers.
Chapter 08 reads the recall study instead (:mod:`course_lib.studies.recall_study`: a learning-rate
sweep, runs to convergence or a reported step cap, two seeds), stored in ``results/recall_study.json``
by ``python -m course_lib.studies.recall_study --jobs 2``; the 600-step grid is no longer stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ..measure import Measurement, format_bytes, loglog_slope
from ..recall import RECALL_MIXERS

# The phases and the recall grid are studies; their names stay importable from here for one release.
from ..studies.phases import (
    ALL_LENGTHS,
    DECODE_LENGTHS,
    FULL_SEQUENCE_MAX_T,
    GEOMETRY,
    HEAD_DIM,
    HEADS,
    PHASES,
    by_phase,
    complexity,
    decode_step,
    mechanism_of,
    mechanisms,
    not_applicable,
    not_run,
    phase_comparison,
    phase_methods,
    phase_of,
    relative_bars,
    relative_to,
    state_bytes,
    train_step,
    whole_layers,
)
from ..studies.recall_grid import (
    EVALUATION_BATCH,
    RECALL_BATCH,
    RECALL_LENGTHS,
    RECALL_LR,
    RECALL_STEPS,
    grid_point,
    recall_task,
)

__all__ = [
    "SUITES",
    "all_suite",
    "all_train_suite",
    "all_prefill_suite",
    "all_decode_suite",
    "all_table",
    "phase_table",
    "all_report",
    "all_plot",
    "recall_suite",
    "recall_report",
    # moved to course_lib.studies.phases and course_lib.studies.recall_grid, kept for one release
    "PHASES",
    "ALL_LENGTHS",
    "DECODE_LENGTHS",
    "FULL_SEQUENCE_MAX_T",
    "HEADS",
    "HEAD_DIM",
    "phase_of",
    "mechanism_of",
    "complexity",
    "train_step",
    "decode_step",
    "phase_methods",
    "relative_to",
    "relative_bars",
    "RECALL_STEPS",
    "RECALL_LENGTHS",
    "RECALL_LR",
    "RECALL_BATCH",
    "recall_task",
]


# --- suites -----------------------------------------------------------------------------------


def all_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Train, prefill and decode of every mechanism in one run: time, peak memory, FLOP/byte model.

    Train and prefill up to T = 2048 (1024 where the T x T scores are materialised), decode up to 16384.
    """
    methods = {}
    for phase in PHASES:
        methods.update(phase_methods(phase, device, dtype))
    return methods, "prefill:sdpa", sorted(set(ALL_LENGTHS) | set(DECODE_LENGTHS))


def all_train_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Train phase: forward + backward of every mechanism; T = 256 .. 2048."""
    return phase_methods("train", device, dtype), "train:sdpa", list(ALL_LENGTHS)


def all_prefill_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Prefill phase: one forward pass of every mechanism; T = 256 .. 2048."""
    return phase_methods("prefill", device, dtype), "prefill:sdpa", list(ALL_LENGTHS)


def all_decode_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Decode phase: one step (KV cache or recurrent state) of every mechanism at context T = 256 .. 16384."""
    return phase_methods("decode", device, dtype), "decode:sdpa", list(DECODE_LENGTHS)


_PHASE_TITLES = {
    "train": "train: forward + backward",
    "prefill": "prefill: forward",
    "decode": "decode: one step at context T",
}


def _notes(phase: str, measured: set[str]) -> list[str]:
    """The mechanisms the phase does not apply to, with the reason (the catalogue's entries without
    a functional form included), the ones measured without a causal mask, and the ones measured
    as whole layers (only in this process's catalogue: stored results may hold fewer)."""
    lines = [
        f"n/a  {m.name}: {reason}" for m in mechanisms() if (reason := not_applicable(m, phase)) is not None
    ]
    lines += [f"n/a  {name}: not run: {reason}" for name, reason in not_run().items()]
    whole = [m.name for m in mechanisms() if not m.causal and m.name in measured]
    if whole:
        lines.append(f"not causal (each query sees the whole sequence): {', '.join(whole)}")
    layers = [name for name in whole_layers() if name in measured]
    if layers:
        lines.append(
            "whole layers (input tokens of width H D; projections, routers and experts included): "
            + ", ".join(layers)
        )
    return lines


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def phase_table(rows: Sequence[Measurement], reference: str | None = "sdpa") -> str:
    """One phase's measurements (named by mechanism), one row per mechanism and three blocks: time
    per call in ms at each T with the ratio to ``reference`` at the same T; peak memory; the KV
    cache or state one sequence keeps per layer after T tokens (a measurement's ``state_bytes``,
    else the catalogue's; "none" where the entry declares no decoding state). Each block ends
    with the log-log slope of its numbers against T ("-": not measured at that T)."""
    names = list(dict.fromkeys(r.method for r in rows))
    lengths = sorted({r.T for r in rows})
    by_key = {(r.method, r.T): r for r in rows}
    reference = reference if reference in names else None
    ratio = f" (x {reference})" if reference else ""
    times = [["mechanism", *(f"T={T} ms{ratio}" for T in lengths), "slope"]]
    peaks = [["mechanism", *(f"T={T} peak" for T in lengths), "slope"]]
    states = [["mechanism", *(f"T={T} state" for T in lengths), "slope"]]
    for name in names:
        cells, memory, kept = [name], [name], [name]
        for T in lengths:
            r, base = by_key.get((name, T)), by_key.get((reference, T))
            cell = "-" if r is None else f"{r.seconds * 1e3:.2f}"
            if r is not None and base is not None and name != reference:
                cell += f" ({r.seconds / base.seconds:.2f}x)"
            cells.append(cell)
            memory.append("-" if r is None else format_bytes(r.peak_bytes))
            state = None if r is None else _state(name, r)
            kept.append("-" if r is None else ("none" if state is None else format_bytes(state)))
        points = sorted((r for r in rows if r.method == name), key=lambda r: r.T)
        for block, row, values in (
            (times, cells, [(r.T, r.seconds) for r in points]),
            (peaks, memory, [(r.T, r.peak_bytes) for r in points]),
            (states, kept, [(r.T, _state(name, r)) for r in points]),
        ):
            slope = _slope(values)
            block.append([*row, "-" if slope is None else f"{slope:.2f}"])
    return "\n".join(
        [
            "time per call",
            *_columns(times),
            "",
            "peak memory",
            *_columns(peaks),
            "",
            "KV cache / state per sequence and layer after T tokens",
            *_columns(states),
        ]
    )


def _state(name: str, r: Measurement) -> int | None:
    """The state bytes of one measurement: stored with it, else the catalogue entry's (if any)."""
    if "state_bytes" in r.extra:
        return r.extra["state_bytes"]
    try:
        return state_bytes(name, r.T)
    except ValueError:  # a name the catalogue does not know or cannot run (an older or hand-made result)
        return None


def all_table(results: Sequence[Measurement]) -> str:
    """One table per phase (:func:`phase_table`: time per call with the ratio to SDPA, slopes, peak
    memory), and under it the mechanisms the phase does not apply to ("n/a", with the reason)."""
    blocks = []
    for phase, rows in by_phase(results).items():
        notes = _notes(phase, {r.method for r in rows})
        blocks.append("\n".join([f"== {_PHASE_TITLES[phase]} ==", phase_table(rows), *notes]))
    return "\n\n".join(blocks)


def _slope(points: list[tuple[int, float | None]]) -> float | None:
    """The log-log slope through the points with a positive value (None with fewer than two)."""
    points = [(T, y) for T, y in points if y]
    return loglog_slope(*zip(*points)) if len(points) >= 2 else None


def all_report(results: Sequence[Measurement]) -> str:
    """Per phase: the cost model at the largest T, and log-log slopes, model vs measured.

    The model is the one stored with each measurement (its ``extra``), or else the entry's
    ``Mechanism.cost``; "no model" where neither exists. ``GFLOP/s`` is the model's FLOPs divided
    by the measured time: how close a mechanism comes to the machine's arithmetic rate (a low
    value means overheads or memory traffic dominate).
    """
    lines = []
    width = max([10] + [len(mechanism_of(r)) for r in results])
    header = (
        f"{'mechanism':>{width}} {'T':>6} {'model FLOPs':>12} {'model bytes':>11} {'GFLOP/s':>8}"
        f" {'slope FLOPs':>11} {'slope bytes':>11} {'slope time':>10} {'slope peak':>10}"
    )
    for phase, rows in by_phase(results).items():
        lines += ["", f"== cost model vs measurement, {_PHASE_TITLES[phase]} ==", header]
        for name in dict.fromkeys(r.method for r in rows):
            points = sorted((r for r in rows if r.method == name), key=lambda r: r.T)
            model = [_model(name, phase, r) for r in points]
            last = points[-1]
            measured = [
                _slope([(r.T, r.seconds) for r in points]),
                _slope([(r.T, r.peak_bytes) for r in points]),
            ]
            measured_cells = ["-" if s is None else f"{s:.2f}" for s in measured]
            if any(m is None for m in model):
                lines.append(
                    f"{name:>{width}} {last.T:>6} {'no model':>12} {'':>11} {'':>8} {'':>11} {'':>11}"
                    f" {measured_cells[0]:>10} {measured_cells[1]:>10}"
                )
                continue
            slopes = [
                _slope([(r.T, m["flops"]) for r, m in zip(points, model)]),
                _slope([(r.T, m["bytes"]) for r, m in zip(points, model)]),
            ]
            cells = ["-" if s is None else f"{s:.2f}" for s in slopes] + measured_cells
            lines.append(
                f"{name:>{width}} {last.T:>6} {model[-1]['flops']:>12.3g}"
                f" {format_bytes(model[-1]['bytes']):>11} {model[-1]['flops'] / last.seconds / 1e9:>8.2f}"
                f" {cells[0]:>11} {cells[1]:>11} {cells[2]:>10} {cells[3]:>10}"
            )
    return "\n".join(lines[1:])


def _model(name: str, phase: str, r: Measurement) -> dict[str, float] | None:
    """The cost model of one measurement: stored with it, else the catalogue entry's (if any)."""
    if "flops" in r.extra and "bytes" in r.extra:
        return {"flops": r.extra["flops"], "bytes": r.extra["bytes"]}
    try:
        return complexity(name, phase, r.T)
    except ValueError:  # a name the catalogue does not know (an older or a hand-made result)
        return None


def all_plot(results: Sequence[Measurement], path: str | Path) -> Path:
    """Save the per-phase figure (time and peak memory vs T, one column per phase) to ``path``."""
    figure = phase_comparison(results)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


for _suite in (all_suite, all_train_suite, all_prefill_suite, all_decode_suite):
    _suite.table, _suite.report, _suite.plot = all_table, all_report, all_plot
    _suite.shape = {"B": GEOMETRY.batch, "H": GEOMETRY.heads, "D": GEOMETRY.head_dim}


# --- recall -----------------------------------------------------------------------------------


def recall_suite(
    device: torch.device | str = "cpu",
    *,
    steps: int = RECALL_STEPS,
    lr: float = RECALL_LR,
    batch_size: int = RECALL_BATCH,
    progress: bool = True,
):
    """MQAR recall: accuracy of every mixer trained at each T, and the time of one evaluation pass.

    Each mixer is trained on :func:`recall_task` at each length T = 64 .. 256, then one forward
    pass over a batch of 64 held-out sequences is timed.

    Training runs on the CPU whatever ``device`` says (the models are tiny).
    """

    def method(mixer):
        def build(T: int):
            model, inputs, record = grid_point(
                mixer, T, steps=steps, lr=lr, batch_size=batch_size, progress=progress
            )

            @torch.no_grad()
            def call():
                return model(inputs)

            call.extra = record
            return call

        return build

    return {name: method(name) for name in RECALL_MIXERS}, "attention", list(RECALL_LENGTHS)


def recall_report(results: list[Measurement]) -> str:
    """Accuracy and state size per mixer and length, from the measurements' ``extra``."""
    lines = [f"{'mixer':>16} {'T':>5} {'pairs':>5} {'accuracy':>8} {'state':>10}"]
    for r in results:
        if "accuracy" in r.extra:
            e = r.extra
            lines.append(
                f"{r.method:>16} {r.T:>5} {e['num_pairs']:>5} {e['accuracy']:>8.3f} "
                f"{format_bytes(e['state_bytes']):>10}"
            )
    return "\n".join(lines)


recall_suite.report = recall_report
# The timed call: the recall model (d_model 64, 4 heads of 16, 2 layers) on 64 sequences.
recall_suite.shape = {"B": EVALUATION_BATCH, "H": 4, "D": 16, "d_model": 64}

SUITES = {
    "all": all_suite,
    "all_train": all_train_suite,
    "all_prefill": all_prefill_suite,
    "all_decode": all_decode_suite,
    "recall": recall_suite,
}
