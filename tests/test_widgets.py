"""Widgets driven headlessly: every control moved across its range re-runs the view."""

import ipywidgets
import pytest
import torch

from course_lib import widgets


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
