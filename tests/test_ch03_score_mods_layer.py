"""Notebook layer of chapter 03's sections on score modifications and SageAttention2: the explorer
driven headlessly, the cost table counted by hand, the Sage comparison against its definition."""

import ipywidgets
import pytest
import torch

from course_lib.relative_positions import t5_bias
from course_lib.standard import alibi_bias
from course_lib.studies import score_mods
from course_lib.studies.score_mods import t5_example_table
from course_lib.tiling import attention_error, outlier_qkv, sage2_attention
from course_lib.widgets import ch03


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_the_change_assembled_tile_by_tile_is_the_dense_bias(causal):
    T = 13  # not a multiple of the block
    alibi = ch03.score_mod_view("ALiBi", 2, T, 4, causal, draw=False)
    expected = alibi_bias(score_mods.MOD_HEADS, T)[2].double()
    t5 = ch03.score_mod_view("T5 buckets", 1, T, 4, causal, draw=False)
    table = t5_example_table()
    expected_t5 = t5_bias(table, T, bidirectional=not causal, max_distance=score_mods.T5_MAX_DISTANCE)[1]
    visible = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    for view, want in ((alibi, expected), (t5, expected_t5)):
        assert view["positions_only"] is True
        torch.testing.assert_close(view["change"][visible], want[visible])
        assert torch.isnan(view["change"][~visible]).all()
        assert view["output_error"] < 1e-12


def test_the_soft_cap_is_a_function_of_the_score_not_of_the_positions():
    view = ch03.score_mod_view("soft cap", 0, 12, 4, False, 4, draw=False)
    assert view["positions_only"] is False and view["output_error"] < 1e-12
    scores = view["tile_scores"]
    cap = score_mods.SOFT_CAP
    torch.testing.assert_close(view["tile_change"], cap * torch.tanh(scores / cap) - scores)
    assert (view["tile_change"].abs() < scores.abs()).all() or (scores == 0).any()


def test_tile_index_past_the_end_shows_the_last_tile_and_skipped_tiles_are_nan():
    view = ch03.score_mod_view("ALiBi", 0, 8, 4, True, 10**6, draw=False)
    assert view["tile_index"] == view["num_tiles"] - 1 == 3
    above = ch03.score_mod_view("ALiBi", 0, 8, 4, True, 1, draw=False)  # tile (0, 1): above the diagonal
    assert above["tile"].visibility == "none" and torch.isnan(above["tile_change"]).all()


def test_score_mod_explorer_reacts_to_every_control():
    w = ch03.score_mod_explorer()
    c = controls(w)
    assert set(c) >= {"mod", "head", "T = S", "block", "causal", "tile"}
    for kind in c["mod"].options:
        c["mod"].value = kind
        assert w.result["kind"] == kind
        assert w.result["positions_only"] is (kind != "soft cap")
        assert w.result["output_error"] < 1e-12
    for head in range(c["head"].max + 1):
        c["head"].value = head
    c["mod"].value = "ALiBi"
    for block in c["block"].options:
        c["block"].value = block
        assert c["tile"].max == w.result["num_tiles"] - 1
        c["tile"].value = c["tile"].max
        assert w.result["tile"].q_rows[1] == c["T = S"].value
    for T in (c["T = S"].min, 21, c["T = S"].max):
        c["T = S"].value = T
        assert w.result["change"].shape == (T, T)
    c["causal"].value = False
    assert not torch.isnan(w.result["change"]).any()
    assert w.result["figure"] is not None


def test_score_mod_costs_by_hand():
    costs = ch03.score_mod_costs(1000, 800, head_dim=16, block_q=100, num_buckets=8, shaw_max_distance=2)
    rows = {row["name"]: row for row in costs}
    assert rows["none"]["extra_elements"] == 0 and rows["soft cap"]["extra_elements"] == 0
    assert rows["T5 buckets"]["extra_elements"] == 10 * 8  # 10 Q blocks read a column of 8 buckets
    assert rows["dense T x S bias"]["extra_elements"] == 1000 * 800
    assert rows["Shaw, key term"]["extra_elements"] == 2 * 1000 * 5 + 5 * 16
    assert rows["Shaw, value term"]["extra_elements"] == 10 * 5 * 16
    assert [r["score_mod"] for r in rows.values()] == [True, True, True, True, False, False, False]


def test_sage_comparison_rows_are_the_library_calls_and_each_sage2_step_helps():
    errors = ch03.sage_comparison(128, num_heads=2)
    assert list(errors) == list(ch03.SAGE_VARIANTS)
    q, k, v = outlier_qkv(1, 2, 128, 128, 64, seed=0)
    exact = torch.softmax((q.double() @ k.double().transpose(-2, -1)) / 8, -1) @ v.double()
    assert errors[ch03.SAGE_VARIANTS[5]] == attention_error(sage2_attention(q, k, v), exact)
    relative = [errors[name].relative_l1 for name in ch03.SAGE_VARIANTS]
    assert relative[0] < 1e-5  # FlashAttention in float32 is exact to rounding
    assert relative[4] < relative[3] / 3  # smoothing Q rescues INT4 on outlier channels
    assert relative[2] > relative[1]  # INT4 with SageAttention's recipe alone is far worse than INT8


def test_two_level_accumulation_beats_one_fp22_accumulator_at_every_length():
    errors = ch03.accumulation_errors((256, 1024), queries=8)
    for two_level, single in zip(errors["two_level"], errors["fp22"], strict=True):
        assert two_level < single


def test_draw_sage_comparison_draws_one_bar_per_variant():
    errors = ch03.sage_comparison(64, num_heads=1)
    ax = ch03.draw_sage_comparison(errors)
    assert len(ax.patches) == len(errors)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: ch03.score_mod_view(kind="bias", draw=False), ValueError, "kind"),
        (lambda: ch03.score_mod_view(head=9, draw=False), ValueError, "head"),
        (lambda: ch03.score_mod_view(block=0, draw=False), ValueError, "block"),
        (lambda: ch03.score_mod_view(tile=-1, draw=False), ValueError, "tile"),
        (lambda: ch03.score_mod_costs(0), ValueError, "T"),
        (lambda: ch03.score_mod_costs(8, shaw_max_distance=-1), ValueError, "shaw_max_distance"),
        (lambda: ch03.sage_comparison(0), ValueError, "T"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- the flash benchmark suite: FLOP counts, the table and the report -------------------------------


def test_phase_flops_by_hand():
    from course_lib.benchmarks.ch03 import phase_flops

    # B = 1, H = 8, D = 64: 2 D FLOPs per matmul and pair.
    assert phase_flops("forward", 4) == 2 * 64 * 2 * 16 * 8
    assert phase_flops("causal", 4) == 2 * 64 * 2 * 10 * 8  # 4 + 3 + 2 + 1 visible pairs
    assert phase_flops("train", 4) == 2 * 64 * 7 * 10 * 8  # 2 matmuls forward, 5 backward
    assert phase_flops("decode", 4) == 2 * 64 * 2 * 4 * 8  # one query, 4 cached keys
    with pytest.raises(ValueError, match="phase"):
        phase_flops("prefill", 4)


def _measurement(phase, method, T, seconds, peak=None):
    from course_lib.benchmarks.ch03 import phase_flops
    from course_lib.measure import Measurement

    flops = 2 * 2048**3 if phase == "matmul" else phase_flops(phase, T)
    return Measurement(
        f"{phase}/{method}", T, seconds, peak, {"phase": phase, "method": method, "flops": flops}
    )


def test_flash_table_and_report_read_the_ratios_and_targets():
    from course_lib.benchmarks.ch03 import flash_report, flash_table

    results = [
        _measurement("matmul", "matmul", 512, 2 * 2048**3 / 100e9),  # 100 GFLOP/s
        _measurement("forward", "flash", 4096, 1.4),
        _measurement("forward", "sdpa", 4096, 1.0),
        _measurement("train", "flash", 2048, 3.0),
        _measurement("train", "sdpa", 2048, 2.0),
        _measurement("causal", "flash", 8192, 5.0, peak=2**25),
        _measurement("causal", "dense", 8192, 9.0, peak=2**31),
    ]
    table = flash_table(results)
    flash_rate = 4 * 64 * 4096**2 * 8 / 1.4 / 1e9
    assert f"{flash_rate:.1f}" in table and f"{flash_rate / 100:.0%}" in table
    assert "1.40x" in table and "1.50x" in table and "0.56x" in table
    assert "matmul 2048^3 float32 in the same run: 100.0 GFLOP/s" in table
    report = flash_report(results)
    assert "forward  T=4096   1.40x  (target <= 1.5x: met)" in report
    assert "train    T=2048   1.50x  (target <= 1.4x: NOT met)" in report
    assert "decode   T=16384  not measured" in report
    assert "0.0156 of dense's" in report and "met)" in report.splitlines()[-1]


def test_tuning_is_an_opt_in_that_returns_one_of_the_candidates():
    from course_lib.benchmarks.ch03 import tune_blocks

    assert tune_blocks(T=64, candidates=((16, 16), (32, 64)), min_run_time=0.01) in {(16, 16), (32, 64)}
