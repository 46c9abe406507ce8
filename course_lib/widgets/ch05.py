"""Chapter 05's explorers: the mask gallery, KV-cache eviction, and measured sparse kernels.

- (a) :func:`mask_explorer`: a pattern and its knobs -> the mask, its density, how many layers
  connect every pair, and the estimated cost of a kernel that skips the masked pairs at a chosen T.
  Besides the fixed patterns, NSA's and MoBA's block selections on seeded inputs.
- (b) :func:`eviction_explorer`: a policy and a budget -> the kept cache entries, the output
  error and the next-token loss, on the attention of chapter 05's trained model over held-out
  text, or on a synthetic stand-in with planted sinks and heavy hitters.
- (c) :func:`sparse_timing`: a button that measures dense-masked attention, the banded kernel and
  SDPA with the mask as T grows (a small sweep of :mod:`course_lib.studies.sparse_kernels`).

The eviction study itself (decoding attention, policies, errors, losses) is
:mod:`course_lib.studies.eviction`; its names stay importable from here for one release.
"""

from __future__ import annotations

from functools import cache

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from ..checks import check_choice, check_float, check_int, check_tensor
from ..measure import Measurement, format_bytes, format_table, sweep
from ..sparse import (
    keep_mask,
    mask_stats,
    reachability,
)

# The eviction study moved to course_lib.studies.eviction; its names stay importable here for one release.
from ..studies.eviction import (
    EVICTION_BUDGETS,
    POLICIES,
    DecodingAttention,
    EvictionStudy,
    TrainedDecoding,
    default_trained_decoding,
    evicted_loss,
    eviction_curves,
    eviction_study,
    policy_keep,
    synthetic_decoding_attention,
    trained_decoding,
    trained_eviction_study,
)
from ..studies.sparse_kernels import REFERENCE, sparse_methods
from ..studies.sparse_patterns import NSA_BRANCHES, PATTERNS, nsa_branch_map, pattern_mask, routing_inputs
from ..viz import STYLE, plot_mask, plot_scaling
from ._display import new_figure, show, widen_labels

__all__ = [
    "PATTERNS",
    "COST_LENGTHS",
    "routing_inputs",
    "NSA_BRANCHES",
    "nsa_branch_map",
    "pattern_mask",
    "pattern_cost",
    "reach_curve",
    "mask_explorer_view",
    "mask_explorer",
    "DecodingAttention",
    "synthetic_decoding_attention",
    "TrainedDecoding",
    "trained_decoding",
    "POLICIES",
    "policy_keep",
    "eviction_curves",
    "evicted_loss",
    "EvictionStudy",
    "eviction_study",
    "trained_eviction_study",
    "EVICTION_BUDGETS",
    "SOURCES",
    "eviction_explorer_view",
    "eviction_explorer",
    "TIMING_LENGTHS",
    "sparse_timing_view",
    "sparse_timing",
]

# --- (a) mask explorer ----------------------------------------------------------------------

COST_LENGTHS = (256, 512, 1024, 2048, 4096)


def pattern_cost(
    mask: torch.Tensor, *, heads: int = 8, head_dim: int = 64, bytes_per_score: int = 4
) -> dict[str, float | int]:
    """Estimated cost of one attention layer with ``mask``: dense vs a kernel that skips masked pairs.

    FLOPs are the two matmuls (``2 (D + D_v)`` per computed pair, as in :func:`mask_stats`) over all
    heads; score memory is the scores a kernel holds at once (dense: ``T x S`` per head; a
    skipping kernel: the allowed pairs only, its block padding ignored). A masked dense kernel
    costs exactly what dense costs, plus the mask itself (one byte per pair). The time ratio is
    the FLOP ratio: what an ideal skipping kernel would save, an upper bound on real savings.
    """
    heads = check_int(heads, "heads", min=1)
    head_dim = check_int(head_dim, "head_dim", min=1)
    bytes_per_score = check_int(bytes_per_score, "bytes_per_score", min=1)
    check_tensor(mask, "mask", ndim=2, dtype=torch.bool)
    # mask_stats would also count layers to connect, O(T^3 log T): too slow at T = 4096.
    T, S = mask.shape
    allowed = int(mask.sum())
    per_pair = 2 * (head_dim + head_dim)
    return {
        "T": T,
        "density": allowed / (T * S),
        "dense_flops": per_pair * T * S * heads,
        "sparse_flops": per_pair * allowed * heads,
        "time_ratio": allowed / (T * S),
        "dense_score_bytes": T * S * heads * bytes_per_score,
        "mask_bytes": T * S,
        "sparse_score_bytes": allowed * heads * bytes_per_score,
    }


def reach_curve(mask: torch.Tensor, max_layers: int = 16) -> list[float]:
    """Fraction of the reachable pairs covered after 1, 2, ... layers (stops once it reaches 1).

    The reachable pairs are all pairs for a mask that looks ahead and ``j <= i`` for a causal one,
    as in :func:`course_lib.sparse.layers_to_connect`.
    """
    max_layers = check_int(max_layers, "max_layers", min=1)
    target = torch.ones_like(mask) if bool(mask.triu(1).any()) else torch.ones_like(mask).tril()
    one_layer = reachability(mask, 1).float()
    reach = one_layer
    curve = [float(((reach > 0) & target).sum()) / float(target.sum())]
    while curve[-1] < 1.0 and len(curve) < max_layers:
        reach = ((reach @ one_layer) > 0).float()  # one more layer: reachability(mask, len(curve) + 1)
        curve.append(float(((reach > 0) & target).sum()) / float(target.sum()))
    return curve


def mask_explorer_view(
    pattern: str = "bigbird",
    window: int = 4,
    dilation: int = 2,
    stride: int = 8,
    num_globals: int = 1,
    random_blocks: int = 1,
    block_size: int = 8,
    causal: bool = False,
    T_view: int = 64,
    T_cost: int = 4096,
    top_k: int = 2,
    *,
    draw: bool = True,
) -> dict:
    """One pattern drawn at ``T_view`` (mask, layers to connect, reach per layer), costed at ``T_cost``.

    Returns ``mask`` (the ``T_view`` mask), ``stats`` (:class:`~course_lib.sparse.MaskStats` at
    ``T_view``), ``reach`` (:func:`reach_curve`), ``cost`` (:func:`pattern_cost` at ``T_cost``,
    8 heads of 64 dims in float32) and ``html`` (the numbers as a table).
    """
    T_view = check_int(T_view, "T_view", min=2, max=256)
    T_cost = check_int(T_cost, "T_cost", min=2, max=8192)
    params = dict(
        window=window,
        dilation=dilation,
        stride=stride,
        num_globals=num_globals,
        random_blocks=random_blocks,
        block_size=block_size,
        causal=causal,
        top_k=top_k,
    )
    mask = pattern_mask(pattern, T_view, **params)
    stats = mask_stats(mask)
    reach = reach_curve(mask)
    cost = pattern_cost(pattern_mask(pattern, T_cost, **params))
    layers = "never" if stats.layers_to_connect is None else str(stats.layers_to_connect)
    html = (
        f"<b>{pattern}</b> at T={T_view}: {stats.density:.1%} of pairs kept, layers to connect all "
        f"pairs: {layers}.<br><b>Estimated cost of one layer at T={T_cost}</b> (8 heads, D=64, float32):"
        "<table><tr><th>kernel</th><th>GFLOP</th><th>score memory</th></tr>"
        f"<tr><td>dense</td><td>{cost['dense_flops'] / 1e9:.2f}</td>"
        f"<td>{format_bytes(cost['dense_score_bytes'])}</td></tr>"
        f"<tr><td>dense + mask</td><td>{cost['dense_flops'] / 1e9:.2f}</td>"
        f"<td>{format_bytes(cost['dense_score_bytes'])} + {format_bytes(cost['mask_bytes'])} mask</td></tr>"
        f"<tr><td>skipping kernel</td><td>{cost['sparse_flops'] / 1e9:.2f}</td>"
        f"<td>{format_bytes(cost['sparse_score_bytes'])}</td></tr></table>"
        f"Ideal time vs dense: {cost['time_ratio']:.1%} (density {cost['density']:.1%} at T={T_cost})."
    )
    if pattern == "nsa":
        html += (
            f"<br>NSA also reads about {T_cost // max(1, block_size // 2)} compressed keys per query "
            "(its third branch), not counted in this mask."
        )
    view = {"mask": mask, "stats": stats, "reach": reach, "cost": cost, "html": html}
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((10, 4.2))
            left, right = figure.subplots(1, 2)
            plot_mask(mask, ax=left, title=f"{pattern}, T={T_view}")
            right.plot(range(1, len(reach) + 1), reach, marker="o")
            right.set_ylim(0, 1.05)
            right.set_xlabel("layers stacked")
            right.set_ylabel("fraction of pairs connected")
            right.set_title(f"layers to connect all pairs: {layers}")
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def mask_explorer() -> widgets.Widget:
    """Pattern and its knobs -> the mask, density, layers to connect, and cost vs dense at a chosen T."""
    out = widgets.HTML()

    def update(**controls) -> dict:
        view = mask_explorer_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        pattern=widgets.Dropdown(options=PATTERNS, value="bigbird", description="pattern"),
        window=widgets.IntSlider(value=4, min=1, max=32, description="window"),
        dilation=widgets.IntSlider(value=2, min=1, max=8, description="dilation"),
        stride=widgets.IntSlider(value=8, min=1, max=32, description="stride"),
        num_globals=widgets.IntSlider(value=1, min=0, max=8, description="globals"),
        random_blocks=widgets.IntSlider(value=1, min=0, max=4, description="random blocks"),
        block_size=widgets.IntSlider(value=8, min=1, max=32, description="block size"),
        causal=widgets.Checkbox(value=False, description="causal"),
        T_view=widgets.SelectionSlider(options=[16, 32, 64, 128], value=64, description="T shown"),
        T_cost=widgets.SelectionSlider(options=list(COST_LENGTHS), value=4096, description="T costed"),
        top_k=widgets.IntSlider(value=2, min=1, max=8, description="blocks chosen"),
        draw=widgets.fixed(True),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls  # for tests and for readers who want the result
    return widen_labels(box)


# --- (b) eviction explorer --------------------------------------------------------------------


SOURCES = ("trained, layer 0", "trained, layer 1", "synthetic")


@cache
def _source(source: str) -> DecodingAttention:
    """The explorer's decoder for ``source``, built once (its tensors are never modified)."""
    if source == "synthetic":
        return synthetic_decoding_attention()
    return default_trained_decoding().layers[int(source.rsplit(" ", 1)[1])]


@cache
def _default_curves(source: str, num_sinks: int) -> dict[str, tuple[float, ...]]:
    """The explorer's error curves (they depend only on the source and the sinks), computed once each."""
    curves = eviction_curves(_source(source), EVICTION_BUDGETS, num_sinks=num_sinks)
    return {policy: tuple(errors) for policy, errors in curves.items()}


def eviction_explorer_view(
    policy: str = "streaming",
    budget: int = 32,
    num_sinks: int = 4,
    source: str = SOURCES[0],
    *,
    draw: bool = True,
) -> dict:
    """Kept cache entries, output error and (for the trained model) loss of ``policy`` at ``budget``.

    ``source``: a layer of the trained model on held-out text (the study's ``trained_decoding``,
    cache of 256, 64 new tokens, 16 windows) or the synthetic stand-in
    (``synthetic_decoding_attention``), both from :mod:`course_lib.studies.eviction`.
    Returns ``keep`` (indices; per key/value head for H2O), ``kept`` (a ``(H_kv, cache_len)`` bool
    map, first window), ``error`` (relative error of the new tokens' outputs vs the full cache),
    ``curves`` (every policy at the budgets :data:`EVICTION_BUDGETS`), ``attention`` (the weight each
    cache entry receives from the new tokens, averaged) and, for the trained model, ``loss`` (next-
    token loss with every layer evicted by ``policy`` at ``budget``), ``full_loss`` and ``losses``
    (every policy at :data:`EVICTION_BUDGETS`); these three are None for the synthetic source.
    """
    check_choice(source, "source", SOURCES)
    data = _source(source)
    check_choice(policy, "policy", POLICIES)
    budget = check_int(budget, "budget", min=1, max=data.cache_len)
    num_sinks = check_int(num_sinks, "num_sinks", min=0)
    keep = policy_keep(policy, data, budget, num_sinks=num_sinks)
    H_kv = data.k.shape[1]
    kept = keep_mask(keep.expand(data.k.shape[0], H_kv, keep.shape[-1])[0], data.cache_len)
    error = data.error(keep)
    curves = {name: list(errors) for name, errors in _default_curves(source, num_sinks).items()}
    view = {"keep": keep, "kept": kept, "error": error, "curves": curves, "attention": data.received}
    view["loss"] = view["full_loss"] = view["losses"] = None
    if source != "synthetic":
        decoding = default_trained_decoding()
        keeps = [policy_keep(policy, layer, budget, num_sinks=num_sinks) for layer in decoding.layers]
        study = trained_eviction_study(num_sinks)
        view.update(loss=evicted_loss(decoding, keeps), full_loss=study.full_loss, losses=study.losses)
    if draw:
        view["figure"] = _draw_eviction(view, policy, budget, source, data.cache_len)
    return view


def _draw_eviction(view: dict, policy: str, budget: int, source: str, cache_len: int):
    with plt.rc_context(STYLE):
        panels = 2 if view["loss"] is None else 3
        figure = new_figure((5.2 * panels, 4))
        axes = figure.subplots(1, panels)
        positions = torch.arange(cache_len)
        received, share = view["attention"], view["kept"].float().mean(0)
        axes[0].plot(positions, received, linewidth=1, color="grey", label="attention received")
        axes[0].scatter(positions[share > 0], received[share > 0], s=10, label="kept (any head)")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("cache position")
        axes[0].set_ylabel("mean weight from new tokens")
        axes[0].set_title(f"{source}: {policy}, budget {budget}")
        axes[0].legend(frameon=False)
        for name, errors in view["curves"].items():
            axes[1].plot(EVICTION_BUDGETS, errors, marker="o", label=name)
        axes[1].scatter([budget], [view["error"]], s=80, facecolors="none", edgecolors="black", zorder=3)
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("budget (cache entries kept)")
        axes[1].set_ylabel("relative output error")
        axes[1].set_title(f"error {view['error']:.3f} (cache of {cache_len})")
        axes[1].legend(frameon=False)
        if view["loss"] is not None:
            for name, losses in view["losses"].items():
                axes[2].plot(
                    EVICTION_BUDGETS, [x - view["full_loss"] for x in losses], marker="o", label=name
                )
            increase = view["loss"] - view["full_loss"]
            axes[2].scatter([budget], [increase], s=80, facecolors="none", edgecolors="black", zorder=3)
            axes[2].set_xscale("log", base=2)
            axes[2].set_xlabel("budget (every layer)")
            axes[2].set_ylabel("loss increase (nats per character)")
            axes[2].set_title(f"loss {view['loss']:.3f} vs {view['full_loss']:.3f} with the full cache")
            axes[2].legend(frameon=False)
        figure.tight_layout()
        show(figure)
    return figure


def eviction_explorer() -> widgets.Widget:
    """Source, policy, budget and sinks -> kept tokens, the output error and the loss vs the full cache."""
    return widgets.interactive(
        eviction_explorer_view,
        policy=widgets.Dropdown(options=POLICIES, value="streaming", description="policy"),
        budget=widgets.SelectionSlider(options=[4, 8, 16, 32, 64, 128, 256], value=32, description="budget"),
        num_sinks=widgets.IntSlider(value=4, min=0, max=8, description="sinks"),
        source=widgets.Dropdown(options=SOURCES, value=SOURCES[0], description="attention"),
        draw=widgets.fixed(True),
    )


# --- (c) measured time and memory ---------------------------------------------------------------

TIMING_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


def sparse_timing_view(
    max_T: int = 2048,
    *,
    window: int = 256,
    min_run_time: float = 0.05,
    methods: tuple[str, ...] | None = None,
    draw: bool = True,
) -> dict:
    """Measure chapter 05's kernels from 256 up to ``max_T`` and plot time and memory.

    Uses :func:`course_lib.studies.sparse_kernels.sparse_methods` (one sequence, 2 heads, D=64,
    causal window ``window``; the ``sparse`` benchmark suite runs the same) through
    :func:`course_lib.measure.sweep`. ``methods`` picks a subset (default: all). Returns
    ``results`` (measurements), ``lengths`` and ``table``.
    """
    max_T = check_int(max_T, "max_T", min=TIMING_LENGTHS[1], max=TIMING_LENGTHS[-1])
    min_run_time = check_float(min_run_time, "min_run_time", min=0.0, min_open=True)
    suite, reference = sparse_methods("cpu", window=window), REFERENCE
    chosen = list(suite) if methods is None else [check_choice(m, "methods", suite) for m in methods]
    lengths = [T for T in TIMING_LENGTHS if T <= max_T]
    results: list[Measurement] = sweep(
        {m: suite[m] for m in chosen}, lengths, min_run_time=min_run_time, progress=False
    )
    table = format_table(results, reference=reference if reference in chosen else None)
    view = {"results": results, "lengths": lengths, "table": table}
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((11, 4))
            axes = figure.subplots(1, 2)

            def series(field: str) -> dict[str, list]:
                return {m: [getattr(r, field) for r in results if r.method == m] for m in chosen}

            plot_scaling(lengths, series("seconds"), ylabel="seconds per call", ax=axes[0], title="time")
            plot_scaling(
                lengths,
                series("peak_bytes"),
                ylabel="peak bytes above baseline",
                ax=axes[1],
                title="peak memory",
            )
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def sparse_timing() -> widgets.Widget:
    """A max-T slider and a button: measure and plot dense-masked vs banded vs SDPA (seconds)."""
    max_T = widgets.SelectionSlider(options=list(TIMING_LENGTHS[1:]), value=1024, description="max T")
    button = widgets.Button(description="measure")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([max_T, button]), out])
    box.result = None

    def run(_=None) -> None:
        out.clear_output()
        with out:
            view = sparse_timing_view(max_T.value)
            print(view["table"])
        box.result = view

    button.on_click(run)
    box.max_T, box.button = max_T, button  # for tests
    return widen_labels(box)
