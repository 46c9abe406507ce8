"""The studies: experiments moved out of widgets and benchmarks keep their numbers and old names."""

import math

import pytest
import torch

from course_lib import catalogue
from course_lib.studies import gates, phases, recall_grid

F64 = torch.float64


def explicit_gate_loop(x, delta):
    """Reference: chapter 07's recurrence written out token by token (the loop the widget used to
    hold), following the first write on its own."""
    k, v, g, beta = x["keys"], x["values"], x["log_gates"], x["beta"]
    T, D = k.shape
    state = torch.zeros(D, v.shape[1], dtype=F64)
    first = beta[0] * torch.outer(k[0], v[0])
    first_norm = first.norm()
    profile, state_norm = [], []
    for t in range(T):
        state = g[t, :, None].exp() * state
        if t > 0:
            first = g[t, :, None].exp() * first
        if delta:
            state = state + beta[t] * torch.outer(k[t], v[t] - state.T @ k[t])
            if t > 0:
                first = first - beta[t] * torch.outer(k[t], first.T @ k[t])
        else:
            state = state + beta[t] * torch.outer(k[t], v[t])
        profile.append((first.norm() / first_norm).item() if first_norm > 0 else 0.0)
        state_norm.append(state.norm().item())
    return torch.tensor(profile, dtype=F64), torch.tensor(state_norm, dtype=F64), state


@pytest.mark.parametrize("method", gates.GATE_METHODS)
@pytest.mark.parametrize(
    "decay,spread,beta,steps", [(0.95, 1.0, 0.5, 200), (0.5, 0.0, 0.0, 20), (0.9, 2.0, 1.0, 37)]
)
def test_gate_profile_through_the_runner_equals_the_explicit_loop_exactly(method, decay, spread, beta, steps):
    profile = gates.gate_profile(method, decay, spread, beta, steps)
    expected = explicit_gate_loop(profile["inputs"], catalogue.get(method).gates.write == "delta")
    for key, reference in zip(("profile", "state_norm", "final_state"), expected):
        assert torch.equal(profile[key], reference), key  # same operations in the same order: bit for bit
    below = (expected[0] < math.exp(-1)).nonzero()
    assert profile["horizon"] == (int(below[0]) if len(below) else None)


def test_the_gate_explorer_draws_the_studys_numbers():
    from course_lib.widgets import ch07 as w07

    view = w07.gate_explorer_view("gated_deltanet", 0.9, 0.5, 0.7, 50, draw=False)
    profile = gates.gate_profile("gated_deltanet", 0.9, 0.5, 0.7, 50)
    assert set(view) == set(profile)
    for key in ("profile", "per_dim", "state_norm", "final_state"):
        assert torch.equal(view[key], profile[key])


def test_gate_profile_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="method"):
        gates.gate_profile("transformer")
    with pytest.raises(ValueError, match="steps"):
        gates.gate_profile(steps=1)
    with pytest.raises(ValueError, match="decay"):
        gates.gate_profile(decay=1.5)


def test_old_names_answer_from_their_old_modules_for_one_release():
    from course_lib.benchmarks import ch07 as bench07
    from course_lib.benchmarks import ch08 as bench08
    from course_lib.widgets import ch07 as w07

    for name in ("METHODS", "recurrent_inputs", "run_method"):  # removed: the catalogue feeds each method
        assert not hasattr(bench07, name)
    for name in (
        "PHASES",
        "ALL_LENGTHS",
        "DECODE_LENGTHS",
        "FULL_SEQUENCE_MAX_T",
        "phase_of",
        "mechanism_of",
        "complexity",
        "train_step",
        "decode_step",
        "phase_methods",
        "relative_to",
        "relative_bars",
    ):
        assert getattr(bench08, name) is getattr(phases, name), name
    for name in ("RECALL_STEPS", "RECALL_LENGTHS", "RECALL_LR", "RECALL_BATCH", "recall_task"):
        assert getattr(bench08, name) is getattr(recall_grid, name), name
    assert w07.GATE_METHODS is gates.GATE_METHODS and w07.gate_inputs is gates.gate_inputs
    assert gates.GATE_METHODS == gates.gate_methods() == catalogue.names(has="gates")


def test_phase_comparison_draws_one_column_per_phase_present():
    from course_lib.measure import Measurement

    results = [
        Measurement(f"{phase}:{name}", T, 1e-3 * T / 256, 2**20 * T // 256)
        for phase in ("prefill", "decode")
        for name in ("attention", "linear_attention")
        for T in (256, 512)
    ]
    figure = phases.phase_comparison(results)
    assert len(figure.axes) == 4
    assert "prefill" in figure.axes[0].get_title() and "decode" in figure.axes[1].get_title()
    with pytest.raises(ValueError, match="results"):
        phases.phase_comparison([])


def test_recall_grid_point_trains_and_returns_what_the_grid_stores():
    model, batch, record = recall_grid.grid_point("gla", 16, steps=2, progress=False)
    assert batch.shape == (recall_grid.EVALUATION_BATCH, 16)
    assert model(batch).shape == (recall_grid.EVALUATION_BATCH, 16, recall_grid.recall_task(16).vocab_size)
    assert {"accuracy", "state_bytes", "parameters", "steps", "lr", "batch_size", "final_loss"} <= set(record)
    assert "model" not in record and "losses" not in record and "curve" not in record
    assert (
        record["steps"] == 2 and record["num_pairs"] == 1 and record["batch_size"] == recall_grid.RECALL_BATCH
    )
    with pytest.raises(ValueError, match="T"):
        recall_grid.recall_task(2)


def test_chapter_05_widget_and_suite_use_the_studies():
    from course_lib.benchmarks import ch05 as bench05
    from course_lib.studies import eviction, sparse_kernels
    from course_lib.widgets import ch05 as w05

    for name in (
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
    ):
        assert getattr(w05, name) is getattr(eviction, name), name
    methods, reference, _ = bench05.sparse_suite("cpu", window=8)
    assert reference == sparse_kernels.REFERENCE and list(methods) == list(
        sparse_kernels.sparse_methods(window=8)
    )
    for name, build in methods.items():
        torch.testing.assert_close(build(24)(), sparse_kernels.sparse_methods(window=8)[name](24)())


def test_what_an_explorer_and_its_figures_both_draw_lives_in_the_studies():
    # The widgets keep their names (they import them), the figures import the studies directly.
    from course_lib.studies import (
        linear_forms,
        paged_trace,
        roofline,
        score_memory,
        sparse_patterns,
        tile_walk,
    )
    from course_lib.widgets import ch01, ch02, ch03, ch04, ch05, ch06

    moved = {
        (ch01, score_memory): ("ACCELERATOR_MEMORY_GIB", "DTYPE_BYTES", "score_memory"),
        (ch02, roofline): ("DTYPES", "plot_roofline"),
        (ch03, tile_walk): ("tile_walk_inputs", "draw_schedule"),
        (ch04, paged_trace): ("PAGED_TRACE", "replay_paged_trace", "draw_paged_cache"),
        (ch05, sparse_patterns): ("PATTERNS", "pattern_mask"),
        (ch06, linear_forms): ("STEP_FORMS", "SCHEDULE_LABELS", "schedule_matrix", "draw_schedule"),
    }
    for (widget, study), names in moved.items():
        for name in names:
            assert getattr(widget, name) is getattr(study, name), (widget.__name__, name)
            assert name in study.__all__
