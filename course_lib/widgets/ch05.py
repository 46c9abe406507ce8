"""Chapter 05's explorers: the mask gallery, KV-cache eviction, and measured sparse kernels.

- (a) :func:`mask_explorer`: a pattern and its knobs -> the mask, its density, how many layers
  connect every pair, and the estimated cost of a kernel that skips the masked pairs at a chosen T.
- (b) :func:`eviction_explorer`: a policy and a budget -> the kept cache entries and the output
  error, on attention with real structure (:func:`synthetic_decoding_attention`).
- (c) :func:`sparse_timing`: a button that measures dense-masked attention, the banded kernel and
  SDPA with the mask as T grows (a small sweep through :mod:`course_lib.bench`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, cached_property

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from ..bench import Measurement, format_bytes, format_table, sweep
from ..checks import check_bool, check_choice, check_float, check_int, check_tensor
from ..sparse import (
    bigbird_layout,
    bigbird_mask,
    block_sparse_mask,
    dilated_mask,
    eviction_error,
    global_local_mask,
    h2o_keep,
    mask_stats,
    reachability,
    sliding_window_mask,
    streaming_keep,
    strided_mask,
)
from ..standard import attention
from ..viz import STYLE, plot_mask, plot_scaling

__all__ = [
    "PATTERNS",
    "COST_LENGTHS",
    "pattern_mask",
    "pattern_cost",
    "reach_curve",
    "mask_explorer_view",
    "mask_explorer",
    "DecodingAttention",
    "synthetic_decoding_attention",
    "POLICIES",
    "policy_keep",
    "eviction_curves",
    "eviction_explorer_view",
    "eviction_explorer",
    "TIMING_LENGTHS",
    "sparse_timing_view",
    "sparse_timing",
]

# --- (a) mask explorer ----------------------------------------------------------------------

PATTERNS = ("window", "dilated", "strided", "fixed", "global+local", "bigbird", "block")
COST_LENGTHS = (256, 512, 1024, 2048, 4096)


def pattern_mask(
    pattern: str,
    T: int,
    *,
    window: int = 4,
    dilation: int = 2,
    stride: int = 8,
    num_globals: int = 1,
    random_blocks: int = 1,
    block_size: int = 8,
    causal: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """The ``(T, T)`` mask of one gallery pattern, built by the library's mask builders.

    ``window``: local and dilated windows and the local part of global+local. ``dilation``: the
    dilated pattern. ``stride``: strided and fixed (Sparse Transformers). ``num_globals``: global
    tokens of global+local (the first ones, like a CLS token) and global blocks of BigBird.
    ``random_blocks`` and ``block_size``: BigBird (window of 3 blocks) and "block", a
    block-diagonal layout plus ``random_blocks`` random blocks per row (both seeded by ``seed``).
    """
    check_choice(pattern, "pattern", PATTERNS)
    T = check_int(T, "T", min=1)
    window = check_int(window, "window", min=1)
    dilation = check_int(dilation, "dilation", min=1)
    stride = check_int(stride, "stride", min=1)
    num_globals = check_int(num_globals, "num_globals", min=0)
    random_blocks = check_int(random_blocks, "random_blocks", min=0)
    block_size = check_int(block_size, "block_size", min=1)
    check_bool(causal, "causal")
    if pattern == "window":
        return sliding_window_mask(T, window, causal=causal)
    if pattern == "dilated":
        return dilated_mask(T, window, dilation, causal=causal)
    if pattern in ("strided", "fixed"):
        return strided_mask(T, stride, pattern=pattern, causal=causal)
    if pattern == "global+local":
        return global_local_mask(T, window, list(range(min(num_globals, T))), causal=causal)
    if pattern == "bigbird":
        return bigbird_mask(
            T, block_size, global_blocks=num_globals, random_blocks=random_blocks, causal=causal, seed=seed
        )
    layout = bigbird_layout(
        -(-T // block_size),
        window_blocks=1,
        global_blocks=0,
        random_blocks=random_blocks,
        causal=causal,
        seed=seed,
    )
    mask = block_sparse_mask(layout, block_size, T, T)
    return mask & torch.ones(T, T, dtype=torch.bool).tril() if causal else mask


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
    view = {"mask": mask, "stats": stats, "reach": reach, "cost": cost, "html": html}
    if draw:
        with plt.rc_context(STYLE):
            figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
            plot_mask(mask, ax=left, title=f"{pattern}, T={T_view}")
            right.plot(range(1, len(reach) + 1), reach, marker="o")
            right.set_ylim(0, 1.05)
            right.set_xlabel("layers stacked")
            right.set_ylabel("fraction of pairs connected")
            right.set_title(f"layers to connect all pairs: {layers}")
            figure.tight_layout()
            plt.show()
            plt.close(figure)
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
        draw=widgets.fixed(True),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls  # for tests and for readers who want the result
    return box


# --- (b) eviction explorer --------------------------------------------------------------------


@dataclass(frozen=True)
class DecodingAttention:
    """Queries, keys and values ``(1, H, cache_len + new_tokens, D)`` of a synthetic decoder.

    The first ``cache_len`` positions are the prompt (the KV cache to evict from), the last
    ``new_tokens`` are the decoding steps whose outputs the eviction error is measured on.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache_len: int
    sinks: torch.Tensor
    heavy: torch.Tensor

    @property
    def prefill(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt's queries, keys and values."""
        c = self.cache_len
        return self.q[:, :, :c], self.k[:, :, :c], self.v[:, :, :c]

    @cached_property
    def prefill_weights(self) -> torch.Tensor:
        """``(1, H, cache_len, cache_len)`` causal attention weights of the prompt (H2O's scores)."""
        return attention(*self.prefill, causal=True, return_weights=True)[1]

    @property
    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new tokens' queries against the cached keys and values."""
        c = self.cache_len
        return self.q[:, :, c:], self.k[:, :, :c], self.v[:, :, :c]


def synthetic_decoding_attention(
    cache_len: int = 512,
    new_tokens: int = 32,
    *,
    heads: int = 4,
    head_dim: int = 64,
    num_sinks: int = 4,
    num_heavy: int = 8,
    decay: float = 32.0,
    recency: float = 8.0,
    sink_strength: float = 5.0,
    heavy_strength: float = 4.0,
    seed: int = 0,
) -> DecodingAttention:
    """Attention with the structure eviction relies on, from a documented random process.

    Not a trained model: a stand-in with the three features seen in trained decoders.
    Half of each head's dimensions carry position: random Fourier features with Cauchy frequencies
    (scale ``1 / decay``), so ``p_i . p_j`` approximates ``exp(-|i - j| / decay)``; queries carry
    them times ``recency``, which gives a **recency bias**. The other half is Gaussian content
    plus two directions every query leans on: the first ``num_sinks`` keys get ``sink_strength``
    along the first (**attention sinks**) and ``num_heavy`` random positions of the cache get
    ``heavy_strength`` along the second (**heavy hitters**). Values are Gaussian. Queries are
    multiplied by ``sqrt(head_dim)``, so the default scale ``D ** -0.5`` gives these logits.
    With random Gaussian q and k instead, every policy's error is above 1: there is nothing to keep.
    """
    cache_len = check_int(cache_len, "cache_len", min=2)
    new_tokens = check_int(new_tokens, "new_tokens", min=1)
    heads = check_int(heads, "heads", min=1)
    head_dim = check_int(head_dim, "head_dim", min=4)
    num_sinks = check_int(num_sinks, "num_sinks", min=0, max=cache_len - 1)
    num_heavy = check_int(num_heavy, "num_heavy", min=0, max=cache_len - num_sinks)
    decay = check_float(decay, "decay", min=0.0, min_open=True)
    generator = torch.Generator().manual_seed(check_int(seed, "seed", min=0))

    T = cache_len + new_tokens
    frequencies = head_dim // 4
    uniform = torch.rand(heads, frequencies, generator=generator, dtype=torch.float64)
    omega = torch.tan(math.pi * (uniform - 0.5)) / decay  # Cauchy: the Laplace kernel exp(-|x|/decay)
    angles = torch.arange(T, dtype=torch.float64)[None, :, None] * omega[:, None, :]
    position = (torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(frequencies)).float()

    content_dim = head_dim - 2 * frequencies
    key_content = torch.randn(heads, T, content_dim, generator=generator) / content_dim**0.25
    query_content = torch.randn(heads, T, content_dim, generator=generator) / content_dim**0.25
    heavy = (torch.randperm(cache_len - num_sinks, generator=generator)[:num_heavy] + num_sinks).sort().values
    key_content[:, :num_sinks, 0] += sink_strength
    key_content[:, heavy, 1] += heavy_strength
    query_content[:, :, :2] += 1.0

    q = torch.cat([recency * position, query_content], dim=-1)[None] * head_dim**0.5
    k = torch.cat([position, key_content], dim=-1)[None]
    v = torch.randn(1, heads, T, head_dim, generator=generator)
    return DecodingAttention(q, k, v, cache_len, torch.arange(num_sinks), heavy)


@cache
def _default_decoder() -> DecodingAttention:
    """The explorer's decoder, built once (its tensors are never modified)."""
    return synthetic_decoding_attention()


POLICIES = ("streaming", "h2o", "recent", "random")


def policy_keep(
    policy: str, data: DecodingAttention, budget: int, *, num_sinks: int = 4, seed: int = 0
) -> torch.Tensor:
    """Indices of the cache entries ``policy`` keeps within ``budget``.

    ``streaming``: StreamingLLM, ``num_sinks`` first tokens plus the most recent ones.
    ``h2o``: heavy hitters by the attention the prompt's queries gave each key (per head), plus
    the recent half of the budget. ``recent``: the newest ``budget`` tokens only (no sinks).
    ``random``: a seeded uniform choice, the baseline that ignores structure.
    """
    check_choice(policy, "policy", POLICIES)
    budget = check_int(budget, "budget", min=1)
    S = data.cache_len
    if policy == "streaming":
        return streaming_keep(S, budget, num_sinks=min(num_sinks, budget))
    if policy == "recent":
        return streaming_keep(S, budget, num_sinks=0)
    if policy == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(S, generator=generator)[: min(budget, S)].sort().values
    return h2o_keep(data.prefill_weights, budget)


def eviction_curves(
    data: DecodingAttention, budgets: list[int], *, num_sinks: int = 4
) -> dict[str, list[float]]:
    """Relative output error of every policy at every budget on the decoding queries of ``data``."""
    return {
        policy: [
            eviction_error(*data.decode, policy_keep(policy, data, b, num_sinks=num_sinks)) for b in budgets
        ]
        for policy in POLICIES
    }


EVICTION_BUDGETS = [8, 16, 32, 64, 128, 256]


@cache
def _default_curves(num_sinks: int) -> dict[str, tuple[float, ...]]:
    """The explorer's error curves (they depend only on the number of sinks), computed once each."""
    curves = eviction_curves(_default_decoder(), EVICTION_BUDGETS, num_sinks=num_sinks)
    return {policy: tuple(errors) for policy, errors in curves.items()}


def eviction_explorer_view(
    policy: str = "streaming", budget: int = 32, num_sinks: int = 4, *, draw: bool = True
) -> dict:
    """Kept cache entries and output error of ``policy`` at ``budget`` on the synthetic decoder.

    Returns ``keep`` (indices, per head for H2O), ``kept`` (a ``(heads, cache_len)`` bool map),
    ``error`` (relative error of the new tokens' outputs vs the full cache), ``curves`` (every
    policy at the budgets :data:`EVICTION_BUDGETS`) and ``attention`` (the weight each cache entry
    receives from the new tokens, averaged over heads and tokens).
    """
    data = _default_decoder()
    check_choice(policy, "policy", POLICIES)
    budget = check_int(budget, "budget", min=1, max=data.cache_len)
    num_sinks = check_int(num_sinks, "num_sinks", min=0)
    keep = policy_keep(policy, data, budget, num_sinks=num_sinks)
    heads = data.q.shape[1]
    kept = torch.zeros(heads, data.cache_len, dtype=torch.bool)
    kept.scatter_(-1, keep.reshape(-1, keep.shape[-1]).expand(heads, -1), True)
    error = eviction_error(*data.decode, keep)
    curves = {policy: list(errors) for policy, errors in _default_curves(num_sinks).items()}
    _, weights = attention(*data.decode, return_weights=True)
    received = weights[0].mean(dim=(0, 1))
    view = {"keep": keep, "kept": kept, "error": error, "curves": curves, "attention": received}
    if draw:
        with plt.rc_context(STYLE):
            figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
            positions = torch.arange(data.cache_len)
            left.plot(positions, received, linewidth=1, color="grey", label="attention received")
            share = kept.float().mean(0)
            left.scatter(positions[share > 0], received[share > 0], s=10, label="kept (any head)")
            left.set_yscale("log")
            left.set_xlabel("cache position")
            left.set_ylabel("mean weight from new tokens")
            left.set_title(f"{policy}, budget {budget}: error {error:.3f}")
            left.legend(frameon=False)
            for name, errors in curves.items():
                right.plot(EVICTION_BUDGETS, errors, marker="o", label=name)
            right.scatter([budget], [error], s=80, facecolors="none", edgecolors="black", zorder=3)
            right.set_xscale("log", base=2)
            right.set_xlabel("budget (cache entries kept)")
            right.set_ylabel("relative output error")
            right.set_title(f"all policies, cache of {data.cache_len}")
            right.legend(frameon=False)
            figure.tight_layout()
            plt.show()
            plt.close(figure)
        view["figure"] = figure
    return view


def eviction_explorer() -> widgets.Widget:
    """Policy, budget and number of sinks -> kept tokens and the output error vs the full cache."""
    return widgets.interactive(
        eviction_explorer_view,
        policy=widgets.Dropdown(options=POLICIES, value="streaming", description="policy"),
        budget=widgets.SelectionSlider(
            options=[4, 8, 16, 32, 64, 128, 256, 512], value=32, description="budget"
        ),
        num_sinks=widgets.IntSlider(value=4, min=0, max=8, description="sinks"),
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
    """Measure the ``sparse`` benchmark suite from 256 up to ``max_T`` and plot time and memory.

    Uses :func:`course_lib.benchmarks.ch05.sparse_suite` (one sequence, 8 heads, D=64, causal
    window ``window``) through :func:`course_lib.bench.sweep`. ``methods`` picks a subset of the
    suite (default: all). Returns ``results`` (measurements), ``lengths`` and ``table``.
    """
    from ..benchmarks.ch05 import sparse_suite

    max_T = check_int(max_T, "max_T", min=TIMING_LENGTHS[1], max=TIMING_LENGTHS[-1])
    min_run_time = check_float(min_run_time, "min_run_time", min=0.0, min_open=True)
    suite, reference, _ = sparse_suite("cpu", window=window)
    chosen = list(suite) if methods is None else [check_choice(m, "methods", suite) for m in methods]
    lengths = [T for T in TIMING_LENGTHS if T <= max_T]
    results: list[Measurement] = sweep(
        {m: suite[m] for m in chosen}, lengths, min_run_time=min_run_time, progress=False
    )
    table = format_table(results, reference=reference if reference in chosen else None)
    view = {"results": results, "lengths": lengths, "table": table}
    if draw:
        with plt.rc_context(STYLE):
            figure, axes = plt.subplots(1, 2, figsize=(11, 4))

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
            plt.show()
            plt.close(figure)
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
    return box
