"""Chapter 08's comparison: every mechanism of the catalogue side by side in three phases.

The mechanisms are the catalogue's entries with a functional form, ``catalogue.mechanisms(has="run")``;
each is fed its own seeded inputs (:meth:`~course_lib.catalogue.Mechanism.make_inputs`, one
sequence, H = 4 heads, D = 64: :data:`GEOMETRY`) in float32, and run with its declared options
(chunks of 64, a window of 256, blocks of 128, ...). For each phase, :func:`phase_methods` gives one
builder per mechanism that :func:`course_lib.measure.sweep` measures (``python -m course_lib.bench
all`` runs them):

- ``train``: the forward pass and its backward (the gradients of every input in
  :attr:`~course_lib.catalogue.Mechanism.trainable`), T = 256 .. 2048;
- ``prefill``: one forward pass, T = 256 .. 2048;
- ``decode``: one decoding step at a context of T = 256 .. 16384 tokens (:func:`decode_step`). A
  mechanism that decodes from a cache (``decode="cache"``) attends the last token's query to the
  cached keys and values (the last ``cache_window`` of them for the sliding window); one that
  decodes from a state (``decode="state"``) does one step of its ``form="recurrent"`` from the
  state its chunk form left after the first T - 1 tokens: O(1) in T. An entry with a decoder of
  its own (``Mechanism.decoder``: MLA from its latent cache, SwitchHead from its layer's KV
  cache) decodes through it.

MLA and SwitchHead exist only as layers; their entries run the whole layer (projections, routers
and experts included) through :mod:`course_lib.catalogue.layers`, and the tables say so
(:func:`whole_layers`). The entries without a functional form (ring attention, the hybrid stack)
are listed with the entry's reason (:func:`not_run`).

Where a phase does not apply, the mechanism is left out of that phase's sweep and listed with the
reason (:func:`not_applicable`): a mechanism that is not causal has no decoding step (and its
train and prefill passes see the whole sequence), one without a declared ``decode`` neither.
Lengths are capped per mechanism by :func:`max_length`: train and prefill stop at
:data:`FULL_SEQUENCE_MAX_T`, and at :data:`SCORES_MAX_T` for the mechanisms whose cost model says
they materialise the T x T scores (:func:`materialises_scores`). The cost model of each call is
the entry's :attr:`~course_lib.catalogue.Mechanism.cost` (None where the entry declares none);
:func:`relative_to` and :func:`relative_bars` give the sources' "relative to standard attention"
bars, and :func:`phase_comparison` draws time and peak memory per phase. The tables, the report
and the stored ``results/all_small.json`` are those of the benchmark suites in
:mod:`course_lib.benchmarks.ch08`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from .. import catalogue
from ..catalogue import Geometry, Mechanism
from ..checks import check_choice, check_int
from ..measure import Measurement
from ..viz import STYLE, new_figure

__all__ = [
    "PHASES",
    "GEOMETRY",
    "HEADS",
    "HEAD_DIM",
    "ALL_LENGTHS",
    "DECODE_LENGTHS",
    "FULL_SEQUENCE_MAX_T",
    "SCORES_MAX_T",
    "mechanisms",
    "not_run",
    "whole_layers",
    "phase_inputs",
    "not_applicable",
    "materialises_scores",
    "max_length",
    "phase_of",
    "mechanism_of",
    "by_phase",
    "complexity",
    "state_bytes",
    "prefill_step",
    "train_step",
    "decode_step",
    "decode_last",
    "phase_methods",
    "relative_to",
    "relative_bars",
    "phase_comparison",
    "decode_tradeoff",
]

PHASES = catalogue.PHASES  # ("train", "prefill", "decode")
HEADS, HEAD_DIM = 4, 64
GEOMETRY = Geometry(batch=1, heads=HEADS, head_dim=HEAD_DIM)
ALL_LENGTHS = [256, 512, 1024, 2048]
DECODE_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
FULL_SEQUENCE_MAX_T = 2048  # train and prefill stop here
SCORES_MAX_T = 1024  # ... and here for a mechanism that materialises the T x T scores


def mechanisms() -> tuple[Mechanism, ...]:
    """The mechanisms of the comparison: every catalogue entry with a functional form."""
    return catalogue.mechanisms(has="run")


def not_run() -> dict[str, str]:
    """The catalogue entries the comparison cannot run, with each entry's reason (``Mechanism.not_run``)."""
    return {m.name: m.not_run or "no functional form" for m in catalogue.mechanisms() if not m.has("run")}


def whole_layers() -> tuple[str, ...]:
    """The mechanisms measured as whole layers (projections included; ``Mechanism.layer``)."""
    return tuple(m.name for m in mechanisms() if m.layer)


def _mechanism(name: str | Mechanism) -> Mechanism:
    if isinstance(name, Mechanism):
        return name
    mechanism = catalogue.get(name)
    if not mechanism.has("run"):
        runnable = ", ".join(m.name for m in mechanisms())
        raise ValueError(f"name={name!r} has no functional form to run; ones that do: {runnable}")
    return mechanism


def phase_inputs(
    name: str | Mechanism, T: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The seeded inputs of one benchmark point: the entry's own, at :data:`GEOMETRY`."""
    return _mechanism(name).make_inputs(T, GEOMETRY, dtype=dtype, device=device)


# --- which phases apply, and up to which length ------------------------------------------------


def not_applicable(name: str | Mechanism, phase: str) -> str | None:
    """Why ``phase`` does not apply to the mechanism, or None when it does."""
    mechanism = _mechanism(name)
    check_choice(phase, "phase", PHASES)
    if phase != "decode":
        return None
    if not mechanism.causal:
        return "not causal: a decoder cannot run it one token at a time"
    if mechanism.decode is None:
        return "declares no decoding step"
    return None


def materialises_scores(name: str | Mechanism) -> bool:
    """Whether the entry's cost model moves at least the float32 T x T scores and weights of every
    head (``16 H T^2`` bytes) in one prefill at T = :data:`FULL_SEQUENCE_MAX_T`: naive attention,
    MQA, GQA, top-k, and MLA, differential attention and SwitchHead (the course's versions call
    its naive attention). False for an entry without a cost model."""
    mechanism = _mechanism(name)
    if mechanism.cost is None:
        return False
    T = FULL_SEQUENCE_MAX_T
    return mechanism.cost("prefill", T, GEOMETRY)["bytes"] >= 16 * GEOMETRY.heads * T * T


def max_length(name: str | Mechanism, phase: str) -> int | None:
    """The longest T measured in ``phase`` (None: every length; 0: the phase does not apply)."""
    mechanism = _mechanism(name)
    if not_applicable(mechanism, phase) is not None:
        return 0
    if phase == "decode":
        return None
    return SCORES_MAX_T if materialises_scores(mechanism) else FULL_SEQUENCE_MAX_T


def phase_of(result: Measurement) -> str:
    """The phase of a measurement of the ``all`` suites (its method is ``"phase:mechanism"``)."""
    return result.method.split(":", 1)[0] if ":" in result.method else "prefill"


def mechanism_of(result: Measurement) -> str:
    """The mechanism of a measurement of the ``all`` suites, without the phase."""
    return result.method.split(":", 1)[-1]


# --- the three phases -------------------------------------------------------------------------


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def prefill_step(name: str | Mechanism, x: Mapping[str, torch.Tensor]) -> Callable[[], object]:
    """A zero-argument callable: one forward pass of the mechanism on ``x`` (its declared options)."""
    mechanism = _mechanism(name)
    return lambda: mechanism.run(x)


def train_step(
    name: str | Mechanism, x: Mapping[str, torch.Tensor]
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A zero-argument callable: the forward pass of the mechanism on ``x`` and its backward.

    ``x`` comes from :func:`phase_inputs`. The callable returns the gradients of a seeded random
    loss ``sum(o * grad_output)`` with respect to every input in the entry's ``trainable``
    (``torch.autograd.grad``: nothing accumulates between calls).
    """
    mechanism = _mechanism(name)
    leaves = {key: x[key].detach().clone().requires_grad_(True) for key in mechanism.trainable}
    inputs = {**x, **leaves}
    with torch.no_grad():
        shape = _output(mechanism.run(x)).shape
    generator = torch.Generator().manual_seed(2)
    grad_output = torch.randn(shape, generator=generator).to(next(iter(leaves.values())))

    def call() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(_output(mechanism.run(inputs)), list(leaves.values()), grad_output)

    return call


def decode_step(
    name: str | Mechanism, x: Mapping[str, torch.Tensor], T: int | None = None
) -> Callable[[], tuple[torch.Tensor, object]]:
    """A zero-argument callable: one decoding step for token ``T`` (1-based, default: the last) of ``x``.

    It returns ``(output, state)``: the output ``(B, H, 1, D_v)`` equals row ``T - 1`` of the
    causal forward pass over the first T tokens, and ``state`` is what a decoder keeps after
    token T (its size is the entry's ``state_numbers(T)``). ``decode="cache"``: the per-token
    inputs of the queries (the entry's ``query_inputs``) of token T against the cache of the
    first T tokens' other inputs (only the last ``cache_window`` of them, when declared); state:
    those cached tensors. ``decode="state"``: the chunk form runs over the first T - 1 tokens
    here (not in the callable), and the callable does one ``form="recurrent"`` step from the
    state it left; state: the new state. An entry with its own ``decoder`` prepares its cache
    here and decodes in the callable (state: what its cache holds).
    """
    mechanism = _mechanism(name)
    reason = not_applicable(mechanism, "decode")
    if reason is not None:
        raise ValueError(f"name={mechanism.name!r} has no decode phase: {reason}")
    length = next(v.shape[2] for k, v in x.items() if k not in mechanism.static_inputs)
    T = length if T is None else check_int(T, "T", min=1, max=length)
    if mechanism.decoder is not None:
        return mechanism.decoder(x, T, **mechanism.options)
    last = mechanism.tokens(x, T - 1, T)
    if mechanism.decode == "state":
        state = None
        if T > 1:
            _, state = mechanism.run(mechanism.tokens(x, 0, T - 1), output_final_state=True)
        return lambda: mechanism.run(last, form="recurrent", initial_state=state, output_final_state=True)
    first = 0 if mechanism.cache_window is None else max(T - mechanism.cache_window, 0)
    step = {**mechanism.tokens(x, first, T), **{key: last[key] for key in mechanism.query_inputs}}
    cached = tuple(
        value for key, value in step.items() if key not in mechanism.query_inputs + mechanism.static_inputs
    )
    return lambda: (mechanism.run(step), cached)


def decode_last(
    mechanism: str | Mechanism, x: Mapping[str, torch.Tensor], T: int
) -> tuple[torch.Tensor, object]:
    """One decoding step for token ``T`` (1-based), as the decode phase runs it: ``(output, state)``."""
    return decode_step(mechanism, x, T)()


# --- the cost model ---------------------------------------------------------------------------


def complexity(
    name: str, phase: str, T: int, *, heads: int = HEADS, head_dim: int = HEAD_DIM
) -> dict[str, float] | None:
    """The entry's model of the FLOPs and float32 bytes moved by one call (its
    :attr:`~course_lib.catalogue.Mechanism.cost`; the formulas are in
    :mod:`course_lib.catalogue.costs`), or None when the entry declares no model."""
    mechanism = _mechanism(name)
    check_choice(phase, "phase", PHASES)
    T = check_int(T, "T", min=1)
    geometry = Geometry(
        batch=1, heads=check_int(heads, "heads", min=1), head_dim=check_int(head_dim, "head_dim", min=1)
    )
    return None if mechanism.cost is None else mechanism.cost(phase, T, geometry)


def state_bytes(name: str | Mechanism, T: int, dtype: torch.dtype = torch.float32) -> int | None:
    """Bytes of KV cache or state one sequence keeps per layer after ``T`` tokens at :data:`GEOMETRY`
    with the entry's options (None where the entry declares no decoding state)."""
    mechanism = _mechanism(name)
    if not mechanism.has("state"):
        return None
    return mechanism.state_bytes(check_int(T, "T", min=0), GEOMETRY, dtype=dtype)


# --- what the sweep measures ---------------------------------------------------------------


def phase_methods(
    phase: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    max_t: int | None = None,
) -> dict[str, Callable[[int], Callable[[], object] | None]]:
    """Builders ``{"phase:mechanism": build}`` for ``measure.sweep``, one per mechanism the phase
    applies to. ``build(T)`` returns None beyond :func:`max_length` or ``max_t`` (that length is
    left out) and otherwise a callable whose ``extra`` holds the phase, the mechanism, whether
    it ran causally, the cost model (``flops``, ``bytes``) where the entry declares one, and the
    bytes of KV cache or state one sequence keeps per layer after T tokens (``state_bytes``, in
    ``dtype``; :meth:`~course_lib.catalogue.Mechanism.state_bytes`) where it declares them."""
    check_choice(phase, "phase", PHASES)
    steps = {"train": train_step, "prefill": prefill_step, "decode": decode_step}

    def method(mechanism: Mechanism):
        limit = max_length(mechanism, phase)

        def build(T: int):
            if (limit is not None and T > limit) or (max_t is not None and T > max_t):
                return None
            call = steps[phase](mechanism, phase_inputs(mechanism, T, device, dtype))
            cost = mechanism.cost(phase, T, GEOMETRY) if mechanism.cost is not None else {}
            state = state_bytes(mechanism, T, dtype)
            call.extra = {"phase": phase, "mechanism": mechanism.name, "causal": mechanism.causal, **cost}
            if state is not None:
                call.extra["state_bytes"] = state
            return call

        return build

    return {f"{phase}:{m.name}": method(m) for m in mechanisms() if not_applicable(m, phase) is None}


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
    results: Sequence[Measurement],
    phase: str,
    T: int,
    *,
    reference: str = "attention",
    metric: str = "speed",
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
    "prefill": "prefill (forward)",
    "decode": "decode (one step at context T)",
}


def _styles(names: Sequence[str]) -> dict[str, dict]:
    """One line style per mechanism, the same in every panel: ten colours, then the same colours
    dashed, dotted and dash-dotted, so that up to forty lines stay distinct."""
    colours = plt.get_cmap("tab10").colors
    return {
        name: {"color": colours[i % 10], "linestyle": ("-", "--", ":", "-.")[i // 10 % 4], "marker": "o"}
        for i, name in enumerate(names)
    }


def phase_comparison(results: Sequence[Measurement]) -> Figure:
    """Measured time (top row) and peak memory (bottom row) vs T, one column per phase present;
    each mechanism keeps its style in every panel, named once in the figure's legend (the fitted
    slopes are in the tables of :mod:`course_lib.benchmarks.ch08`)."""
    phases = [p for p in PHASES if any(phase_of(r) == p for r in results)]
    if not phases:
        raise ValueError("results hold no measurement")
    names = list(dict.fromkeys(mechanism_of(r) for r in results))
    styles = _styles(names)
    with plt.rc_context(STYLE):
        figure = new_figure((4.6 * len(phases) + 2.4, 8))
        axes = figure.subplots(2, len(phases), squeeze=False)
        for column, phase in enumerate(phases):
            rows = [r for r in results if phase_of(r) == phase]
            top, bottom = axes[0, column], axes[1, column]
            for name in dict.fromkeys(mechanism_of(r) for r in rows):
                points = sorted((r.T, r.seconds, r.peak_bytes) for r in rows if mechanism_of(r) == name)
                style = {**styles[name], "markersize": 3, "linewidth": 1.2}
                top.plot([p[0] for p in points], [p[1] * 1e3 for p in points], label=name, **style)
                memory = [(p[0], p[2]) for p in points if p[2]]
                bottom.plot([t for t, _ in memory], [b / 2**20 for _, b in memory], **style)
            top.set_title(f"{_FIGURE_TITLES[phase]}: time")
            bottom.set_title(f"{_FIGURE_TITLES[phase]}: peak memory")
            for ax, label in ((top, "time per call (ms)"), (bottom, "peak memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length / context T")
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
        handles = {}
        for ax in axes[0]:
            handles.update(zip(*reversed(ax.get_legend_handles_labels())))
        shown = [n for n in names if n in handles]
        # 9 pt like the axis labels: the figure is shown shrunk to the notebook's width, and 7 pt
        # names were unreadable. Up to 20 names in one column, then two.
        columns = 1 if len(shown) <= 20 else 2
        legend_inches = 0.15 + 0.075 * max(map(len, shown), default=0) * columns + 0.45 * columns
        figure.set_figwidth(figure.get_figwidth() + legend_inches - 2.4)
        right = 1 - legend_inches / figure.get_figwidth()
        figure.tight_layout(rect=(0, 0, right, 1))
        # Held by the top-right panel (so it is that axes' legend) but placed in figure coordinates,
        # to the right of both rows, outside the panels.
        axes[0, -1].legend(
            [handles[n] for n in shown],
            shown,
            loc="center left",
            bbox_to_anchor=(right, 0.5),
            bbox_transform=figure.transFigure,
            frameon=False,
            fontsize=9,
            ncol=columns,
        )
    return figure


def decode_tradeoff(results: Sequence[Measurement], T: int | None = None) -> Figure:
    """One point per mechanism at the context ``T`` of the decode phase (default: the longest
    measured): the KV cache or state it keeps (x) against the time of one decoding step (y),
    coloured by family. The decision between a growing cache and a fixed state, in one picture."""
    rows = [r for r in results if phase_of(r) == "decode"]
    if not rows:
        raise ValueError("results hold no decode measurement")
    T = max(r.T for r in rows) if T is None else check_int(T, "T", min=1)
    points = [
        (mechanism_of(r), state, r.seconds)
        for r in rows
        if r.T == T and (state := r.extra.get("state_bytes", _catalogue_state(mechanism_of(r), T)))
    ]
    if not points:
        raise ValueError(f"T={T} has no decode measurement with a known state size")
    colours = dict(zip(catalogue.FAMILIES, plt.get_cmap("tab10").colors))
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(8, 5))
        for family in catalogue.FAMILIES:
            mine = [p for p in points if _family(p[0]) == family]
            if mine:
                ax.scatter(
                    [p[1] for p in mine],
                    [p[2] * 1e3 for p in mine],
                    color=colours[family],
                    label=family,
                    s=30,
                )
        # labels of mechanisms with the same state alternate right and left of their points
        for rank, (name, state, seconds) in enumerate(sorted(points, key=lambda p: (p[1], p[2]))):
            right = rank % 2 == 0
            ax.annotate(
                name,
                (state, seconds * 1e3),
                fontsize=7,
                xytext=(4 if right else -4, 0),
                textcoords="offset points",
                ha="left" if right else "right",
                va="center",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache / state per sequence and layer (bytes)")
        ax.set_ylabel("one decoding step (ms)")
        ax.set_title(f"decoding at a context of T = {T}: state kept vs time per token")
        ax.legend(frameon=False, fontsize=8)
        ax.grid(True, alpha=0.3)
        figure.tight_layout()
    return figure


def _catalogue_state(name: str, T: int) -> int | None:
    try:
        return state_bytes(name, T)
    except ValueError:  # a name the catalogue does not know (a hand-made result)
        return None


def _family(name: str) -> str | None:
    try:
        return catalogue.get(name).family
    except ValueError:
        return None
