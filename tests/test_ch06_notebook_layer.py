"""Chapter 06's notebook layer: widgets (headless), the figure and the bench suites."""

import math

import ipywidgets
import pytest
import torch
import torch.nn.functional as F

from course_lib import bench
from course_lib.benchmarks import ch06 as bench06
from course_lib.figures import FIGURES
from course_lib.widgets import ch06 as w06


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- FAVOR+ explorer ----------------------------------------------------------------------------


def test_favor_view_compares_with_exact_softmax_attention():
    view = w06.favor_explorer_view(num_features=64, draw=False)
    q, k, v = w06.favor_inputs(0.5)
    torch.testing.assert_close(view["exact_output"], F.scaled_dot_product_attention(q, k, v)[0, 0])
    torch.testing.assert_close(view["exact_kernel"], torch.exp(q[0, 0] @ k[0, 0].T / 4))
    torch.testing.assert_close(view["weights"].sum(-1), torch.ones(64, dtype=torch.float64))
    assert (view["estimated_kernel"] > 0).all()  # positive random features never cancel
    torch.testing.assert_close(view["output"], view["weights"] @ v[0, 0])


def test_favor_error_falls_with_more_features():
    def mean_mse(m):
        return sum(w06.favor_explorer_view(m, seed=s, draw=False)["output_mse"] for s in range(4)) / 4

    assert mean_mse(8) > 4 * mean_mse(1024)
    features = [4, 16, 64, 256]
    for orthogonal in (False, True):
        errors = [w06.favor_kernel_mse(m, orthogonal=orthogonal, num_seeds=20) for m in features]
        assert all(a > b for a, b in zip(errors, errors[1:]))
        assert -1.3 < bench.loglog_slope(features, errors) < -0.7  # a Monte Carlo estimate: error ~ 1/m


def test_favor_error_grows_with_the_size_of_queries_and_keys():
    small = w06.favor_explorer_view(256, input_scale=0.3, draw=False)
    large = w06.favor_explorer_view(256, input_scale=1.5, draw=False)
    assert large["kernel_relative_error"] > small["kernel_relative_error"]


def test_favor_explorer_reacts_to_every_control():
    w = w06.favor_explorer()
    c = controls(w)
    assert set(c) >= {"features m", "orthogonal", "|q|, |k| scale", "seed"}
    options = c["features m"].options
    for m in (*options[::3], options[-1]):
        c["features m"].value = m
        assert w.result["estimated_kernel"].shape == (64, 64)
        assert math.isfinite(w.result["output_mse"])
    previous = w.result["output_mse"]
    c["orthogonal"].value = False
    assert w.result["output_mse"] != previous
    c["orthogonal"].value = True
    spreads = []
    for scale in (c["|q|, |k| scale"].min, c["|q|, |k| scale"].max):
        c["|q|, |k| scale"].value = scale
        spreads.append(float(w.result["exact_kernel"].log().std()))
        assert math.isfinite(w.result["output_max_error"])
    assert spreads[1] > spreads[0]  # larger queries and keys: a wider spread of exp(q.k / sqrt D)
    seen = set()
    for seed in range(c["seed"].min, c["seed"].max + 1, 5):
        c["seed"].value = seed
        seen.add(round(w.result["output_mse"], 12))
    assert len(seen) > 1  # each seed draws different features


# --- three forms stepper ------------------------------------------------------------------------


def naive_causal_elu_attention(q, k, v):
    """Independent reference: the loop over queries, straight from the formula."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    T = q.shape[-2]
    rows = []
    for i in range(T):
        weights = phi_q[..., i : i + 1, :] @ phi_k[..., : i + 1, :].transpose(-1, -2)  # (..., 1, i + 1)
        rows.append((weights @ v[..., : i + 1, :]) / weights.sum(-1, keepdim=True))
    return torch.cat(rows, dim=-2)


@pytest.mark.parametrize("form", w06.STEP_FORMS)
def test_stepper_outputs_equal_the_formula(form):
    T = 10
    view = w06.three_forms_view(form, tokens=5, T=T, chunk_size=3, draw=False)
    q, k, v = w06._stepper_inputs(T)
    expected = naive_causal_elu_attention(q, k, v)[0, 0]
    done = view["tokens_done"]
    assert done == (5 if form == "recurrent" else 6)  # the chunk form finishes whole chunks
    torch.testing.assert_close(
        view["outputs"], expected[:done], atol=1e-5, rtol=1e-5
    )  # eps = 1e-6 in the library
    torch.testing.assert_close(view["parallel_output"], expected, atol=1e-5, rtol=1e-5)
    phi_k = F.elu(k[0, 0, :done]) + 1
    torch.testing.assert_close(view["state"], phi_k.T @ v[0, 0, :done])
    torch.testing.assert_close(view["normaliser"], phi_k.sum(0))


@pytest.mark.parametrize("T,chunk_size", [(12, 4), (10, 3), (5, 8), (7, 1)])
def test_schedule_matrix_counts(T, chunk_size):
    visible = T * (T + 1) // 2
    recurrent = w06.schedule_matrix("recurrent", T, chunk_size, T)
    assert int((recurrent == 2).sum()) == visible and int((recurrent == 0).sum()) == T * (T - 1) // 2
    chunk = w06.schedule_matrix("chunk", T, chunk_size, T)
    sizes = [min(chunk_size, T - start) for start in range(0, T, chunk_size)]
    assert int((chunk == 3).sum()) == sum(c * (c + 1) // 2 for c in sizes)
    assert int((chunk == 2).sum()) == visible - sum(c * (c + 1) // 2 for c in sizes)
    parallel = w06.schedule_matrix("parallel", T, chunk_size, T)
    assert int((parallel == 3).sum()) == visible
    half = w06.schedule_matrix("recurrent", T, chunk_size, T // 2)
    assert int((half == 1).sum()) == visible - (T // 2) * (T // 2 + 1) // 2


def test_three_forms_stepper_reacts_to_every_control():
    w = w06.three_forms_stepper()
    c = controls(w)
    assert set(c) >= {"form", "tokens", "T", "chunk size"}
    for form in c["form"].options:
        c["form"].value = form
        for tokens in list(range(c["tokens"].min, c["tokens"].max + 1, 11)) + [c["tokens"].max]:
            c["tokens"].value = tokens
            assert w.result["tokens_done"] >= min(tokens, c["T"].value)
            assert w.result["max_difference"] < 1e-12
    c["form"].value = "chunk"
    c["tokens"].value = 1
    for chunk_size in range(c["chunk size"].min, c["chunk size"].max + 1, 3):
        c["chunk size"].value = chunk_size
        assert w.result["tokens_done"] == min(chunk_size, c["T"].value)
    for T in (c["T"].min, 7, c["T"].max):
        c["T"].value = T
        assert w.result["schedule"].shape == (T, T)
        assert w.result["parallel_output"].shape == (T, 4)


# --- figure and benchmark -----------------------------------------------------------------------


def test_three_forms_figure_is_registered(tmp_path):
    assert "06_three_forms" in FIGURES
    figure = FIGURES["06_three_forms"]()
    assert len(figure.axes) >= 3


def test_suites_are_registered_and_build_callables():
    found = bench.suites()
    for name in ("linear", "linear_recurrent"):
        methods, reference, lengths = found[name]("cpu")
        assert reference == "sdpa" and "chunk" in methods
        out = methods["chunk"](32)()
        assert out.shape == (1, 8, 32, 64)
    assert found["linear"]("cpu")[2][0] == 512 and found["linear"]("cpu")[2][-1] == 16384
    _, _, short = found["linear_recurrent"]("cpu")
    assert max(short) <= bench06.RECURRENT_MAX_T


def test_linear_sweep_caps_the_recurrent_form_and_the_table_says_so():
    results = bench06.linear_sweep([16, 32], recurrent_max_t=16, min_run_time=0.01)
    points = {(r.method, r.T) for r in results}
    assert points == {("sdpa", 16), ("chunk", 16), ("recurrent", 16), ("sdpa", 32), ("chunk", 32)}
    table = bench.format_table(results, reference="sdpa")
    row_32 = next(line for line in table.splitlines() if line.strip().startswith("32"))
    assert row_32.split()[-1] == "-"


def test_crossover_reads_the_first_length_from_which_on_the_method_wins():
    M = bench.Measurement
    results = [M("sdpa", T, t, None) for T, t in [(1, 1.0), (2, 2.0), (4, 4.0), (8, 8.0)]]
    results += [M("chunk", T, t, None) for T, t in [(1, 3.0), (2, 1.0), (4, 5.0), (8, 6.0)]]
    assert bench06.crossover(results) == 8
    assert bench06.crossover(results[:4] + [M("chunk", 1, 9.0, None)]) is None


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: w06.favor_explorer_view(num_features=0, draw=False), ValueError, "num_features"),
        (lambda: w06.favor_explorer_view(input_scale=0.0, draw=False), ValueError, "input_scale"),
        (lambda: w06.favor_kernel_mse(8, radius=-1.0), ValueError, "radius"),
        (lambda: w06.three_forms_view("parallel", draw=False), ValueError, "form"),
        (lambda: w06.three_forms_view(chunk_size=0, draw=False), ValueError, "chunk_size"),
        (lambda: w06.schedule_matrix("chunk", 4, 2, 5), ValueError, "tokens_done"),
        (lambda: bench06.linear_sweep([8], recurrent_max_t=-1), ValueError, "recurrent_max_t"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
