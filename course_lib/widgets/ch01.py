"""Chapter 01's explorers: attention weights of a sentence, score-matrix memory, relative biases."""

from __future__ import annotations

import zlib

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from ..checks import check_choice, check_float, check_int
from ..measure import format_bytes
from ..relative_positions import relative_distance_index, t5_buckets
from ..sparse import sliding_window_mask
from ..standard import alibi_bias, alibi_slopes, attention, causal_mask
from ..studies.score_memory import ACCELERATOR_MEMORY_GIB, DTYPE_BYTES, score_memory
from ..viz import STYLE, plot_attention, plot_mask
from ._display import new_figure, show, widen_labels

__all__ = [
    "EXPLORER_MASKS",
    "toy_embeddings",
    "attention_explorer_view",
    "attention_explorer",
    "ACCELERATOR_MEMORY_GIB",
    "DTYPE_BYTES",
    "score_memory",
    "memory_calculator_view",
    "memory_calculator",
    "RELATIVE_SCHEMES",
    "relative_bias_view",
    "relative_bias_explorer",
]

# --- (a) attention explorer -----------------------------------------------------------------

EXPLORER_MASKS = ("none", "causal", "padding", "window")


def toy_embeddings(tokens: list[str], dim: int = 16) -> torch.Tensor:
    """A fixed random vector per word (seeded by the word itself), so equal words match.

    Not a trained embedding: it only gives the explorer repeatable, word-dependent inputs.
    """
    rows = []
    for token in tokens:
        generator = torch.Generator().manual_seed(zlib.crc32(token.lower().encode()))
        rows.append(torch.randn(dim, generator=generator))
    return torch.stack(rows)


def attention_explorer_view(
    sentence: str = "the cat sat on the mat because it was tired",
    temperature: float = 1.0,
    mask_kind: str = "causal",
    window: int = 3,
    num_padding: int = 2,
    *,
    draw: bool = True,
) -> dict:
    """Self-attention of one head over the words of ``sentence``.

    ``temperature`` divides the scores (it multiplies the default ``1/sqrt(D)`` scale by
    ``1/temperature``): small values sharpen the weights towards one key, large ones flatten
    them. ``mask_kind`` is one of ``"none"``, ``"causal"``, ``"padding"`` (the last
    ``num_padding`` tokens are padding) or ``"window"`` (causal, ``window`` keys including the
    query itself). Returns ``tokens``, ``mask`` (T, T), ``weights`` (T, T) and ``output`` (T, D).
    """
    temperature = check_float(temperature, "temperature", min=0.0, min_open=True)
    check_choice(mask_kind, "mask_kind", EXPLORER_MASKS)
    window = check_int(window, "window", min=1)
    num_padding = check_int(num_padding, "num_padding", min=0)
    tokens = sentence.split()
    if not tokens:
        raise ValueError("sentence must contain at least one word")
    T, dim = len(tokens), 16
    if mask_kind == "padding":
        num_padding = min(num_padding, T - 1)
        tokens = tokens[: T - num_padding] + ["[pad]"] * num_padding
    x = toy_embeddings(tokens, dim)
    generator = torch.Generator().manual_seed(0)
    # Query and key projections near the identity, so a word attends mostly to words like itself.
    w_q = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=generator)
    w_k = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=generator)
    q, k, v = (x @ w_q)[None, None], (x @ w_k)[None, None], x[None, None]

    positions = torch.arange(T)
    if mask_kind == "none":
        mask = torch.ones(T, T, dtype=torch.bool)
    elif mask_kind == "causal":
        mask = causal_mask(T)
    elif mask_kind == "padding":
        mask = (positions < T - num_padding).expand(T, T).clone()
    else:
        mask = sliding_window_mask(T, window)
    output, weights = attention(q, k, v, mask, scale=dim**-0.5 / temperature, return_weights=True)
    view = {"tokens": tokens, "mask": mask, "weights": weights[0, 0], "output": output[0, 0]}
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((10, 4.2))
            left, right = figure.subplots(1, 2)
            plot_mask(mask, ax=left, title=f"mask: {mask_kind}", query_labels=tokens, key_labels=tokens)
            plot_attention(
                view["weights"], tokens, tokens, ax=right, title=f"weights, temperature {temperature:g}"
            )
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def attention_explorer() -> widgets.Widget:
    """Sentence, temperature and mask -> the mask and the attention weights of one head."""
    explorer = widgets.interactive(
        attention_explorer_view,
        sentence=widgets.Text(
            value="the cat sat on the mat because it was tired",
            description="sentence",
            continuous_update=False,
        ),
        temperature=widgets.FloatLogSlider(
            value=1.0, base=10, min=-1, max=1, step=0.1, description="temperature"
        ),
        mask_kind=widgets.Dropdown(options=EXPLORER_MASKS, value="causal", description="mask"),
        window=widgets.IntSlider(value=3, min=1, max=10, description="window"),
        num_padding=widgets.IntSlider(value=2, min=0, max=5, description="padding"),
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)


# --- (b) memory calculator ------------------------------------------------------------------


def memory_calculator_view(
    seq_len: int = 8192,
    heads: int = 32,
    layers: int = 32,
    batch: int = 1,
    dtype: str = "float16",
    accelerator: str = "A100-80GB-SXM (80 GB)",
) -> dict:
    """Score-matrix memory for the given model shape and whether it fits ``accelerator``."""
    check_choice(accelerator, "accelerator", ACCELERATOR_MEMORY_GIB)
    sizes = score_memory(seq_len, heads, layers, batch, dtype)
    capacity = ACCELERATOR_MEMORY_GIB[accelerator] * 2**30
    fits = {name: size <= capacity for name, size in sizes.items()}
    labels = {
        "one_matrix": "one head, one sequence",
        "one_layer": "one layer (inference)",
        "all_layers": "all layers (training)",
    }
    rows = "".join(
        f"<tr><td>{labels[name]}</td><td style='text-align:right'>{format_bytes(size)}</td>"
        f"<td>{'fits' if fits[name] else 'does not fit'}</td></tr>"
        for name, size in sizes.items()
    )
    html = (
        f"<b>T x T scores in {dtype}, vs {accelerator}</b><table><tr><th>what</th><th>bytes</th>"
        f"<th>in {format_bytes(capacity)}</th></tr>{rows}</table>"
    )
    return {"bytes": sizes, "fits": fits, "capacity": capacity, "html": html}


def memory_calculator() -> widgets.Widget:
    """Sliders for T, heads, layers, batch, dtype and accelerator -> bytes of the score matrices."""
    out = widgets.HTML()

    def update(**controls) -> dict:
        view = memory_calculator_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        seq_len=widgets.SelectionSlider(options=[2**p for p in range(10, 21)], value=8192, description="T"),
        heads=widgets.IntSlider(value=32, min=1, max=128, description="heads"),
        layers=widgets.IntSlider(value=32, min=1, max=128, description="layers"),
        batch=widgets.IntSlider(value=1, min=1, max=64, description="batch"),
        dtype=widgets.Dropdown(options=list(DTYPE_BYTES), value="float16", description="dtype"),
        accelerator=widgets.Dropdown(
            options=list(ACCELERATOR_MEMORY_GIB), value="A100-80GB-SXM (80 GB)", description="device"
        ),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls  # for tests and for readers who want the result
    return widen_labels(box)


# --- (c) relative positions: which pairs share a parameter ---------------------------------------

RELATIVE_SCHEMES = ("ALiBi", "T5 buckets", "Shaw")


def relative_bias_view(
    scheme: str = "T5 buckets",
    T: int = 48,
    num_buckets: int = 16,
    max_distance: int = 24,
    bidirectional: bool = False,
    head: int = 0,
    num_heads: int = 8,
    *,
    draw: bool = True,
) -> dict:
    """What a relative scheme assigns to each (query, key) pair of a ``T x T`` attention.

    ``"ALiBi"``: the fixed bias ``-slope_head * |i - j|`` of head ``head`` of ``num_heads``.
    ``"T5 buckets"``: the bucket of each pair (:func:`course_lib.relative_positions.t5_buckets`,
    ``num_buckets``, ``max_distance`` (raised past the exact buckets if needed, and the html says
    so), ``bidirectional``); pairs in one bucket share one learned scalar per head. ``"Shaw"``:
    the row of Shaw's tables, ``clip(j - i, -k, k) + k`` with ``k = max_distance``; pairs with
    one row share one learned vector. Returns ``values`` (T, T),
    ``distances`` (0 .. T-1, keys before the query), ``profile`` (the value at each distance),
    ``parameters`` (distinct learned entries used per head: buckets or rows; 0 for ALiBi) and
    ``html``.
    """
    check_choice(scheme, "scheme", RELATIVE_SCHEMES)
    T = check_int(T, "T", min=2)
    num_heads = check_int(num_heads, "num_heads", min=1)
    head = check_int(head, "head", min=0, max=num_heads - 1)
    distances = torch.arange(T)
    if scheme == "ALiBi":
        values = alibi_bias(num_heads, T)[head]
        profile = -alibi_slopes(num_heads)[head] * distances
        parameters = 0
        what = (
            f"bias of head {head}, slope {float(alibi_slopes(num_heads)[head]):.4g}: fixed, nothing learned"
        )
    elif scheme == "T5 buckets":
        relative = torch.arange(T)[None, :] - torch.arange(T)[:, None]
        num_buckets = check_int(num_buckets, "num_buckets", min=4 if bidirectional else 2)
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        raised = max(check_int(max_distance, "max_distance", min=1), exact + 1)
        note = (
            ""
            if raised == max_distance
            else f" (max distance raised to {raised}, past the {exact} exact buckets)"
        )
        max_distance = raised
        options = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        values = t5_buckets(relative, **options)
        profile = t5_buckets(-distances, **options)
        parameters = int(
            values[relative <= 0].unique().numel() if not bidirectional else values.unique().numel()
        )
        what = (
            f"bucket of each pair: {parameters} of {num_buckets} buckets used at T={T}, "
            f"distances from {max_distance} on share the last one{note}"
        )
    else:
        values = relative_distance_index(T, max_distance=max_distance)
        profile = relative_distance_index(1, T, max_distance=max_distance)[0].flip(0)  # key T-1-d for d
        parameters = int(values.unique().numel())
        rows = 2 * max_distance + 1
        what = f"row of Shaw's tables: {parameters} of {rows} rows used, clipped at {max_distance}"
    view = {
        "values": values,
        "distances": distances,
        "profile": profile,
        "parameters": parameters,
        "html": f"<b>{scheme}</b>, T={T}: {what}.",
    }
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((10, 4))
            left, right = figure.subplots(1, 2)
            image = left.imshow(values.float().numpy(), cmap="viridis")
            figure.colorbar(image, ax=left, fraction=0.046, pad=0.04)
            left.set_xlabel("key j")
            left.set_ylabel("query i")
            left.set_title(f"{scheme}: value per pair")
            right.plot(distances.numpy(), profile.float().numpy(), marker=".")
            right.set_xlabel("distance i - j (key before the query)")
            right.set_ylabel(
                "bias" if scheme == "ALiBi" else ("bucket" if scheme == "T5 buckets" else "table row")
            )
            right.set_title("the same, against distance")
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def relative_bias_explorer() -> widgets.Widget:
    """Scheme, T, buckets and clipping -> the value each pair gets, and which pairs share a parameter."""
    out = widgets.HTML()

    def update(**controls) -> dict:
        view = relative_bias_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        scheme=widgets.Dropdown(options=RELATIVE_SCHEMES, value="T5 buckets", description="scheme"),
        T=widgets.IntSlider(value=48, min=8, max=128, step=8, description="T"),
        num_buckets=widgets.SelectionSlider(options=[4, 8, 16, 32], value=16, description="buckets"),
        max_distance=widgets.IntSlider(value=24, min=1, max=128, description="max distance"),
        bidirectional=widgets.Checkbox(value=False, description="bidirectional"),
        head=widgets.IntSlider(value=0, min=0, max=7, description="ALiBi head"),
        num_heads=widgets.fixed(8),
        draw=widgets.fixed(True),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls  # for tests and for readers who want the result
    return widen_labels(box)
