"""Chapter 08's comparison: every mechanism side by side in three phases.

For each phase, :func:`phase_methods` gives one builder per mechanism that
:func:`course_lib.measure.sweep` measures (``python -m course_lib.bench all`` runs them), on one
sequence, H = 4 heads, D = 64, float32:

- ``train``: one causal forward pass and its backward (gradients of every input), T = 256 .. 2048;
- ``prefill``: one causal forward pass, T = 256 .. 2048;
- ``decode``: one decoding step at a context of T = 256 .. 16384 tokens. The softmax mechanisms
  attend one new query to a KV cache of T entries (naive, SDPA, the course's flash_attention;
  sliding-window attention reads only the last w = 256 entries); the recurrent mechanisms
  (linear attention, GLA, the delta rule, SSD) do one step of their ``form="recurrent"`` from the
  state that their chunk form left after the first T - 1 tokens: O(1) in T.

The mechanisms: naive attention (:func:`course_lib.standard.attention`), SDPA, flash_attention
(blocks of 128), sliding-window attention (w = 256), and the chunk forms (chunks of 64) of linear
attention, GLA, the delta rule and SSD (P = N = 64). Train and prefill are left out above
:data:`FULL_SEQUENCE_MAX_T`, decode is measured at every length. :func:`complexity` models the
FLOPs and the bytes moved of each call; :func:`relative_to` and :func:`relative_bars` give the
sources' "relative to standard attention" bars, and :func:`phase_comparison` draws time and peak
memory per phase. The tables, the report and the stored ``results/all_small.json`` are those of
the benchmark suites in :mod:`course_lib.benchmarks.ch08`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ..checks import check_choice, check_int
from ..linear import linear_attention
from ..measure import Measurement, loglog_slope
from ..sparse import sliding_window_attention
from ..standard import attention
from ..tiling import flash_attention
from ..viz import STYLE
from .inputs import recurrent_inputs, run_method

__all__ = [
    "PHASES",
    "ALL_METHODS",
    "TRAIN_INPUTS",
    "SOFTMAX_METHODS",
    "RECURRENT_METHODS",
    "ALL_LENGTHS",
    "DECODE_LENGTHS",
    "FULL_SEQUENCE_MAX_T",
    "phase_of",
    "mechanism_of",
    "by_phase",
    "complexity",
    "train_step",
    "decode_step",
    "phase_methods",
    "relative_to",
    "relative_bars",
    "phase_comparison",
]

HEADS, HEAD_DIM, WINDOW, CHUNK, FLASH_BLOCK = 4, 64, 256, 64, 128
PHASES = ("train", "prefill", "decode")
ALL_LENGTHS = [256, 512, 1024, 2048]
DECODE_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
FULL_SEQUENCE_MAX_T = 2048  # train and prefill stop here: naive attention's T x T weights grow as T^2
SOFTMAX_METHODS = ("naive", "sdpa", "flash", "window")
RECURRENT_METHODS = ("linear", "gla", "delta_rule", "ssd")


ALL_METHODS = {
    "naive": lambda x: attention(x["q"], x["k"], x["v"], causal=True),
    "sdpa": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True),
    "flash": lambda x: flash_attention(x["q"], x["k"], x["v"], causal=True, block_q=128, block_k=128),
    "window": lambda x: sliding_window_attention(x["q"], x["k"], x["v"], WINDOW, causal=True),
    "linear": lambda x: linear_attention(x["q"], x["k"], x["v"], causal=True, form="chunk", chunk_size=CHUNK),
    # chapter 07's methods, each on its own inputs of recurrent_inputs (see run_method)
    "gla": lambda x: run_method("gla", x, form="chunk", chunk_size=CHUNK),
    "delta_rule": lambda x: run_method("delta_rule", x, form="chunk", chunk_size=CHUNK),
    "ssd": lambda x: run_method("ssd", x, form="chunk", chunk_size=CHUNK),
}

# The inputs each mechanism reads: the train phase differentiates with respect to all of them.
TRAIN_INPUTS = {
    **{name: ("q", "k", "v") for name in ("naive", "sdpa", "flash", "window", "linear")},
    "gla": ("q", "k", "v", "g"),
    "delta_rule": ("q", "unit_k", "v", "beta"),
    "ssd": ("q", "k", "v", "dt", "A"),
}


def phase_of(result: Measurement) -> str:
    """The phase of a measurement of the ``all`` suites (its method is ``"phase:mechanism"``)."""
    return result.method.split(":", 1)[0] if ":" in result.method else "prefill"


def mechanism_of(result: Measurement) -> str:
    """The mechanism of a measurement of the ``all`` suites, without the phase."""
    return result.method.split(":", 1)[-1]


# --- the three phases -------------------------------------------------------------------------


def train_step(name: str, x: dict[str, torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A zero-argument callable: the causal forward of ``name`` on ``x`` and its backward.

    ``x`` comes from :func:`course_lib.studies.inputs.recurrent_inputs`. The callable returns
    the gradients of a seeded random loss ``sum(o * grad_output)`` with respect to every input in
    :data:`TRAIN_INPUTS` (``torch.autograd.grad``: nothing accumulates between calls).
    """
    check_choice(name, "name", tuple(ALL_METHODS))
    leaves = {key: x[key].detach().clone().requires_grad_(True) for key in TRAIN_INPUTS[name]}
    inputs = {**x, **leaves}
    with torch.no_grad():
        shape = ALL_METHODS[name](x).shape
    generator = torch.Generator().manual_seed(2)
    grad_output = torch.randn(shape, generator=generator).to(x["q"])

    def call() -> tuple[torch.Tensor, ...]:
        output = ALL_METHODS[name](inputs)
        return torch.autograd.grad(output, list(leaves.values()), grad_output)

    return call


def _last(x: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """Tokens ``start:end`` of every per-token input (A, per head, is kept whole)."""
    return {key: value if value.dim() == 1 else value[:, :, start:end] for key, value in x.items()}


def decode_step(name: str, x: dict[str, torch.Tensor], T: int | None = None) -> Callable[[], object]:
    """A zero-argument callable: one decoding step of ``name`` for token ``T`` (1-based) of ``x``.

    Softmax mechanisms attend the token's query ``(1, H, 1, D)`` to a KV cache of the ``T`` keys
    and values ``(1, H, T, D)`` (the new token's included; ``window`` only to the last
    :data:`WINDOW` of them) and return the output ``(1, H, 1, D)``. Recurrent mechanisms run
    their ``form="recurrent"`` on the one token from the state that their chunk form left after
    the first ``T - 1`` tokens (built here, not in the callable) and return ``(output, new state)``.
    Either way the output equals row ``T - 1`` of the causal forward pass over the first T tokens.
    """
    check_choice(name, "name", tuple(ALL_METHODS))
    length = x["q"].shape[2]
    T = length if T is None else check_int(T, "T", min=1, max=length)
    new = _last(x, T - 1, T)
    if name in SOFTMAX_METHODS:
        first = max(T - WINDOW, 0) if name == "window" else 0
        k_cache, v_cache = x["k"][:, :, first:T], x["v"][:, :, first:T]
        q = new["q"]
        if name == "naive":
            return lambda: attention(q, k_cache, v_cache, causal=True)
        if name == "sdpa":  # one query sees every cached key: no mask (is_causal would align it to key 0)
            return lambda: F.scaled_dot_product_attention(q, k_cache, v_cache)
        if name == "flash":
            return lambda: flash_attention(
                q, k_cache, v_cache, causal=True, block_q=FLASH_BLOCK, block_k=FLASH_BLOCK
            )
        return lambda: sliding_window_attention(q, k_cache, v_cache, WINDOW, causal=True)
    context = _last(x, 0, T - 1)
    if name == "linear":
        state = None
        if T > 1:
            _, state = linear_attention(
                context["q"],
                context["k"],
                context["v"],
                form="chunk",
                chunk_size=CHUNK,
                output_final_state=True,
            )
        return lambda: linear_attention(
            new["q"], new["k"], new["v"], form="recurrent", initial_state=state, output_final_state=True
        )

    def run(y, form, state):
        return run_method(name, y, form=form, chunk_size=CHUNK, initial_state=state, output_final_state=True)

    state = run(context, "chunk", None)[1] if T > 1 else None
    return lambda: run(new, "recurrent", state)


# --- the complexity model ---------------------------------------------------------------------


def complexity(
    name: str, phase: str, T: int, *, heads: int = HEADS, head_dim: int = HEAD_DIM
) -> dict[str, float]:
    """A model of the floating-point operations and the float32 bytes moved by one call.

    ``flops`` counts 2 per multiply-add of the matrix products (elementwise work left out);
    ``bytes`` counts what must travel between memory and the compute units: inputs, outputs and
    every intermediate a mechanism materialises (our CPU caches hold none of them at large T).
    With H heads of D dimensions, window w, chunks C, flash blocks Bq:

    - prefill, exact: ``naive`` computes all T^2 scores, ``4 H T^2 D`` FLOPs, and writes and
      reads the scores and the weights, ``16 H T^2`` bytes beyond the ``16 H T D`` of q, k, v, o;
      ``sdpa`` and ``flash`` skip the tiles above the diagonal, ``2 H T^2 D``, and re-read K and V
      once per block of queries, ``4 H T D (T / Bq)`` bytes (FlashAttention's IO, Bq = 128 assumed
      for SDPA too). ``window``: blocks of w queries against 2w - 1 keys, ``4 H T (2w - 1) D``
      FLOPs, and the score tiles, ``8 H T (2w - 1)`` bytes, beyond q, k, v, o and their slices
      (``min(2w - 1, T)`` keys when T is short).
    - prefill, chunk forms: ``4 H T C D`` (masked attention inside chunks) plus ``4 H T D^2``
      (reading and updating the state); the delta rule adds its WY transform, ``2 H T C D + 2 H T D^2``.
      Bytes: q, k, v, o, the chunk scores ``8 H T C`` and one state per chunk ``8 H D^2 T / C``.
    - train: forward + backward, the backward taken as twice the forward (each product of the
      forward needs two in the backward): 3x the prefill FLOPs and bytes.
    - decode, one token at context T: softmax reads the KV cache, ``4 H T D`` FLOPs and
      ``8 H T D`` bytes (naive also writes and reads its ``T`` scores and weights, ``16 H T``);
      ``window`` the same with ``min(w, T)``; the recurrent forms read and write a ``D x D``
      state per head: ``8 H D^2`` bytes, and ``4 H D^2`` FLOPs (``6 H D^2`` for the delta rule).
    """
    check_choice(name, "name", tuple(ALL_METHODS))
    check_choice(phase, "phase", PHASES)
    T = check_int(T, "T", min=1)
    H, D = check_int(heads, "heads", min=1), check_int(head_dim, "head_dim", min=1)
    w, C, Bq, f32 = WINDOW, CHUNK, FLASH_BLOCK, 4
    if phase == "decode":
        if name in SOFTMAX_METHODS:
            context = min(w, T) if name == "window" else T
            flops = 4 * H * context * D
            moved = f32 * (2 * H * context * D + 2 * H * D) + (
                f32 * 4 * H * context if name == "naive" else 0
            )
        else:
            flops = (6 if name == "delta_rule" else 4) * H * D * D
            moved = f32 * (2 * H * D * D + 4 * H * D)
        return {"flops": float(flops), "bytes": float(moved)}
    io = f32 * 4 * H * T * D  # q, k, v read, o written
    if name == "naive":
        flops, moved = 4 * H * T * T * D, io + f32 * 4 * H * T * T
    elif name in ("sdpa", "flash"):
        flops, moved = 2 * H * T * T * D, io + f32 * H * T * D * T / Bq
    elif name == "window":
        keys = min(2 * w - 1, T)  # keys per block of queries: the block and the w - 1 before it
        flops, moved = 4 * H * T * keys * D, 2 * io + f32 * 2 * H * T * keys
    else:
        flops = 4 * H * T * C * D + 4 * H * T * D * D
        if name == "delta_rule":
            flops += 2 * H * T * C * D + 2 * H * T * D * D
        moved = io + f32 * (2 * H * T * C + 2 * H * D * D * T / C)
    factor = 3 if phase == "train" else 1
    return {"flops": float(factor * flops), "bytes": float(factor * moved)}


# --- what the sweep measures ---------------------------------------------------------------


def phase_methods(
    phase: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    max_t: int | None = None,
) -> dict[str, Callable[[int], Callable[[], object] | None]]:
    """Builders ``{"phase:mechanism": build}`` for ``measure.sweep``; ``build(T)`` returns None for
    ``T > max_t`` (that length is left out) and otherwise a callable whose ``extra`` holds the
    phase, the mechanism and :func:`complexity`."""
    check_choice(phase, "phase", PHASES)

    def method(name: str):
        def build(T: int):
            if max_t is not None and T > max_t:
                return None
            x = recurrent_inputs(T, device, dtype)
            if phase == "train":
                call = train_step(name, x)
            elif phase == "decode":
                call = decode_step(name, x)
            else:

                def call():
                    return ALL_METHODS[name](x)

            call.extra = {"phase": phase, "mechanism": name, **complexity(name, phase, T)}
            return call

        return build

    return {f"{phase}:{name}": method(name) for name in ALL_METHODS}


# --- reading the measurements -------------------------------------------------------------


def by_phase(results: Sequence[Measurement]) -> dict[str, list[Measurement]]:
    """Measurements per phase (in PHASES order), each renamed to its mechanism alone."""
    grouped: dict[str, list[Measurement]] = {}
    for r in results:
        grouped.setdefault(phase_of(r), []).append(
            Measurement(mechanism_of(r), r.T, r.seconds, r.peak_bytes, r.extra)
        )
    return {phase: grouped[phase] for phase in PHASES if phase in grouped}


def relative_to(
    results: Sequence[Measurement], phase: str, T: int, *, reference: str = "naive", metric: str = "speed"
) -> dict[str, float]:
    """The sources' "relative to standard attention" bars, from measurements: one number per mechanism.

    ``metric="speed"``: reference time / mechanism time (2.0 = twice as fast as ``reference``);
    ``metric="memory"``: mechanism peak / reference peak (0.1 = a tenth of the memory). Only the
    ``phase`` measurements at length ``T`` count; a mechanism without one is left out.
    """
    check_choice(phase, "phase", PHASES)
    check_choice(metric, "metric", ("speed", "memory"))
    T = check_int(T, "T", min=1)
    rows = {r.method: r for r in by_phase(results).get(phase, []) if r.T == T}
    if reference not in rows:
        raise ValueError(f"reference {reference!r} has no {phase} measurement at T={T}")
    base = rows[reference]
    if metric == "speed":
        return {name: base.seconds / r.seconds for name, r in rows.items()}
    if not base.peak_bytes:
        raise ValueError(f"reference {reference!r} has no peak memory at T={T}")
    return {name: (r.peak_bytes or 0) / base.peak_bytes for name, r in rows.items()}


def relative_bars(values: dict[str, float], *, unit: str = "x", width: int = 28) -> str:
    """Text bars in the sources' style, scaled so the largest value fills ``width`` characters."""
    if not values:
        raise ValueError("values must hold at least one mechanism")
    largest = max(values.values())
    label = max(len(name) for name in values) + 1
    lines = []
    for name, value in values.items():
        bar = "#" * max(1, round(width * value / largest)) if value > 0 else ""
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
        lines.append(f"{name + ':':<{label}} {bar:<{width}} {shown}")
    return "\n".join(lines)


_FIGURE_TITLES = {
    "train": "train (forward + backward)",
    "prefill": "prefill (causal forward)",
    "decode": "decode (one step at context T)",
}


def phase_comparison(results: Sequence[Measurement]) -> Figure:
    """Measured time (top row) and peak memory (bottom row) vs T, one column per phase present,
    with each mechanism's fitted log-log slope of time in the legend."""
    phases = [p for p in PHASES if any(phase_of(r) == p for r in results)]
    if not phases:
        raise ValueError("results hold no measurement")
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(2, len(phases), figsize=(5 * len(phases), 7.5), squeeze=False)
        for column, phase in enumerate(phases):
            rows = [r for r in results if phase_of(r) == phase]
            top, bottom = axes[0, column], axes[1, column]
            for name in dict.fromkeys(mechanism_of(r) for r in rows):
                points = sorted((r.T, r.seconds, r.peak_bytes) for r in rows if mechanism_of(r) == name)
                Ts = [p[0] for p in points]
                slope = loglog_slope(Ts, [p[1] for p in points]) if len(points) > 1 else float("nan")
                top.plot(Ts, [p[1] * 1e3 for p in points], marker="o", label=f"{name} ({slope:.2f})")
                memory = [(p[0], p[2]) for p in points if p[2]]
                bottom.plot([t for t, _ in memory], [b / 2**20 for _, b in memory], marker="o", label=name)
            top.set_title(f"{_FIGURE_TITLES[phase]}: time")
            bottom.set_title(f"{_FIGURE_TITLES[phase]}: peak memory")
            top.legend(frameon=False, fontsize=7, title="log-log slope", title_fontsize=7)
            for ax, label in ((top, "time per call (ms)"), (bottom, "peak memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length / context T")
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
        figure.tight_layout()
    return figure
