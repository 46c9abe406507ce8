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


def test_decode_tradeoff_places_every_decoding_mechanism_by_its_state():
    from course_lib.measure import Measurement

    results = [
        Measurement(f"decode:{name}", T, seconds, 1, {"state_bytes": state} if state else {})
        for name, seconds, state in (("sdpa", 1e-3, 2**20), ("gla", 1e-4, None), ("mqa", 5e-4, 2**18))
        for T in (256, 1024)
    ]
    figure = phases.decode_tradeoff(results)
    (ax,) = figure.axes
    points = {t.get_text(): t.xy for t in ax.texts}
    # gla's state comes from the catalogue when the measurement does not store it
    assert points == {
        "sdpa": (2**20, 1.0),
        "gla": (phases.state_bytes("gla", 1024), 0.1),
        "mqa": (2**18, 0.5),
    }
    assert "T = 1024" in ax.get_title()
    assert "T = 256" in phases.decode_tradeoff(results, 256).axes[0].get_title()
    with pytest.raises(ValueError, match="decode"):
        phases.decode_tradeoff([Measurement("prefill:sdpa", 256, 1.0, 1)])
    with pytest.raises(ValueError, match="T=512"):
        phases.decode_tradeoff(results, 512)


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


# --- chapter 04b: the serving experiments ------------------------------------------------------------

from course_lib.kv_cache import kv_cache_bytes  # noqa: E402
from course_lib.studies import kv_sharing  # noqa: E402
from course_lib.studies import serving as serving_study  # noqa: E402


def test_compare_batching_serves_one_trace_both_ways_with_the_same_tokens():
    result = serving_study.compare_batching(1.0, block_size=8, cache_tokens=512, num_requests=8)
    trace = serving_study.mixed_trace(8, rate=1.0)
    assert result["same_outputs"]
    assert result["settings"]["num_blocks"] == 512 // 8
    for policy in ("static", "continuous"):
        metrics, line = result[policy], result["timeline"][policy]
        assert metrics["generated_tokens"] == sum(r["max_new_tokens"] for r in trace)
        assert metrics["tokens_per_step"] == metrics["generated_tokens"] / metrics["steps"]
        assert len(line["time"]) == metrics["steps"]
        assert all(
            stored <= reserved <= 512
            for stored, reserved in zip(line["stored_tokens"], line["reserved_slots"])
        )
    # Mixed output lengths: a static batch waits for its longest member, the continuous one does not.
    assert result["continuous"]["steps"] < result["static"]["steps"]
    assert result["continuous"]["mean_ttft"] < result["static"]["mean_ttft"]
    rows = serving_study.rate_sweep([1.0], block_size=8, cache_tokens=512, num_requests=8)
    assert [(r["rate"], r["policy"], r["steps"]) for r in rows] == [
        (1.0, "static", result["static"]["steps"]),
        (1.0, "continuous", result["continuous"]["steps"]),
    ]


def test_prefix_caching_saves_exactly_the_prompt_tokens_it_finds_cached():
    result = serving_study.prefix_caching_comparison(32, num_requests=8, system_prompts=2, block_size=8)
    off, on = result["off"], result["on"]
    assert result["same_outputs"]
    assert off["prefill_tokens_saved"] == 0 and off["prefix_hit_rate"] == 0
    saved = on["prefill_tokens_saved"]
    assert saved > 0 and saved % 8 == 0 and saved <= (8 - 1) * 32
    assert off["processed_tokens"] - on["processed_tokens"] == saved  # no token is fed twice without a cache
    assert on["prefix_hit_rate"] == saved / on["prompt_tokens"]


def test_speculative_sweep_is_exact_and_counts_its_rounds():
    rows = serving_study.speculative_sweep((0, 1, 3), num_prompts=2, new_tokens=6, draft="first layer")
    assert [r["k"] for r in rows] == [0, 1, 3]
    assert all(r["same_as_target"] for r in rows)
    assert (
        rows[0]["tokens_per_round"] == 1.0 and rows[0]["target_forwards"] == 6 and rows[0]["speedup"] == 1.0
    )
    for row in rows[1:]:
        assert 0 <= row["acceptance_rate"] <= 1 and 1 <= row["tokens_per_round"] <= row["k"] + 1
        assert row["target_forwards"] <= 6


def test_expected_tokens_per_round_equals_a_simulation_of_independent_acceptances():
    assert serving_study.expected_tokens_per_round(0.0, 5) == 1.0
    assert serving_study.expected_tokens_per_round(1.0, 5) == 6.0
    assert math.isclose(serving_study.expected_tokens_per_round(0.5, 2), 1 + 0.5 + 0.25)
    generator = torch.Generator().manual_seed(0)
    accepted = torch.rand(200_000, 4, generator=generator) < 0.7  # k = 4 drafts per round
    emitted = accepted.long().cumprod(-1).sum(-1) + 1  # the accepted run, plus the target's own token
    assert math.isclose(
        emitted.double().mean().item(), serving_study.expected_tokens_per_round(0.7, 4), rel_tol=5e-3
    )
    # a draft at a tenth of the target's cost, 70% acceptance, k = 4: 2.77 tokens for 1.4 steps
    assert math.isclose(serving_study.speculative_speedup(0.7, 4, draft_cost=0.1), 2.7731 / 1.4, rel_tol=1e-4)


def test_verification_is_memory_bound_until_the_tokens_reach_the_ridge_point():
    rows = {r["k"]: r for r in serving_study.verification_roofline((0, 4, 1024))}
    h100 = serving_study.ACCELERATORS["H100-SXM"]
    bytes_moved = 2 * 6.74e9 + kv_cache_bytes("Llama-2-7B", 4097)  # weights and the cache, read once
    assert math.isclose(rows[0]["seconds"], bytes_moved / h100.memory_bandwidth)
    assert rows[0]["bound"] == rows[4]["bound"] == "memory" and rows[1024]["bound"] == "compute"
    assert rows[4]["relative_time"] < 1.001 and rows[1024]["relative_time"] > 2
    assert 4.9 < rows[4]["intensity"] < 5  # GEMM with M = 5 rows: about 5 FLOPs per byte in fp16


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: serving_study.compare_batching(0.0), "rate"),
        (lambda: serving_study.compare_batching(1.0, block_size=16, cache_tokens=8), "cache_tokens"),
        (lambda: serving_study.speculative_sweep(draft="big"), "draft"),
        (lambda: serving_study.expected_tokens_per_round(1.5, 2), "acceptance"),
        (lambda: serving_study.speculative_speedup(0.5, 2, draft_cost=-1), "draft_cost"),
        (lambda: serving_study.verification_roofline(accelerator="TPU"), "accelerator"),
        (lambda: kv_sharing.variant_config("CLA-3"), "variant"),
    ],
)
def test_serving_studies_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()


def test_kv_sharing_variants_cache_what_they_say():
    models = {v: kv_sharing.variant_config(v) for v in kv_sharing.VARIANTS}
    assert models["CLA-2"].kv_share == 2 and models["GQA-2"].num_kv_heads == 2
    from course_lib.models import TinyTransformer

    numbers = {v: kv_sharing.cache_numbers_per_token(TinyTransformer(c)) for v, c in models.items()}
    per_layer = 2 * 4 * 12  # K and V, 4 heads of 12
    assert numbers == {"MHA": 4 * per_layer, "CLA-2": 2 * per_layer, "GQA-2": 4 * per_layer // 2,
                       "CLA-4": per_layer, "MQA": 4 * per_layer // 4}  # fmt: skip


def test_kv_sharing_summary_by_hand():
    rows = [
        dict(variant="MHA", held_out_loss=2.0, parameters=10, cache_numbers_per_token=8),
        dict(variant="MHA", held_out_loss=2.2, parameters=10, cache_numbers_per_token=8),
        dict(variant="CLA-2", held_out_loss=2.3, parameters=9, cache_numbers_per_token=4),
    ]
    summary = {s["variant"]: s for s in kv_sharing.summarise(rows)}
    assert math.isclose(summary["MHA"]["held_out_loss"], 2.1) and summary["MHA"]["runs"] == 2
    assert (summary["MHA"]["min"], summary["MHA"]["max"]) == (2.0, 2.2)
    assert math.isclose(summary["CLA-2"]["vs_mha"], 0.2)


def test_train_variant_trains_and_reports():
    model, row = kv_sharing.train_variant("CLA-2", seed=0, steps=3)
    assert row["steps"] == 3 and row["variant"] == "CLA-2" and math.isfinite(row["held_out_loss"])
    assert row["parameters"] == model.num_parameters() and not model.blocks[1].attention.owns_kv


def test_the_stored_kv_sharing_study_matches_the_code():
    stored = kv_sharing.load_kv_sharing()
    assert stored["model"] == kv_sharing.SHARING_MODEL and stored["variants"] == kv_sharing.VARIANTS
    assert {k: stored["training"][k] for k in kv_sharing.SHARING_TRAINING} == kv_sharing.SHARING_TRAINING
    runs = {(r["variant"], r["seed"]) for r in stored["rows"]}
    assert runs == {(v, s) for v in kv_sharing.VARIANTS for s in stored["training"]["seeds"]}
    from course_lib.models import TinyTransformer

    for row in stored["rows"]:
        model = TinyTransformer(kv_sharing.variant_config(row["variant"]))
        assert row["parameters"] == model.num_parameters()
        assert row["cache_numbers_per_token"] == kv_sharing.cache_numbers_per_token(model)
        assert 1.0 < row["held_out_loss"] < 3.0


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
