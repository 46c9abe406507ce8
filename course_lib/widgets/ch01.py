"""Chapter 01's explorers: attention weights of a sentence, and score-matrix memory."""

from __future__ import annotations

import zlib

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from ..bench import format_bytes
from ..checks import check_choice, check_float, check_int
from ..hardware import ACCELERATORS
from ..sparse import sliding_window_mask
from ..standard import attention, causal_mask
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

# The hardware chapter's accelerator table (with sources), by memory size for "does it fit".
ACCELERATOR_MEMORY_GIB = {
    f"{name} ({accelerator.memory_bytes / 1e9:.0f} GB)": accelerator.memory_bytes / 2**30
    for name, accelerator in ACCELERATORS.items()
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}


def score_memory(seq_len: int, heads: int, layers: int, batch: int, dtype: str = "float16") -> dict[str, int]:
    """Bytes of the ``(T, T)`` score/weight matrices that standard attention materialises.

    ``one_matrix``: one head, one sequence. ``one_layer``: all heads of one layer for the whole
    batch, what inference holds at a time. ``all_layers``: what training keeps for the backward
    pass when every layer's weights are stored.
    """
    seq_len = check_int(seq_len, "seq_len", min=1)
    heads = check_int(heads, "heads", min=1)
    layers = check_int(layers, "layers", min=1)
    batch = check_int(batch, "batch", min=1)
    check_choice(dtype, "dtype", DTYPE_BYTES)
    one_matrix = seq_len * seq_len * DTYPE_BYTES[dtype]
    return {
        "one_matrix": one_matrix,
        "one_layer": one_matrix * heads * batch,
        "all_layers": one_matrix * heads * batch * layers,
    }


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
    return box
