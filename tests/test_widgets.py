"""Widgets driven headlessly: every control moved across its range re-runs the view."""

import importlib
import io
import math
import threading

import IPython.display
import ipywidgets
import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from course_lib import widgets
from course_lib.widgets import ch01


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


def test_attention_explorer_view_matches_the_library():
    view = widgets.attention_explorer_view("a b a c", temperature=0.5, mask_kind="none", draw=False)
    assert view["tokens"] == ["a", "b", "a", "c"]
    torch.testing.assert_close(view["weights"].sum(-1), torch.ones(4))
    # Equal words have equal embeddings, so rows 0 and 2 attend identically without a mask.
    torch.testing.assert_close(view["weights"][0], view["weights"][2])


@pytest.mark.parametrize("mask_kind", widgets.EXPLORER_MASKS)
def test_attention_explorer_masks_are_respected(mask_kind):
    view = widgets.attention_explorer_view(
        "one two three four five six", mask_kind=mask_kind, window=2, num_padding=2, draw=False
    )
    assert (view["weights"][~view["mask"]] == 0).all()
    if mask_kind == "window":
        assert view["mask"].sum(-1).tolist() == [1, 2, 2, 2, 2, 2]
    if mask_kind == "padding":
        assert view["tokens"][-2:] == ["[pad]", "[pad]"]


def test_temperature_sharpens_and_flattens():
    sharp = widgets.attention_explorer_view(temperature=0.1, mask_kind="none", draw=False)["weights"]
    flat = widgets.attention_explorer_view(temperature=10.0, mask_kind="none", draw=False)["weights"]
    assert sharp.max(-1).values.mean() > flat.max(-1).values.mean()
    entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert entropy(flat) > entropy(sharp)


def test_attention_explorer_widget_reacts_to_every_control():
    w = widgets.attention_explorer()
    c = controls(w)
    assert set(c) >= {"sentence", "temperature", "mask", "window", "padding"}
    c["mask"].value = "none"
    for option in widgets.EXPLORER_MASKS:
        c["mask"].value = option
        assert (w.result["weights"][~w.result["mask"]] == 0).all()
    for value in (c["temperature"].min, 0.0, c["temperature"].max):
        c["temperature"].value = 10**value
        assert torch.isfinite(w.result["weights"]).all()
    c["mask"].value = "window"
    for value in range(c["window"].min, c["window"].max + 1):
        c["window"].value = value
        assert int(w.result["mask"].sum(-1).max()) == min(value, len(w.result["tokens"]))
    c["mask"].value = "padding"
    for value in range(c["padding"].min, c["padding"].max + 1):
        c["padding"].value = value
        assert w.result["tokens"].count("[pad]") == value
    c["mask"].value = "none"
    c["sentence"].value = "short one"
    assert w.result["tokens"] == ["short", "one"]


def test_score_memory_counts_what_it_says():
    sizes = widgets.score_memory(1024, 32, 80, 2, "float16")
    assert sizes["one_matrix"] == 1024 * 1024 * 2
    assert sizes["one_layer"] == 1024 * 1024 * 2 * 32 * 2
    assert sizes["all_layers"] == sizes["one_layer"] * 80


def test_memory_calculator_reacts_to_every_control():
    box = widgets.memory_calculator()
    w = box.interactive
    c = controls(w)
    for T in c["T"].options:
        c["T"].value = T
        assert w.result["bytes"]["one_matrix"] == T * T * 2
        assert box.children[1].value == w.result["html"]
    for name in ("heads", "layers", "batch"):
        for value in (c[name].min, c[name].max):
            c[name].value = value
            assert w.result["bytes"]["all_layers"] > 0
    for dtype in c["dtype"].options:
        c["dtype"].value = dtype
        assert w.result["bytes"]["one_matrix"] == c["T"].value ** 2 * widgets.DTYPE_BYTES[dtype]
    for device in c["device"].options:
        c["device"].value = device
        assert w.result["capacity"] == pytest.approx(widgets.ACCELERATOR_MEMORY_GIB[device] * 2**30)
    c["T"].value, c["dtype"].value, c["heads"].value = 1024, "float16", 1
    assert w.result["fits"]["one_matrix"]
    c["T"].value, c["heads"].value = 2**20, 128
    assert not w.result["fits"]["one_layer"]


def test_explorer_output_equals_library_attention():
    view = widgets.attention_explorer_view("x y z", mask_kind="causal", draw=False)
    assert view["output"].shape == (3, 16)
    # Row 0 of a causal mask sees only itself: its output is its own value vector.
    x = widgets.toy_embeddings(["x", "y", "z"])
    torch.testing.assert_close(view["output"][0], x[0])


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: widgets.attention_explorer_view(temperature=0, draw=False), ValueError, "temperature"),
        (lambda: widgets.attention_explorer_view(mask_kind="diagonal", draw=False), ValueError, "mask_kind"),
        (lambda: widgets.attention_explorer_view("", draw=False), ValueError, "sentence"),
        (lambda: widgets.attention_explorer_view(window=0, draw=False), ValueError, "window"),
        (lambda: widgets.score_memory(0, 1, 1, 1), ValueError, "seq_len"),
        (lambda: widgets.score_memory(8, 1, 1, 1, "int3"), ValueError, "dtype"),
        (lambda: widgets.memory_calculator_view(accelerator="TPU"), ValueError, "accelerator"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- chapter 01: the relative-bias explorer ---------------------------------------------------------


def t5_bucket_by_hand(distance: int, num_buckets: int, max_distance: int, bidirectional: bool) -> int:
    """T5's bucket of a key ``distance`` positions before the query (negative: after), from the paper's
    description: half the buckets exact, the rest log-spaced up to max_distance, the last one shared."""
    offset, n = 0, num_buckets
    if bidirectional:
        n //= 2
        offset = n if distance < 0 else 0
        distance = abs(distance)
    elif distance < 0:
        return 0
    exact = n // 2
    if distance < exact:
        return offset + distance
    far = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (n - exact))
    return offset + min(far, n - 1)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_relative_bias_view_t5_gives_every_pair_its_bucket(bidirectional):
    T, n, max_distance = 40, 8, 20
    view = ch01.relative_bias_view("T5 buckets", T, n, max_distance, bidirectional, draw=False)
    expected = torch.tensor(
        [[t5_bucket_by_hand(i - j, n, max_distance, bidirectional) for j in range(T)] for i in range(T)]
    )
    assert torch.equal(view["values"], expected)
    assert view["profile"].tolist() == [
        t5_bucket_by_hand(d, n, max_distance, bidirectional) for d in range(T)
    ]
    seen = {int(b) for i in range(T) for j in range(T) if bidirectional or j <= i for b in [expected[i, j]]}
    assert view["parameters"] == len(seen)


def test_relative_bias_view_alibi_and_shaw():
    view = ch01.relative_bias_view("ALiBi", T=9, head=2, num_heads=4, draw=False)
    slope = 2.0 ** (-8.0 * 3 / 4)
    expected = torch.tensor([[-slope * abs(i - j) for j in range(9)] for i in range(9)])
    torch.testing.assert_close(view["values"], expected)
    torch.testing.assert_close(view["profile"], -slope * torch.arange(9.0))
    assert view["parameters"] == 0
    view = ch01.relative_bias_view("Shaw", T=12, max_distance=3, draw=False)
    expected = torch.tensor([[max(-3, min(3, j - i)) + 3 for j in range(12)] for i in range(12)])
    assert torch.equal(view["values"], expected)
    assert view["profile"].tolist() == [3 - min(d, 3) for d in range(12)]
    assert view["parameters"] == 7  # all 2k + 1 rows: T is longer than the clipping distance


def test_relative_bias_view_raises_max_distance_past_the_exact_buckets_and_says_so():
    view = ch01.relative_bias_view("T5 buckets", T=40, num_buckets=32, max_distance=5, draw=False)
    assert "raised to 17" in view["html"]
    assert view["profile"][:16].tolist() == list(range(16))  # the 16 exact buckets


def test_relative_bias_explorer_reacts_to_every_control():
    box = ch01.relative_bias_explorer()
    w = box.interactive
    c = controls(w)
    assert set(c) >= {"scheme", "T", "buckets", "max distance", "bidirectional", "ALiBi head"}
    for scheme in c["scheme"].options:
        c["scheme"].value = scheme
        assert box.children[1].value == w.result["html"] and scheme in w.result["html"]
        for T in (c["T"].min, c["T"].max):
            c["T"].value = T
            assert w.result["values"].shape == (T, T)
    c["scheme"].value = "T5 buckets"
    for n in c["buckets"].options:
        c["buckets"].value = n
        assert int(w.result["values"].max()) < n
    for value in (c["max distance"].min, 40, c["max distance"].max):
        c["max distance"].value = value
        assert w.result["profile"][-1] == w.result["values"].max()
    c["bidirectional"].value = True
    values = w.result["values"]
    after = torch.ones_like(values, dtype=torch.bool).triu(1)
    assert bool((values[after] >= c["buckets"].value // 2).all())  # keys after the query: the other half
    c["scheme"].value = "ALiBi"
    for head in range(c["ALiBi head"].min, c["ALiBi head"].max + 1):
        c["ALiBi head"].value = head
        assert w.result["profile"][1] == pytest.approx(-(2.0 ** (-(head + 1))))


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: ch01.relative_bias_view("XPos", draw=False), ValueError, "scheme"),
        (lambda: ch01.relative_bias_view(T=1, draw=False), ValueError, "T"),
        (lambda: ch01.relative_bias_view("ALiBi", head=8, draw=False), ValueError, "head"),
        (lambda: ch01.relative_bias_view(num_buckets=1, draw=False), ValueError, "num_buckets"),
        (lambda: ch01.relative_bias_view(max_distance=0, draw=False), ValueError, "max_distance"),
    ],
)
def test_relative_bias_view_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- every explorer's picture belongs to its own callback ------------------------------------------
# JupyterLab 4.6 with ipykernel 7 runs widget callbacks in a kernel subshell (another thread) as
# well as in the main thread. pyplot's figures are global: plt.show() showed another callback's
# half-drawn figure and two threads drew one figure at once, which left chapter 04's paged-cache
# explorer blank in the browser. Explorers draw on figures pyplot does not track and display them.

FIGURE_EXPLORERS = [
    ("ch01", "attention_explorer"),
    ("ch02", "roofline_explorer"),
    ("ch02", "intensity_calculator"),
    ("ch03", "tile_walk"),
    ("ch03", "io_explorer"),
    ("ch04", "paged_explorer"),
    ("ch04", "sampling_explorer"),
    ("ch05", "mask_explorer"),
    ("ch06", "favor_explorer"),
    ("ch06", "three_forms_stepper"),
    ("ch07", "gate_explorer"),
    ("ch07", "recall_demo"),
    ("ch08", "comparison_explorer"),
]


def _blank(figure) -> bool:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    pixels = matplotlib.image.imread(buffer)[..., :3]
    return (pixels.min(-1) < 0.98).mean() < 0.001


@pytest.fixture
def displayed(monkeypatch):
    """Objects the explorers display, in order, with the thread that displayed each."""
    shown = []
    lock = threading.Lock()

    def display(obj, *args, **kwargs):
        with lock:
            shown.append((threading.get_ident(), obj))

    def pyplot_show(*args, **kwargs):
        raise AssertionError("plt.show() shows every open pyplot figure, other callbacks' too")

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(plt, "show", pyplot_show)
    return shown


@pytest.mark.parametrize("module,name", FIGURE_EXPLORERS, ids=lambda x: x)
def test_explorers_display_their_own_figure_not_through_pyplot(module, name, displayed):
    open_before = plt.get_fignums()
    getattr(importlib.import_module(f"course_lib.widgets.{module}"), name)()  # runs the view once
    figures = [obj for _, obj in displayed if isinstance(obj, Figure)]
    assert len(figures) == 1, f"{name} displayed {len(figures)} figures"
    assert plt.get_fignums() == open_before, "the figure is tracked by pyplot"
    assert not _blank(figures[0])
    # Legends as large as the axis labels, near enough: at 7-8 pt in a wide figure shown at the
    # notebook's width they were unreadable (chapter 07's recall plot).
    legends = [ax.get_legend() for ax in figures[0].axes if ax.get_legend()]
    sizes = [text.get_fontsize() for legend in legends for text in legend.get_texts()]
    assert all(size >= 9 for size in sizes), sizes


def test_paged_explorer_callbacks_in_two_threads_show_whole_figures(displayed):
    from course_lib.widgets import ch04

    def callbacks(step):
        for block_size in (2, 4, 8, 4):
            ch04.paged_explorer_view(step, block_size)

    threads = [threading.Thread(target=callbacks, args=(step,)) for step in (5, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    per_thread = {}
    for ident, figure in displayed:
        per_thread.setdefault(ident, []).append(figure)
    assert sorted(len(figures) for figures in per_thread.values()) == [4, 4]
    assert not any(_blank(figure) for _, figure in displayed)


ALL_EXPLORERS = FIGURE_EXPLORERS + [
    ("ch01", "memory_calculator"),
    ("ch04", "kv_calculator"),
    ("ch08", "decision_guide"),
]


def _descendants(widget):
    stack = [widget]
    while stack:
        item = stack.pop()
        yield item
        stack.extend(getattr(item, "children", ()))


@pytest.mark.parametrize("module,name", ALL_EXPLORERS, ids=lambda x: x)
def test_long_labels_get_room(module, name, displayed):
    # ipywidgets gives a description 80 px and cuts the rest ("temperat…", "block_q (0=…"): a label
    # of ten characters or more needs a wider description (the browser test measures the real width).
    widget = getattr(importlib.import_module(f"course_lib.widgets.{module}"), name)()
    for item in _descendants(widget):
        if isinstance(item, ipywidgets.Checkbox) or not getattr(item, "description", ""):
            continue
        if len(item.description) >= 10:
            assert item.style.description_width, f"{name}: {item.description!r} is cut at 80 px"
