"""The plotting helpers draw what they are given and reject what they cannot draw."""

import pytest
import torch

from course_lib import viz
from course_lib.standard import causal_mask


def test_plot_attention_draws_the_weights_with_labels():
    weights = torch.softmax(torch.randn(1, 1, 3, 4), dim=-1)
    ax = viz.plot_attention(weights, ["a", "b", "c"], ["w", "x", "y", "z"], title="t", annotate=True)
    image = ax.get_images()[0].get_array()
    assert image.shape == (3, 4)
    torch.testing.assert_close(torch.tensor(image.data), weights[0, 0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["w", "x", "y", "z"]


def test_plot_mask_reports_density():
    ax = viz.plot_mask(causal_mask(4), title="causal")
    assert "62%" in ax.get_title()  # 10 of 16 cells


def test_plot_scaling_fits_the_slope_into_the_legend():
    lengths = [256, 512, 1024]
    ax = viz.plot_scaling(lengths, {"quadratic": [t**2 for t in lengths]}, ylabel="s")
    assert "slope 2.00" in ax.get_legend().get_texts()[0].get_text()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: viz.plot_attention(torch.zeros(2, 3, 3)), ValueError, "weights"),
        (lambda: viz.plot_attention(torch.zeros(2, 3), ["a"]), ValueError, "query_labels"),
        (lambda: viz.plot_mask(torch.zeros(2, 2)), TypeError, "mask"),
        (lambda: viz.plot_mask("mask"), TypeError, "mask"),
        (lambda: viz.plot_scaling([1, 2], {}, ylabel="y"), ValueError, "series"),
        (lambda: viz.plot_scaling([1, 2], {"a": [1]}, ylabel="y"), ValueError, "series"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
