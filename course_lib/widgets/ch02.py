"""Chapter 02's explorers: a roofline explorer and a prefill/decode intensity calculator.

Both are built on :mod:`course_lib.hardware`: the accelerator table, the arithmetic intensity of
each operation and the roofline ``min(peak, intensity * bandwidth)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import ipywidgets as widgets
import matplotlib.pyplot as plt

from ..checks import check_choice, check_int
from ..hardware import (
    ACCELERATORS,
    Accelerator,
    attention_bytes,
    attention_flops,
    decode_intensity,
    prefill_intensity,
    roofline,
    time_bound,
)
from ..studies.roofline import DTYPES, _peak, plot_roofline  # the roofline plot is shared with figures/ch02
from ..viz import STYLE
from ._display import new_figure, show, widen_labels

__all__ = [
    "OPERATIONS",
    "DTYPES",
    "operation_cost",
    "plot_roofline",
    "roofline_explorer_view",
    "roofline_explorer",
    "intensity_calculator_view",
    "intensity_calculator",
]

OPERATIONS = ("attention prefill", "attention decode", "linear layer prefill", "linear layer decode")


def operation_cost(
    operation: str,
    *,
    batch: int = 1,
    seq_len: int = 4096,
    num_heads: int = 32,
    num_kv_heads: int = 32,
    head_dim: int = 128,
    dtype: str = "bfloat16",
) -> dict[str, float]:
    """FLOPs and fewest HBM bytes of one operation of one layer, and their ratio (the intensity).

    - ``"attention prefill"``: causal attention over a prompt of ``seq_len`` tokens.
    - ``"attention decode"``: one new token per sequence against a cache of ``seq_len`` tokens.
    - ``"linear layer prefill"`` / ``"linear layer decode"``: one ``d x d`` projection
      (``d = num_heads * head_dim``) applied to ``batch * seq_len`` tokens, or to ``batch``
      tokens (one per sequence), i.e. a GEMM whose weights are read once for the whole batch.
    """
    check_choice(operation, "operation", OPERATIONS)
    check_choice(dtype, "dtype", DTYPES)
    batch = check_int(batch, "batch", min=1)
    seq_len = check_int(seq_len, "seq_len", min=1)
    num_heads = check_int(num_heads, "num_heads", min=1)
    num_kv_heads = check_int(num_kv_heads, "num_kv_heads", min=1, max=num_heads)
    head_dim = check_int(head_dim, "head_dim", min=1)
    size = DTYPES[dtype]
    shape = {"batch_size": batch, "num_heads": num_heads}
    if operation == "attention prefill":
        flops = attention_flops(seq_len, seq_len, head_dim, causal=True, **shape)
        moved = attention_bytes(
            seq_len, seq_len, head_dim, num_kv_heads=num_kv_heads, bytes_per_element=size, **shape
        )
    elif operation == "attention decode":
        flops = attention_flops(1, seq_len, head_dim, **shape)
        moved = attention_bytes(
            1, seq_len, head_dim, num_kv_heads=num_kv_heads, bytes_per_element=size, **shape
        )
    else:
        width = num_heads * head_dim
        tokens = batch * seq_len if operation == "linear layer prefill" else batch
        flops = 2 * tokens * width * width
        moved = (tokens * width + width * width + tokens * width) * size
    return {"flops": float(flops), "bytes": float(moved), "intensity": flops / moved}


# --- (a) roofline explorer ------------------------------------------------------------------


def roofline_explorer_view(
    accelerator: str = "H100-SXM",
    operation: str = "attention decode",
    batch: int = 1,
    seq_len: int = 4096,
    num_heads: int = 32,
    num_kv_heads: int = 32,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    *,
    extra_accelerators: Mapping[str, Accelerator] | None = None,
    draw: bool = True,
) -> dict:
    """Place one operation on an accelerator's roofline: intensity, attainable FLOP/s, which roof
    binds and the lower bound on its run time. ``extra_accelerators`` adds devices (e.g. this
    machine, measured) to the ones in :data:`course_lib.hardware.ACCELERATORS`."""
    devices = {**ACCELERATORS, **(extra_accelerators or {})}
    check_choice(accelerator, "accelerator", devices)
    cost = operation_cost(
        operation,
        batch=batch,
        seq_len=seq_len,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    device = devices[accelerator]
    peak = _peak(device, dtype)
    seconds, bound = time_bound(cost["flops"], cost["bytes"], peak, device.memory_bandwidth)
    view = {
        **cost,
        "attainable": roofline(cost["intensity"], peak, device.memory_bandwidth),
        "ridge": peak / device.memory_bandwidth,
        "bound": bound,
        "seconds": seconds,
    }
    view["html"] = (
        f"<b>{operation}</b> on {accelerator}: {cost['flops']:.3g} FLOPs, {cost['bytes']:.3g} bytes, "
        f"intensity <b>{cost['intensity']:.3g}</b> FLOP/byte (ridge {view['ridge']:.0f}) → "
        f"<b>{bound}-bound</b>, at least {seconds * 1e6:.3g} µs, "
        f"{view['attainable'] / peak:.1%} of peak at best"
    )
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((7, 4.2))
            ax = figure.subplots()
            plot_roofline(
                {accelerator: device},
                [(operation, cost["intensity"])],
                dtype=dtype,
                ax=ax,
                title=f"{accelerator}: {bound}-bound",
            )
            show(figure)
        view["figure"] = figure
    return view


def _attention_shape_explorer(
    view_function: Callable[..., dict], num_kv_heads: int, **first_sliders: widgets.Widget
) -> widgets.VBox:
    """``first_sliders`` plus heads, KV heads (starting at ``num_kv_heads``), head dim and dtype ->
    ``view_function``'s HTML below them.

    KV heads cannot outnumber query heads: the KV-heads slider is clipped instead of raising.
    Returns a VBox whose ``interactive`` attribute is the ``ipywidgets.interactive`` (for tests).
    """
    out = widgets.HTML()

    def update(**controls) -> dict:
        controls["num_kv_heads"] = min(controls["num_kv_heads"], controls["num_heads"])
        view = view_function(**controls)
        out.value = view["html"]
        return view

    heads = widgets.SelectionSlider(options=[8, 16, 32, 64, 128], value=32, description="heads")
    kv_heads = widgets.SelectionSlider(
        options=[1, 2, 4, 8, 16, 32], value=num_kv_heads, description="KV heads"
    )
    controls = widgets.interactive(
        update,
        **first_sliders,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=widgets.SelectionSlider(options=[64, 128, 256], value=128, description="head dim"),
        dtype=widgets.Dropdown(options=list(DTYPES), value="bfloat16", description="dtype"),
        draw=widgets.fixed(True),
    )

    def keep_kv_heads_valid(_change=None) -> None:
        if kv_heads.value > heads.value:
            kv_heads.value = heads.value

    heads.observe(keep_kv_heads_valid, names="value")
    kv_heads.observe(keep_kv_heads_valid, names="value")
    box = widgets.VBox([controls, out])
    box.interactive = controls
    return widen_labels(box)


def roofline_explorer(extra_accelerators: Mapping[str, Accelerator] | None = None) -> widgets.Widget:
    """Accelerator, operation, batch, length and heads -> the point on the roofline and its bound."""
    devices = [*ACCELERATORS, *(extra_accelerators or {})]
    return _attention_shape_explorer(
        functools.partial(roofline_explorer_view, extra_accelerators=extra_accelerators),
        32,
        accelerator=widgets.Dropdown(options=devices, value="H100-SXM", description="device"),
        operation=widgets.Dropdown(options=OPERATIONS, value="attention decode", description="operation"),
        batch=widgets.SelectionSlider(options=[2**p for p in range(0, 9)], value=1, description="batch"),
        seq_len=widgets.SelectionSlider(
            options=[2**p for p in range(7, 18)], value=4096, description="length"
        ),
    )


# --- (b) prefill / decode intensity calculator -------------------------------------------------


_CELL = "padding: 1px 10px"


def _label_ridges(ax, ridges: Mapping[str, float], fontsize: float = 8) -> None:
    """Label each horizontal ridge line just right of ``ax`` (log y axis), clear of the data.
    Accelerators' ridges lie close together (114 to 295 FLOP/byte in 16 bits), so a label that
    would overlap the one below moves up just enough, with a leader to its line."""
    low, high = (math.log10(y) for y in ax.get_ylim())
    height = ax.get_position().height * ax.figure.get_figheight() * 72  # axes height in points
    gap = 1.3 * fontsize / height  # one line of text, in axes fractions
    placed = -1.0
    for name, ridge in sorted(ridges.items(), key=lambda item: item[1]):
        y = (math.log10(ridge) - low) / (high - low)
        placed = max(y, placed + gap)
        # a leader from the line's end to its label, in the margin where no text is
        ax.plot([1.0, 1.05], [y, placed], transform=ax.transAxes, clip_on=False, color="grey", linewidth=0.6)
        ax.text(
            1.06,
            placed,
            f"{name} ({ridge:.0f})",
            transform=ax.transAxes,
            fontsize=fontsize,
            color="dimgrey",
            va="center",
        )
    ax.text(1.06, placed + 1.5 * gap, "ridge points", transform=ax.transAxes, fontsize=fontsize, va="center")


def intensity_calculator_view(
    seq_len: int = 4096,
    batch: int = 1,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    *,
    draw: bool = True,
) -> dict:
    """Intensity of prefill and decode attention (and a decode-time linear layer) for one shape,
    compared with every accelerator's ridge point; draws intensity against the length."""
    check_choice(dtype, "dtype", DTYPES)
    seq_len = check_int(seq_len, "seq_len", min=1)
    num_kv_heads = check_int(num_kv_heads, "num_kv_heads", min=1, max=num_heads)
    size = DTYPES[dtype]
    shape = {
        "batch_size": batch,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "bytes_per_element": size,
    }
    intensities = {
        "attention prefill": prefill_intensity(seq_len, head_dim, **shape),
        "attention decode": decode_intensity(seq_len, head_dim, **shape),
        "linear layer decode": operation_cost(
            "linear layer decode", batch=batch, num_heads=num_heads, head_dim=head_dim, dtype=dtype
        )["intensity"],
    }
    bounds = {
        device_name: {
            name: "compute" if value >= _peak(device, dtype) / device.memory_bandwidth else "memory"
            for name, value in intensities.items()
        }
        for device_name, device in ACCELERATORS.items()
    }
    # Cells padded: without it the notebook's table styles run the headers together.
    th, td = f"<th style='{_CELL}'>", f"<td style='{_CELL}'>"
    header = "".join(f"{th}{name}</th>" for name in intensities)
    ridges = {name: _peak(device, dtype) / device.memory_bandwidth for name, device in ACCELERATORS.items()}
    rows = "".join(
        f"<tr>{td}{device}</td>"
        + "".join(f"{td}{bounds[device][name]}</td>" for name in intensities)
        + f"<td style='{_CELL}; text-align:right'>{ridges[device]:.0f}</td></tr>"
        for device in ACCELERATORS
    )
    values = "".join(f"{td}{value:.3g}</td>" for value in intensities.values())
    html = (
        f"<table><tr>{th}</th>{header}{th}ridge</th></tr><tr>{td}<b>FLOP/byte</b></td>{values}{td}</td></tr>"
        f"{rows}</table>"
    )
    view = {"intensity": intensities, "bound": bounds, "html": html}
    if draw:
        lengths = [2**p for p in range(6, 18)]
        with plt.rc_context(STYLE):
            figure = new_figure((7, 4))
            ax = figure.subplots()
            ax.plot(
                lengths,
                [prefill_intensity(T, head_dim, **shape) for T in lengths],
                marker="o",
                label="prefill",
            )
            ax.plot(
                lengths, [decode_intensity(T, head_dim, **shape) for T in lengths], marker="o", label="decode"
            )
            for ridge in ridges.values():
                ax.axhline(ridge, color="grey", linestyle="--", linewidth=0.8)
            ax.axvline(seq_len, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _label_ridges(ax, ridges)
            ax.set_xlabel("sequence length (prompt, or cached tokens)")
            ax.set_ylabel("FLOPs per byte")
            ax.set_title(f"attention intensity, {num_heads} query heads / {num_kv_heads} KV heads, {dtype}")
            ax.legend(frameon=False, loc="upper left")
            show(figure)
        view["figure"] = figure
    return view


def intensity_calculator() -> widgets.Widget:
    """Length, batch, heads, KV heads, head dim and dtype -> prefill and decode intensities and bounds."""
    return _attention_shape_explorer(
        intensity_calculator_view,
        8,  # start at grouped-query attention: 32 heads share 8 KV heads
        seq_len=widgets.SelectionSlider(
            options=[2**p for p in range(6, 18)], value=4096, description="length"
        ),
        batch=widgets.SelectionSlider(options=[2**p for p in range(0, 9)], value=1, description="batch"),
    )
