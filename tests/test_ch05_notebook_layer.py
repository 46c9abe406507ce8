"""Chapter 05's notebook layer: widgets driven headlessly, exercise checkers, figure, bench suite."""

import math

import ipywidgets
import pytest
import torch

from course_lib.bench import suites
from course_lib.benchmarks.ch05 import sparse_suite
from course_lib.exercises import ExerciseFailed
from course_lib.exercises.ch05 import (
    check_block_layout_to_mask,
    check_dilated_mask,
    check_streaming_keep,
    check_window_layers,
)
from course_lib.figures import FIGURES
from course_lib.standard import attention
from course_lib.widgets import ch05


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


# --- (a) mask explorer --------------------------------------------------------------------------


def brute_force_mask(pattern, T, window, dilation, stride, causal):
    """Independent definitions of the position-only patterns, pair by pair."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            d = i - j
            if pattern == "window":
                ok = 0 <= d < window if causal else abs(d) < window
            elif pattern == "dilated":
                ok = d % dilation == 0 and abs(d) <= (window - 1) * dilation and (d >= 0 or not causal)
            elif pattern == "strided":
                ok = (abs(d) < stride or d % stride == 0) and (d >= 0 or not causal)
            else:  # fixed: same block, or j is the last position of its block
                ok = (i // stride == j // stride or j % stride == stride - 1) and (d >= 0 or not causal)
            allowed[i, j] = ok
    return allowed


@pytest.mark.parametrize("pattern", ["window", "dilated", "strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
def test_position_patterns_match_their_definition(pattern, causal):
    mask = ch05.pattern_mask(pattern, 13, window=3, dilation=2, stride=4, causal=causal)
    assert torch.equal(mask, brute_force_mask(pattern, 13, 3, 2, 4, causal))


def test_global_local_and_block_patterns():
    mask = ch05.pattern_mask("global+local", 12, window=2, num_globals=2, causal=False)
    assert mask[:2].all() and mask[:, :2].all()
    assert not mask[5, 9] and mask[5, 6]
    block = ch05.pattern_mask("block", 12, block_size=4, random_blocks=0, causal=False)
    assert torch.equal(block, torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3))
    causal_block = ch05.pattern_mask("block", 12, block_size=4, random_blocks=2, causal=True)
    assert not causal_block.triu(1).any()
    bigbird = ch05.pattern_mask("bigbird", 32, block_size=4, num_globals=1, random_blocks=1, seed=3)
    assert torch.equal(
        bigbird, ch05.pattern_mask("bigbird", 32, block_size=4, num_globals=1, random_blocks=1, seed=3)
    )


def test_pattern_cost_counts_pairs():
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    cost = ch05.pattern_cost(mask, heads=2, head_dim=8, bytes_per_score=4)
    assert cost["density"] == pytest.approx(55 / 100)
    assert cost["dense_flops"] == 2 * (8 + 8) * 100 * 2
    assert cost["sparse_flops"] == 2 * (8 + 8) * 55 * 2
    assert cost["dense_score_bytes"] == 100 * 2 * 4
    assert cost["sparse_score_bytes"] == 55 * 2 * 4
    assert cost["mask_bytes"] == 100


def test_reach_curve_of_a_causal_window():
    # Causal window 3 over 7 tokens: each layer reaches 2 positions further back; 3 layers connect all.
    curve = ch05.reach_curve(ch05.pattern_mask("window", 7, window=3))
    pairs = 7 * 8 / 2
    covered = [sum(min(i, 2 * layers) + 1 for i in range(7)) for layers in (1, 2, 3)]
    assert curve == pytest.approx([c / pairs for c in covered])
    assert curve[-1] == 1.0


def test_mask_explorer_reacts_to_every_control():
    box = ch05.mask_explorer()
    w = box.interactive
    c = controls(w)
    assert set(c) >= {
        "pattern",
        "window",
        "dilation",
        "stride",
        "globals",
        "random blocks",
        "block size",
        "causal",
        "T shown",
        "T costed",
    }
    c["T costed"].value = c["T costed"].options[0]
    c["T shown"].value = 32
    for pattern in c["pattern"].options:
        c["pattern"].value = pattern
        assert w.result["mask"].shape == (32, 32)
        assert box.children[1].value == w.result["html"]
        assert w.result["stats"].density == pytest.approx(float(w.result["mask"].float().mean()))
    for T in c["T shown"].options:
        c["T shown"].value = T
        assert w.result["mask"].shape == (T, T)
    for T in c["T costed"].options:
        c["T costed"].value = T
        assert w.result["cost"]["T"] == T
        assert w.result["cost"]["dense_flops"] == 2 * 128 * T * T * 8
    c["T costed"].value = 256
    c["T shown"].value = 32
    c["pattern"].value = "window"
    for value in (c["window"].min, 8, c["window"].max):
        c["window"].value = value
        assert int(w.result["mask"].sum(-1).max()) == min(2 * value - 1, 32)
    c["causal"].value = True
    assert not w.result["mask"].triu(1).any()
    c["causal"].value = False
    c["pattern"].value = "dilated"
    for value in range(c["dilation"].min, c["dilation"].max + 1):
        c["dilation"].value = value
        row = w.result["mask"][16].nonzero().flatten() - 16
        assert (row % value == 0).all()
    c["pattern"].value = "strided"
    for value in (c["stride"].min, 5, c["stride"].max):
        c["stride"].value = value
        assert w.result["mask"].any(-1).all()
    c["pattern"].value = "global+local"
    for value in range(c["globals"].min, c["globals"].max + 1):
        c["globals"].value = value
        assert int(w.result["mask"].all(-1).sum()) >= value
    c["pattern"].value = "block"
    for value in (c["block size"].min, 4, c["block size"].max):
        c["block size"].value = value
        assert w.result["mask"].diagonal().all()
    c["block size"].value = 4  # 8 blocks of 4: the diagonal tiles plus `blocks` random tiles per block row
    for blocks in range(c["random blocks"].min, c["random blocks"].max + 1):
        c["random blocks"].value = blocks
        assert int(w.result["mask"].sum()) == 8 * 16 * (1 + blocks)
    c["random blocks"].value, c["block size"].value = 0, 8
    assert w.result["stats"].layers_to_connect is None  # disjoint blocks never connect


# --- (b) eviction explorer ------------------------------------------------------------------------


def test_synthetic_decoder_has_sinks_heavy_hitters_and_recency():
    data = ch05.synthetic_decoding_attention(cache_len=256, new_tokens=16, seed=1)
    assert data.q.shape == (1, 4, 272, 64) and data.cache_len == 256
    _, weights = attention(*data.decode, return_weights=True)
    per_key = weights.mean(dim=(0, 1, 2))
    uniform = 1 / 256
    assert per_key[data.sinks].min() > 5 * uniform
    assert per_key[data.heavy].mean() > 5 * uniform and per_key[data.heavy].min() > uniform
    assert per_key[-8:].mean() > per_key[64:128].mean()  # recency
    again = ch05.synthetic_decoding_attention(cache_len=256, new_tokens=16, seed=1)
    assert torch.equal(data.q, again.q) and torch.equal(data.heavy, again.heavy)


def test_eviction_policies_keep_the_budget_and_structure_helps():
    data = ch05.synthetic_decoding_attention()
    for policy in ch05.POLICIES:
        keep = ch05.policy_keep(policy, data, 32)
        assert keep.shape[-1] == 32
        assert (keep.diff(dim=-1) > 0).all()
    assert ch05.policy_keep("streaming", data, 32)[:4].tolist() == [0, 1, 2, 3]
    assert ch05.policy_keep("recent", data, 32).tolist() == list(range(480, 512))
    curves = ch05.eviction_curves(data, [32, 128])
    for policy in ("streaming", "h2o"):
        assert curves[policy][1] < curves["random"][1]
    assert curves["h2o"][0] < curves["recent"][0]


def test_eviction_explorer_reacts_to_every_control():
    w = ch05.eviction_explorer()
    c = controls(w)
    assert set(c) >= {"policy", "budget", "sinks"}
    for policy in c["policy"].options:
        c["policy"].value = policy
        assert (w.result["kept"].sum(-1) == c["budget"].value).all()
        assert math.isfinite(w.result["error"])
    c["policy"].value = "h2o"
    for budget in c["budget"].options:
        c["budget"].value = budget
        assert (w.result["kept"].sum(-1) == budget).all()
        assert math.isfinite(w.result["error"])
    c["budget"].value = 512
    assert w.result["error"] < 1e-5  # the whole cache kept
    c["policy"].value, c["budget"].value = "streaming", 32
    for sinks in range(c["sinks"].min, c["sinks"].max + 1):
        c["sinks"].value = sinks
        assert w.result["keep"][:sinks].tolist() == list(range(sinks))


# --- (c) measured timing --------------------------------------------------------------------------


def test_sparse_timing_view_and_widget(monkeypatch):
    view = ch05.sparse_timing_view(512, window=64, min_run_time=0.001, draw=False)
    assert view["lengths"] == [256, 512]
    assert {r.method for r in view["results"]} == {
        "dense_masked",
        "sliding_window",
        "block_band",
        "sdpa_masked",
    }
    assert "sdpa_masked" in view["table"]
    calls = []

    def fake_view(max_T, **kwargs):
        calls.append(max_T)
        return {"table": f"max_T={max_T}", "results": [], "lengths": []}

    monkeypatch.setattr(ch05, "sparse_timing_view", fake_view)
    box = ch05.sparse_timing()
    for value in box.max_T.options:
        box.max_T.value = value
        box.button.click()
        assert box.result["table"] == f"max_T={value}"
    assert calls == list(box.max_T.options)


def test_sparse_suite_methods_agree():
    methods, reference, lengths = sparse_suite("cpu", window=16)
    assert reference == "sdpa_masked" and lengths[-1] == 16384  # the acceptance length
    outputs = {name: build(40)() for name, build in methods.items()}
    torch.testing.assert_close(outputs["dense_masked"], outputs["sliding_window"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["dense_masked"], outputs["sdpa_masked"], atol=1e-5, rtol=1e-4)
    assert outputs["block_band"].shape == outputs["dense_masked"].shape
    assert "sparse" in suites()


# --- exercises and figure -------------------------------------------------------------------------


def test_checkers_pass_correct_solutions(capsys):
    def dilated(T, window, dilation):
        rows = []
        for i in range(T):
            seen = {i - m * dilation for m in range(window)}
            rows.append([j in seen for j in range(T)])
        return torch.tensor(rows, dtype=torch.bool).reshape(T, T)

    def expand(layout, b, T):
        return torch.tensor([[bool(layout[i // b, j // b]) for j in range(T)] for i in range(T)])

    def streaming(n, budget, sinks):
        if budget >= n:
            return torch.arange(n)
        return torch.tensor(list(range(sinks)) + list(range(n - budget + sinks, n)))

    check_dilated_mask(dilated)
    check_block_layout_to_mask(expand)
    check_streaming_keep(streaming)
    check_window_layers(lambda T, w: -(-(T - 1) // (w - 1)))
    printed = capsys.readouterr().out
    for name in (
        "check_dilated_mask",
        "check_block_layout_to_mask",
        "check_streaming_keep",
        "check_window_layers",
    ):
        assert f"{name}: all" in printed


@pytest.mark.parametrize(
    "check,wrong,message",
    [
        (check_dilated_mask, lambda T, w, r: torch.ones(T, T, dtype=torch.bool).tril(), "entries differ"),
        (check_dilated_mask, lambda T, w, r: torch.ones(T, T).tril(), "bool"),
        (
            check_block_layout_to_mask,
            lambda layout, b, T: layout.repeat_interleave(b, 0).repeat_interleave(b, 1),  # not cropped
            "shape",
        ),
        (
            check_streaming_keep,
            lambda n, b, s: torch.arange(n - b, n) if b < n else torch.arange(n),
            "differ",
        ),
        (check_streaming_keep, lambda n, b, s: torch.arange(min(b, n)).float(), "integers"),
        (check_window_layers, lambda T, w: (T - 1) // (w - 1), "expected"),
        (check_window_layers, lambda T, w: float(T), "int"),
    ],
)
def test_checkers_explain_wrong_answers(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)


@pytest.mark.parametrize(
    "check", [check_dilated_mask, check_block_layout_to_mask, check_streaming_keep, check_window_layers]
)
def test_checkers_fail_on_the_student_stub(check):
    def stub(*args):
        raise NotImplementedError("Your solution here")

    with pytest.raises(ExerciseFailed, match="not implemented"):
        check(stub)


def test_gallery_figure_is_registered():
    assert "05_sparse_gallery" in FIGURES
    figure = FIGURES["05_sparse_gallery"]()
    assert len(figure.axes) == 6


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: ch05.pattern_mask("diagonal", 8), ValueError, "pattern"),
        (lambda: ch05.pattern_mask("window", 8, window=0), ValueError, "window"),
        (lambda: ch05.mask_explorer_view(T_view=1, draw=False), ValueError, "T_view"),
        (lambda: ch05.pattern_cost(torch.ones(3, 3)), TypeError, "mask"),
        (
            lambda: ch05.policy_keep("lru", ch05.synthetic_decoding_attention(cache_len=16), 4),
            ValueError,
            "policy",
        ),
        (lambda: ch05.eviction_explorer_view(budget=0, draw=False), ValueError, "budget"),
        (lambda: ch05.synthetic_decoding_attention(cache_len=1), ValueError, "cache_len"),
        (lambda: ch05.sparse_timing_view(100, draw=False), ValueError, "max_T"),
        (lambda: ch05.sparse_timing_view(512, methods=("nope",), draw=False), ValueError, "methods"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
