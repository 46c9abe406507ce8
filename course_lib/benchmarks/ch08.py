"""Chapter 08's benchmarks: every mechanism side by side in three phases, and quality on recall.

``python -m course_lib.bench all`` measures, in one process run, time and peak memory of every
mechanism of the course (one sequence, H = 4 heads, D = 64, float32) in three phases:

- ``train``: one causal forward pass and its backward (gradients of every input), T = 256 .. 2048;
- ``prefill``: one causal forward pass, T = 256 .. 2048;
- ``decode``: one decoding step at a context of T = 256 .. 16384 tokens. The softmax mechanisms
  attend one new query to a KV cache of T entries (naive, SDPA, the course's flash_attention;
  sliding-window attention reads only the last w = 256 entries); the recurrent mechanisms
  (linear attention, GLA, the delta rule, SSD) do one step of their ``form="recurrent"`` from the
  state that their chunk form left after the first T - 1 tokens: O(1) in T.

The mechanisms: naive attention (:func:`course_lib.standard.attention`), SDPA, flash_attention
(blocks of 128), sliding-window attention (w = 256), and the chunk forms (chunks of 64) of linear
attention, GLA, the delta rule and SSD (P = N = 64). SDPA is the reference of each phase's ratio
columns. Train and prefill are left out above :data:`FULL_SEQUENCE_MAX_T`, decode is measured at
every length. Beside each phase's table, :func:`complexity` gives a model of the FLOPs and the
bytes moved, and :func:`all_report` compares the model's log-log slopes with the measured ones.
``all_train``, ``all_prefill`` and ``all_decode`` run one phase alone. The stored
``results/all_small.json`` (all three phases) comes from the command below, run on one thread
because the 2-core machine was shared with other jobs::

    python -m course_lib.bench all --threads 1 --min-run-time 0.1 --json results/all_small.json

``python -m course_lib.bench recall`` trains a tiny model per mixer (:mod:`course_lib.recall`)
on MQAR at each sequence length (:func:`recall_task`: ``num_pairs = T / 16``, as in Zoology's
grid) for 600 steps of batch 16 at learning rate 3e-3, then times one evaluation forward pass of a
batch of 64; the held-out answer accuracy, the decoding state size and the training settings go
into the JSON (``extra``) and into a table printed after the timings. The stored grid
``results/recall_grid.json`` (8 mixers x T = 64, 128, 256, about 25 minutes) comes from, on one
thread of the same machine::

    python -m course_lib.bench recall --threads 1 --min-run-time 0.05 --json results/recall_grid.json
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_int
from ..linear import linear_attention
from ..measure import Measurement, format_bytes, format_table, loglog_slope
from ..recall import RECALL_MIXERS, MQARTask, mqar_batch, train_recall
from ..sparse import sliding_window_attention
from ..standard import attention
from ..tiling import flash_attention
from .ch07 import recurrent_inputs, run_method

__all__ = [
    "SUITES",
    "PHASES",
    "ALL_METHODS",
    "TRAIN_INPUTS",
    "SOFTMAX_METHODS",
    "RECURRENT_METHODS",
    "FULL_SEQUENCE_MAX_T",
    "phase_of",
    "mechanism_of",
    "complexity",
    "train_step",
    "decode_step",
    "phase_methods",
    "all_suite",
    "all_train_suite",
    "all_prefill_suite",
    "all_decode_suite",
    "all_table",
    "all_report",
    "all_plot",
    "relative_to",
    "relative_bars",
    "recall_suite",
    "recall_report",
    "RECALL_STEPS",
    "RECALL_LENGTHS",
    "RECALL_LR",
    "RECALL_BATCH",
    "recall_task",
]

HEADS, HEAD_DIM, WINDOW, CHUNK, FLASH_BLOCK = 4, 64, 256, 64, 128
PHASES = ("train", "prefill", "decode")
ALL_LENGTHS = [256, 512, 1024, 2048]
DECODE_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
FULL_SEQUENCE_MAX_T = 2048  # train and prefill stop here: naive attention's T x T weights grow as T^2
RECALL_LENGTHS = [64, 128, 256]
RECALL_STEPS = 600
RECALL_LR = 3e-3
RECALL_BATCH = 16
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

    ``x`` comes from :func:`course_lib.benchmarks.ch07.recurrent_inputs`. The callable returns
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


# --- suites -----------------------------------------------------------------------------------


def phase_methods(
    phase: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    max_t: int | None = None,
) -> dict[str, Callable[[int], Callable[[], object] | None]]:
    """Builders ``{"phase:mechanism": build}`` for ``bench.sweep``; ``build(T)`` returns None for
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


def all_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Train, prefill and decode of every mechanism in one run: time, peak memory, FLOP/byte model.

    Train and prefill up to T = 2048, decode up to 16384.
    """
    methods = {}
    for phase in PHASES:
        limit = None if phase == "decode" else FULL_SEQUENCE_MAX_T
        methods.update(phase_methods(phase, device, dtype, max_t=limit))
    return methods, "prefill:sdpa", sorted(set(ALL_LENGTHS) | set(DECODE_LENGTHS))


def all_train_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Train phase: causal forward + backward of every mechanism; T = 256 .. 2048."""
    return phase_methods("train", device, dtype), "train:sdpa", list(ALL_LENGTHS)


def all_prefill_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Prefill phase: one causal forward pass of every mechanism; T = 256 .. 2048."""
    return phase_methods("prefill", device, dtype), "prefill:sdpa", list(ALL_LENGTHS)


def all_decode_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Decode phase: one step (KV cache or recurrent state) of every mechanism at context T = 256 .. 16384."""
    return phase_methods("decode", device, dtype), "decode:sdpa", list(DECODE_LENGTHS)


_PHASE_TITLES = {
    "train": "train: causal forward + backward",
    "prefill": "prefill: causal forward",
    "decode": "decode: one step at context T",
}


def _by_phase(results: Sequence[Measurement]) -> dict[str, list[Measurement]]:
    """Measurements per phase (in PHASES order), each renamed to its mechanism alone."""
    grouped: dict[str, list[Measurement]] = {}
    for r in results:
        grouped.setdefault(phase_of(r), []).append(
            Measurement(mechanism_of(r), r.T, r.seconds, r.peak_bytes, r.extra)
        )
    return {phase: grouped[phase] for phase in PHASES if phase in grouped}


def all_table(results: Sequence[Measurement]) -> str:
    """One table per phase: time and peak memory per mechanism and T, ratios to SDPA, slopes."""
    blocks = []
    for phase, rows in _by_phase(results).items():
        reference = "sdpa" if any(r.method == "sdpa" for r in rows) else None
        blocks.append(f"== {_PHASE_TITLES[phase]} ==\n{format_table(rows, reference=reference)}")
    return "\n\n".join(blocks)


def _slope(points: list[tuple[int, float | None]]) -> float | None:
    points = [(T, y) for T, y in points if y]
    return loglog_slope(*zip(*points)) if len(points) >= 2 else None


def all_report(results: Sequence[Measurement]) -> str:
    """Per phase: the complexity model at the largest T, and log-log slopes, model vs measured.

    ``GFLOP/s`` is the model's FLOPs divided by the measured time: how close a mechanism comes to
    the machine's arithmetic rate (a low value means overheads or memory traffic dominate).
    """
    lines = []
    header = (
        f"{'mechanism':>10} {'T':>6} {'model FLOPs':>12} {'model bytes':>11} {'GFLOP/s':>8}"
        f" {'slope FLOPs':>11} {'slope bytes':>11} {'slope time':>10} {'slope peak':>10}"
    )
    for phase, rows in _by_phase(results).items():
        lines += ["", f"== complexity model vs measurement, {_PHASE_TITLES[phase]} ==", header]
        for name in dict.fromkeys(r.method for r in rows):
            points = sorted((r for r in rows if r.method == name), key=lambda r: r.T)
            model = [complexity(name, phase, r.T) for r in points]
            last = points[-1]
            slopes = [
                _slope([(r.T, m["flops"]) for r, m in zip(points, model)]),
                _slope([(r.T, m["bytes"]) for r, m in zip(points, model)]),
                _slope([(r.T, r.seconds) for r in points]),
                _slope([(r.T, r.peak_bytes) for r in points]),
            ]
            cells = ["-" if s is None else f"{s:.2f}" for s in slopes]
            lines.append(
                f"{name:>10} {last.T:>6} {model[-1]['flops']:>12.3g} {format_bytes(model[-1]['bytes']):>11}"
                f" {model[-1]['flops'] / last.seconds / 1e9:>8.2f} {cells[0]:>11} {cells[1]:>11}"
                f" {cells[2]:>10} {cells[3]:>10}"
            )
    return "\n".join(lines[1:])


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
    rows = {r.method: r for r in _by_phase(results).get(phase, []) if r.T == T}
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


def all_plot(results: Sequence[Measurement], path: str | Path) -> Path:
    """Save the per-phase figure (time and peak memory vs T, one column per phase) to ``path``."""
    import matplotlib.pyplot as plt

    from ..figures.ch08 import phase_comparison

    figure = phase_comparison(results)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


for _suite in (all_suite, all_train_suite, all_prefill_suite, all_decode_suite):
    _suite.table, _suite.report, _suite.plot = all_table, all_report, all_plot
    _suite.shape = {"B": 1, "H": HEADS, "D": HEAD_DIM}


# --- recall -----------------------------------------------------------------------------------


def recall_task(T: int) -> MQARTask:
    """The MQAR task of the grid at length T: ``num_pairs = T / 16`` (at least 1) as in Zoology's
    (64, 4), (128, 8), (256, 16), with 64 tokens of vocabulary (31 keys, so up to T = 496)."""
    T = check_int(T, "T", min=3)
    return MQARTask(vocab_size=64, num_pairs=max(T // 16, 1), seq_len=T)


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
            task = recall_task(T)
            result = train_recall(mixer, task, steps=steps, lr=lr, batch_size=batch_size, progress=progress)
            model = result.pop("model")
            inputs, _ = mqar_batch(task, 64, seed=99)

            @torch.no_grad()
            def call():
                return model(inputs)

            losses = result.pop("losses")
            result.pop("curve")
            call.extra = {
                **result,
                "lr": lr,
                "batch_size": batch_size,
                "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            }
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
recall_suite.shape = {"B": 64, "H": 4, "D": 16, "d_model": 64}

SUITES = {
    "all": all_suite,
    "all_train": all_train_suite,
    "all_prefill": all_prefill_suite,
    "all_decode": all_decode_suite,
    "recall": recall_suite,
}
