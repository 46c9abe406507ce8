"""Chapter 08's explorers: the measured comparison, and a decision guide built on it.

(a) The comparison explorer plots time, peak memory, or the complexity model's FLOPs or bytes
against T for the mechanisms and the phase (train, prefill, decode) you pick, from the results of
``python -m course_lib.bench all`` (the stored ``results/all_small.json`` by default, or
measurements passed in, e.g. from a live run). (b) The decision guide turns a sequence length, a
memory budget for the KV cache, whether exact attention is required and whether the workload is
decode-heavy into a recommendation, its reason and the chapter that teaches it.
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt

from ..checks import check_choice, check_int
from ..measure import Measurement

# Stored results are loaded by course_lib.results (RESULTS_DIR and load_results stay importable
# from here for one release).
from ..results import RESULTS_DIR, load_results
from ..studies.guide import REFERENCE_MODEL, evidence, kv_cache_bytes_per_token, recommend
from ..studies.phases import PHASES, mechanism_of, phase_of
from ..viz import STYLE, plot_scaling
from ._display import new_figure, show, widen_labels, wrap_line

__all__ = [
    "RESULTS_DIR",
    "load_results",
    "METRICS",
    "comparison_view",
    "comparison_explorer",
    "REFERENCE_MODEL",
    "kv_cache_bytes_per_token",
    "decision_guide_view",
    "decision_guide",
]

METRICS = ("time", "memory", "flops", "bytes")
_METRIC_LABELS = {
    "time": "measured time per call (ms)",
    "memory": "measured peak memory (bytes)",
    "flops": "model FLOPs per call",
    "bytes": "model bytes moved per call",
}


# --- (a) comparison explorer ----------------------------------------------------------------------


def _value(r: Measurement, metric: str) -> float | None:
    if metric == "time":
        return r.seconds * 1e3
    if metric == "memory":
        return r.peak_bytes
    return r.extra.get(metric)  # the complexity model, stored with the measurement


def comparison_view(
    mechanisms=("attention", "sdpa", "flash_attention", "linear_attention"),
    lengths=(256, 2048),
    metric: str = "time",
    phase: str = "prefill",
    *,
    results: list[Measurement] | None = None,
    draw: bool = True,
) -> dict:
    """Time (ms), peak memory (bytes) or the model's FLOPs or bytes vs T for ``mechanisms`` in
    ``phase``, T within ``lengths`` (min, max).

    Measurements of the ``all`` suites are named ``"phase:mechanism"``; older ones without a
    phase count as prefill. Returns ``series`` ``{name: [value per T]}`` (None where a point is
    missing), ``lengths`` (the T shown), ``metric`` and ``phase``.
    """
    results = load_results() if results is None else results
    check_choice(metric, "metric", METRICS)
    check_choice(phase, "phase", PHASES)
    results = [r for r in results if phase_of(r) == phase]
    known = list(dict.fromkeys(mechanism_of(r) for r in results))
    if not known:
        raise ValueError(f"phase {phase!r} has no measurement in these results")
    mechanisms = list(mechanisms)
    if not mechanisms:
        raise ValueError("mechanisms must name at least one mechanism")
    for name in mechanisms:
        check_choice(name, "mechanisms", known)
    low, high = (check_int(x, "lengths", min=1) for x in lengths)
    if low > high:
        raise ValueError(f"lengths must be (min, max) with min <= max, got {tuple(lengths)}")
    Ts = sorted({r.T for r in results if low <= r.T <= high})
    if not Ts:
        raise ValueError(f"lengths {tuple(lengths)} hold no T measured in phase {phase!r}")
    by_key = {(mechanism_of(r), r.T): r for r in results}
    series = {}
    for name in mechanisms:
        series[name] = [None if (name, T) not in by_key else _value(by_key[(name, T)], metric) for T in Ts]
    view = {"series": series, "lengths": Ts, "metric": metric, "phase": phase}
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((6, 4))
            ax = figure.subplots()
            plotted = {k: [v if v else None for v in vs] for k, vs in series.items()}
            plot_scaling(Ts, plotted, ylabel=_METRIC_LABELS[metric], ax=ax, title=f"{phase}: {metric} vs T")
            show(figure)
        view["figure"] = figure
    return view


def comparison_explorer(results: list[Measurement] | None = None) -> widgets.Widget:
    """Pick mechanisms, a T range, the metric and the phase -> the log-log plot of the measurements."""
    results = load_results() if results is None else results
    names = list(dict.fromkeys(mechanism_of(r) for r in results))
    phases = [p for p in PHASES if any(phase_of(r) == p for r in results)]
    first = "prefill" if "prefill" in phases else phases[0]

    def measured_lengths(phase: str) -> list[int]:
        return sorted({r.T for r in results if phase_of(r) == phase})

    Ts = measured_lengths(first)
    lengths = widgets.SelectionRangeSlider(options=Ts, index=(0, len(Ts) - 1), description="T range")
    phase = widgets.Dropdown(options=phases, value=first, description="phase")

    def bound_lengths_by_the_data(change) -> None:
        # The T range offers the lengths measured in the phase shown (decode goes further), all of them.
        Ts = measured_lengths(change["new"])
        lengths.options = Ts
        lengths.index = (0, len(Ts) - 1)

    phase.observe(bound_lengths_by_the_data, names="value")
    explorer = widgets.interactive(
        comparison_view,
        mechanisms=widgets.SelectMultiple(options=names, value=tuple(names[:4]), description="mechanisms"),
        lengths=lengths,
        metric=widgets.Dropdown(options=METRICS, value="time", description="metric"),
        phase=phase,
        results=widgets.fixed(results),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)


# --- (b) decision guide ---------------------------------------------------------------------------
# The rules and the findings they cite live in course_lib.studies.guide; REFERENCE_MODEL and
# kv_cache_bytes_per_token stay importable from here.


def decision_guide_view(
    seq_len: int = 4096,
    memory_gib: float = 8.0,
    exact: bool = True,
    decode_heavy: bool = False,
    *,
    found: dict | None = None,
    draw: bool = True,
) -> dict:
    """The guide's recommendation (:func:`course_lib.studies.guide.recommend`) for one sequence of
    ``seq_len`` tokens of :data:`REFERENCE_MODEL` and a KV-cache budget of ``memory_gib`` GiB,
    printed with the measurements behind it. ``found``: the findings (default: the stored results)."""
    view = recommend(seq_len, memory_gib, exact, decode_heavy, found=found)
    if draw:
        lines = [f"Recommendation: {view['recommendation']}", f"Why: {view['reason']}"]
        lines += [
            f"Measured: {text}\n  ({source})" for text, source in zip(view["evidence"], view["backed_by"])
        ]
        lines += [f"Numbers: {view['numbers']}", f"See chapter {view['chapter']}."]
        print("\n".join(wrap_line(line) for text in lines for line in text.split("\n")))
    return view


def decision_guide(found: dict | None = None) -> widgets.Widget:
    """Sequence length, memory budget, exactness, decode-heavy -> the recommendation and its evidence."""
    found = evidence() if found is None else found
    return widgets.interactive(
        decision_guide_view,
        seq_len=widgets.SelectionSlider(
            options=[2**k for k in range(9, 21)], value=4096, description="seq_len"
        ),
        memory_gib=widgets.FloatLogSlider(value=8.0, base=2, min=-4, max=7, step=0.5, description="GiB"),
        exact=widgets.Checkbox(value=True, description="exact needed"),
        decode_heavy=widgets.Checkbox(value=False, description="decode-heavy"),
        found=widgets.fixed(found),
        draw=widgets.fixed(True),
    )
