"""Chapter 08's notebook layer: widgets (headless), figures, bench suites (exercises: test_exercises.py)."""

import json
import math

import ipywidgets
import matplotlib
import pytest
import torch

from course_lib import catalogue
from course_lib.bench import Measurement, sweep
from course_lib.bench import main as bench_main
from course_lib.benchmarks import ch08 as bench08
from course_lib.figures import FIGURES
from course_lib.figures import ch08 as figures08
from course_lib.recall import RECALL_MIXERS, state_bytes
from course_lib.standard import attention
from course_lib.studies import phases, recall_study
from course_lib.widgets import ch08 as w08

matplotlib.use("Agg")

FAKE = [
    Measurement(m, T, s * T / 256, b * T)
    for m, s, b in (("attention", 1e-3, 4000), ("sdpa", 5e-4, 100), ("linear_attention", 2e-3, 50))
    for T in (256, 512, 1024)
]
F64 = torch.float64
IDS = lambda m: m.name  # noqa: E731


def output(result):
    return result[0] if isinstance(result, tuple) else result


def dense_softmax_reference(mechanism, x):
    """Exact causal softmax attention with an explicit (windowed) mask: the independent reference of
    the exact mechanisms and of the sliding window; None for every other mechanism."""
    if mechanism.family not in ("exact", "hardware-efficient") and mechanism.cache_window is None:
        return None
    T = x["q"].shape[2]
    window = T if mechanism.cache_window is None else mechanism.cache_window
    mask = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-window)
    return attention(x["q"], x["k"], x["v"], mask)


def independent_forward(mechanism, x, **options):
    """The forward pass by another route than the one the phases time: dense masked softmax
    attention, or the token-by-token recurrent form (the chunk form is what the phases run); for
    the other mechanisms their own full pass (the decode and train steps still take another path)."""
    dense = dense_softmax_reference(mechanism, x)
    if dense is not None:
        return dense
    if "recurrent" in mechanism.forms:
        return mechanism.run(x, form="recurrent", **options)
    return mechanism.run(x, **options)


def controls(widget):
    return {c.description: c for c in widget.children if isinstance(c, ipywidgets.ValueWidget)}


def test_comparison_view_reads_the_measurements():
    view = w08.comparison_view(
        ("attention", "linear_attention"), (256, 512), "time", results=FAKE, draw=False
    )
    assert view["lengths"] == [256, 512] and view["phase"] == "prefill"  # no phase in the name: prefill
    assert view["series"]["attention"] == pytest.approx([1.0, 2.0])
    memory = w08.comparison_view(("sdpa",), (256, 1024), "memory", results=FAKE, draw=False)
    assert memory["series"]["sdpa"] == [25600, 51200, 102400]
    with pytest.raises(ValueError, match="mechanisms"):
        w08.comparison_view(("flash_attention",), (256, 512), results=FAKE, draw=False)
    with pytest.raises(ValueError, match="lengths"):
        w08.comparison_view(("sdpa",), (600, 700), results=FAKE, draw=False)
    with pytest.raises(ValueError, match="metric"):
        w08.comparison_view(("sdpa",), (256, 512), "speed", results=FAKE, draw=False)
    with pytest.raises(ValueError, match="phase"):
        w08.comparison_view(("sdpa",), (256, 512), "time", "decode", results=FAKE, draw=False)


def test_comparison_view_separates_the_phases_and_shows_the_model():
    phased = [
        Measurement(f"{phase}:{m}", T, s * T, 8 * T, bench08.complexity(m, phase, T))
        for phase, s in (("train", 3e-6), ("decode", 1e-8))
        for m in ("sdpa", "gla")
        for T in (256, 1024)
    ]
    decode = w08.comparison_view(("sdpa", "gla"), (256, 1024), "time", "decode", results=phased, draw=False)
    assert decode["series"]["gla"] == pytest.approx([256e-5, 1024e-5])
    flops = w08.comparison_view(("sdpa", "gla"), (256, 1024), "flops", "decode", results=phased, draw=False)
    assert flops["series"]["sdpa"] == [4 * 4 * 256 * 64, 4 * 4 * 1024 * 64]  # 4 H T D: grows with the cache
    assert flops["series"]["gla"] == [4 * 4 * 64 * 64] * 2  # 4 H D^2: constant
    train = w08.comparison_view(("sdpa",), (256, 1024), "bytes", "train", results=phased, draw=False)
    assert train["series"]["sdpa"][0] == 3 * bench08.complexity("sdpa", "prefill", 256)["bytes"]


def test_comparison_explorer_updates_across_its_controls():
    w = w08.comparison_explorer(FAKE)
    c = controls(w)
    for names in (("attention",), ("sdpa", "linear_attention"), ("attention", "sdpa", "linear_attention")):
        c["mechanisms"].value = names
        assert list(w.result["series"]) == list(names)
    for index in ((0, 0), (0, 2), (1, 2)):
        c["T range"].index = index
        assert w.result["lengths"] == [256, 512, 1024][index[0] : index[1] + 1]
    for metric in ("time", "memory"):
        c["metric"].value = metric
        assert w.result["metric"] == metric
    assert c["phase"].options == ("prefill",)


def test_explorer_switches_phase_on_the_stored_results():
    w = w08.comparison_explorer()
    c = controls(w)
    assert set(c["phase"].options) == set(bench08.PHASES)
    c["mechanisms"].value = ("sdpa", "gla")
    for phase in bench08.PHASES:
        c["phase"].value = phase
        assert w.result["phase"] == phase and len(w.result["lengths"]) >= 2
    for metric in w08.METRICS:
        c["metric"].value = metric
        assert all(v is not None and v > 0 for v in w.result["series"]["gla"]) or metric == "memory"


def test_explorer_T_range_stays_within_the_phase_measurements():
    results = w08.load_results()
    w = w08.comparison_explorer(results)
    c = controls(w)
    for phase in ("decode", "prefill", "train", "decode"):
        c["phase"].value = phase
        measured = sorted({r.T for r in results if bench08.phase_of(r) == phase})
        assert list(c["T range"].options) == measured  # prefill stops at its largest T, decode goes on
        assert c["T range"].value == (measured[0], measured[-1])
        assert w.result["phase"] == phase and w.result["lengths"] == measured
    assert max(c["T range"].options) > 2048  # decode: the stored data reach further than prefill


def test_decision_guide_lines_fit_the_output_area(capsys):
    from course_lib.widgets._display import TEXT_WIDTH

    for seq_len in (512, 4096, 2**17, 2**20):
        for memory_gib in (0.0625, 8.0, 128.0):
            for exact in (True, False):
                for decode_heavy in (True, False):
                    w08.decision_guide_view(seq_len, memory_gib, exact, decode_heavy)
    printed = capsys.readouterr().out.splitlines()
    assert printed and max(len(line) for line in printed) <= TEXT_WIDTH


def test_complexity_figure_legends_are_readable():
    # Six panels 15 inches wide are shown shrunk to the notebook's width: 7 pt legends were unreadable.
    figure = FIGURES["08_complexity"]()
    legends = [ax.get_legend() for ax in figure.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        assert all(text.get_fontsize() >= 9 for text in [*legend.get_texts(), legend.get_title()])


def test_stored_results_hold_every_runnable_mechanism_in_every_phase_that_applies():
    results = w08.load_results()
    measured = {(bench08.phase_of(r), bench08.mechanism_of(r)) for r in results}
    expected = {
        (p, m.name)
        for p in bench08.PHASES
        for m in phases.mechanisms()
        if phases.not_applicable(m, p) is None
    }
    assert measured == expected
    # the command's mechanism list (python -m course_lib.bench all) equals the stored one
    methods, _, lengths = bench08.all_suite("cpu")
    assert {r.method for r in results} == set(methods)
    # every mechanism of the catalogue is there, or the table says why not (n/a in a phase, not run)
    everything = {m.name for m in catalogue.mechanisms()}
    assert everything == {m for _, m in measured} | set(phases.not_run())
    for phase in bench08.PHASES:
        lengths_of = {name: {r.T for r in results if r.method == f"{phase}:{name}"} for _, name in measured}
        for m in phases.mechanisms():
            if phases.not_applicable(m, phase) is not None:
                continue
            limit = phases.max_length(m, phase)
            want = phases.DECODE_LENGTHS if phase == "decode" else phases.ALL_LENGTHS
            assert lengths_of[m.name] == {T for T in want if limit is None or T <= limit}, (phase, m.name)
    assert max(r.T for r in results if bench08.phase_of(r) == "decode") > bench08.FULL_SEQUENCE_MAX_T
    for r in results:
        name = bench08.mechanism_of(r)
        assert r.seconds > 0 and r.extra["phase"] == bench08.phase_of(r) and r.extra["mechanism"] == name
        assert r.extra.get("flops", 1) > 0 and ("flops" in r.extra) == catalogue.get(name).has("cost")
        assert r.extra.get("state_bytes") == phases.state_bytes(name, r.T)  # the catalogue's, in float32


def test_decision_guide_follows_the_cache_arithmetic():
    per_token = w08.kv_cache_bytes_per_token(32)
    assert per_token == 2 * 32 * 32 * 128 * 2  # 0.5 MiB per token for a Llama-2-7B shape in fp16
    small = w08.decision_guide_view(1024, 8.0, True, False, draw=False)
    assert small["chapter"] == "03" and small["mha_cache"] == 1024 * per_token
    decode = w08.decision_guide_view(1024, 8.0, True, True, draw=False)
    assert decode["chapter"] == "04"
    huge_exact = w08.decision_guide_view(2**20, 1.0, True, True, draw=False)
    assert "ring" in huge_exact["recommendation"]
    huge_approx = w08.decision_guide_view(2**20, 1.0, False, False, draw=False)
    assert huge_approx["chapter"] == "07"
    with pytest.raises(ValueError, match="memory_gib"):
        w08.decision_guide_view(1024, 0.0, draw=False)


def test_decision_guide_widget_updates_across_its_controls():
    w = w08.decision_guide()
    c = controls(w)
    seen = set()
    for T in c["seq_len"].options:
        c["seq_len"].value = T
        seen.add(w.result["chapter"])
    for gib in (c["GiB"].min, c["GiB"].max):
        c["GiB"].value = 2**gib
        assert w.result["mha_cache"] > 0
    for flag in ("exact needed", "decode-heavy"):
        for value in (False, True):
            c[flag].value = value
            assert "recommendation" in w.result
    assert len(seen) >= 2


def test_chapter_figures_are_registered_and_draw():
    for name in ("08_four_classes", "08_taxonomy", "08_complexity", "08_decode_tradeoff"):
        figure = FIGURES[name]()
        assert figure.axes
        matplotlib.pyplot.close(figure)
    figure = FIGURES["08_complexity"]()
    assert len(figure.axes) == 2 * len(bench08.PHASES)  # time and memory, one column per phase
    matplotlib.pyplot.close(figure)


def test_classes_and_taxonomy_come_from_the_catalogues_families():
    from course_lib.figures import ch08 as figures08

    assert list(figures08.CLASSES) == ["hardware-efficient", "compact", "sparse", "linear"]
    assert set(figures08.CLASSES) < set(catalogue.FAMILIES)
    assert figures08.CLASSES["linear"][-1] == "06-07" and figures08.CLASSES["compact"][-1] == "04"
    assert list(figures08.TAXONOMY) == [f for f in catalogue.FAMILIES if f != "exact"]
    for mechanism in catalogue.mechanisms():
        if mechanism.family != "exact":
            assert mechanism.title in figures08.TAXONOMY[mechanism.family]
    assert figures08.TAXONOMY["compact"] == ["MQA", "GQA", "MLA"]
    boxes = figures08._boxes(figures08.TAXONOMY["linear"])
    assert len(boxes) == 5 and ", ".join(boxes).replace("\n", " ").count("Gated DeltaNet") == 1


def test_all_suite_has_every_mechanism_in_every_phase_that_applies():
    methods, reference, lengths = bench08.all_suite("cpu")
    assert reference == "prefill:sdpa"
    expected = {
        f"{p}:{m.name}"
        for p in bench08.PHASES
        for m in catalogue.mechanisms(has="run")
        if p != "decode" or (m.causal and m.decode is not None)
    }
    assert set(methods) == expected
    assert {"train:efficient_attention", "prefill:linformer", "decode:gla", "decode:nsa"} <= set(methods)
    assert not {"decode:efficient_attention", "decode:lsh", "decode:block_sparse"} & set(methods)
    assert max(lengths) > bench08.FULL_SEQUENCE_MAX_T
    # train and prefill leave out lengths beyond FULL_SEQUENCE_MAX_T (SCORES_MAX_T where the
    # T x T scores are materialised); decode measures them
    assert methods["train:sdpa"](2 * bench08.FULL_SEQUENCE_MAX_T) is None
    assert methods["train:attention"](phases.SCORES_MAX_T * 2) is None
    assert methods["decode:sdpa"](2 * bench08.FULL_SEQUENCE_MAX_T) is not None
    for suite, phase in (
        (bench08.all_train_suite, "train"),
        (bench08.all_prefill_suite, "prefill"),
        (bench08.all_decode_suite, "decode"),
    ):
        methods, reference, _ = suite("cpu")
        assert reference == f"{phase}:sdpa" and {
            bench08.phase_of(Measurement(m, 1, 1, 0)) for m in methods
        } == {phase}


def test_phases_that_do_not_apply_say_why_and_lengths_follow_the_cost_model():
    assert "not causal" in phases.not_applicable("efficient_attention", "decode")
    assert "not causal" in phases.not_applicable("lsh", "decode")
    assert "no decoding step" in phases.not_applicable("block_sparse", "decode")
    assert phases.not_applicable("efficient_attention", "prefill") is None
    assert phases.max_length("block_sparse", "decode") == 0
    materialising = {m.name for m in phases.mechanisms() if phases.materialises_scores(m)}
    # the ones that call the course's naive attention (MLA through gqa_attention, differential
    # attention twice, SwitchHead once per head group) materialise the scores too
    assert {"attention", "mqa", "gqa", "topk", "mla", "differential", "switchhead"} == materialising
    for m in phases.mechanisms():
        expected = phases.SCORES_MAX_T if m.name in materialising else phases.FULL_SEQUENCE_MAX_T
        assert phases.max_length(m, "train") == phases.max_length(m, "prefill") == expected
    assert phases.max_length("gla", "decode") is None


def test_exact_mechanisms_agree_in_prefill():
    x = phases.phase_inputs("sdpa", 64)
    exact = [phases.prefill_step(m, x)() for m in ("attention", "sdpa", "flash_attention")]
    torch.testing.assert_close(exact[0], exact[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exact[2], exact[1], atol=1e-5, rtol=1e-4)
    # every exact mechanism is fed the same seeded numbers
    for name in ("attention", "flash_attention"):
        assert all(torch.equal(x[k], v) for k, v in phases.phase_inputs(name, 64).items())


@pytest.mark.parametrize("mechanism", catalogue.mechanisms(has="decode"), ids=IDS)
def test_decode_step_equals_the_last_row_of_the_full_causal_pass(mechanism):
    # Reference: the full causal pass over the first T tokens by an independent route (dense
    # masked softmax, or the token-by-token recurrence); the decode step sees only the cache / state.
    x = phases.phase_inputs(mechanism, 150, dtype=F64)
    lengths = (1, 70, 150)
    if "mini_batch_size" in mechanism.options:
        # TTT's one-token step from the state equals the full pass only when the first T - 1 tokens
        # end on a mini-batch edge (inside a mini-batch every gradient is taken at its first state).
        b = mechanism.options["mini_batch_size"]
        lengths = (1, b + 1, 2 * b + 1)
    for T in lengths:
        reference = output(independent_forward(mechanism, mechanism.tokens(x, 0, T)))[:, :, -1:]
        step, _ = phases.decode_step(mechanism, x, T)()
        assert step.shape[2] == 1 and step.shape[:2] == reference.shape[:2]
        torch.testing.assert_close(step, reference, atol=1e-8, rtol=1e-6)


def test_decode_step_of_the_window_reads_only_the_last_w_entries():
    window = catalogue.get("sliding_window").cache_window
    x = phases.phase_inputs("sliding_window", window + 40, dtype=F64)
    changed = {**x, "k": x["k"].clone()}
    changed["k"][:, :, :40] += 5.0  # keys older than the window
    same = [phases.decode_step("sliding_window", y)()[0] for y in (changed, x)]
    torch.testing.assert_close(*same)
    moved = [phases.decode_step("sdpa", y)()[0] for y in (changed, x)]
    assert not torch.allclose(*moved)


@pytest.mark.parametrize(
    "mechanism", [m for m in catalogue.mechanisms(has="decode") if m.decode == "state"], ids=IDS
)
def test_recurrent_decode_step_returns_the_state_after_the_token(mechanism):
    # TTT: the first T - 1 tokens end on a mini-batch edge (see the test above)
    T = 2 * mechanism.options["mini_batch_size"] + 1 if "mini_batch_size" in mechanism.options else 90
    x = phases.phase_inputs(mechanism, T, dtype=F64)
    _, state = phases.decode_step(mechanism, x, T)()
    _, expected = mechanism.run(x, form="recurrent", output_final_state=True)
    for got, want in zip(*(s if isinstance(s, tuple) else (s,) for s in (state, expected)), strict=True):
        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("mechanism", phases.mechanisms(), ids=IDS)
def test_train_step_gives_the_gradients_of_autograd_on_the_reference(mechanism):
    x = phases.phase_inputs(mechanism, 40, dtype=F64)
    grads = phases.train_step(mechanism, x)()
    assert len(grads) == len(mechanism.trainable)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # the same loss through an independent reference of the forward pass
    leaves = {k: x[k].detach().clone().requires_grad_(True) for k in mechanism.trainable}
    out = output(independent_forward(mechanism, {**x, **leaves}))
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    expected = torch.autograd.grad(out, list(leaves.values()), grad_output)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6)


def test_complexity_model_has_the_textbook_exponents():
    def slope(name, phase, key):
        values = [bench08.complexity(name, phase, T)[key] for T in (1024, 4096)]
        return math.log(values[1] / values[0]) / math.log(4)

    assert slope("attention", "prefill", "flops") == pytest.approx(2.0)
    assert slope("attention", "prefill", "bytes") > 1.8  # the T x T weights dominate
    assert 1.0 < slope("flash_attention", "prefill", "bytes") < 1.8  # K, V re-read once per query block
    for name in ("sliding_window", "linear_attention", "gla", "deltanet", "mamba2"):
        assert slope(name, "prefill", "flops") == pytest.approx(1.0)
    for name in ("attention", "sdpa", "flash_attention"):
        assert slope(name, "decode", "bytes") == pytest.approx(1.0, abs=0.02)  # the KV cache is read
    for name in ("sliding_window", "linear_attention", "gla", "deltanet", "mamba2"):
        assert slope(name, "decode", "flops") == 0.0  # a window or a state: O(1) in T
    H, D = 4, 64
    assert bench08.complexity("sdpa", "decode", 100)["flops"] == 4 * H * 100 * D
    assert (
        bench08.complexity("gla", "train", 512)["flops"]
        == 3 * bench08.complexity("gla", "prefill", 512)["flops"]
    )
    with pytest.raises(ValueError, match="phase"):
        bench08.complexity("sdpa", "inference", 64)
    with pytest.raises(ValueError, match="name"):
        bench08.complexity("flashy", "decode", 64)
    with pytest.raises(ValueError, match="T"):
        bench08.complexity("sdpa", "decode", 0)
    assert bench08.complexity("ttt_mlp", "prefill", 64) is None  # the entry declares no cost model
    g = catalogue.Geometry(batch=1, heads=2, head_dim=32)
    assert bench08.complexity("gla", "prefill", 96, heads=2, head_dim=32) == catalogue.get("gla").cost(
        "prefill", 96, g
    )


def test_phase_builders_run_end_to_end_and_report(tmp_path, capsys):
    # One short run of every mechanism in every phase that applies (the separate phase suites are
    # the same builders: see test_all_suite_has_every_mechanism_in_every_phase_that_applies).
    path = tmp_path / "all.json"
    arguments = ["all", "--lengths", "32", "--min-run-time", "0.01", "--no-progress", "--json", str(path)]
    results = bench_main([*arguments, "--plot", str(tmp_path / "all.png")])
    printed = capsys.readouterr().out
    for title in ("train: forward + backward", "prefill: forward", "decode: one step"):
        assert title in printed
    assert "cost model vs measurement" in printed and "T=32 ms (x sdpa)" in printed
    assert "n/a  efficient_attention: not causal" in printed
    assert "n/a  block_sparse: declares no decoding" in printed
    assert "not causal (each query sees the whole sequence): lsh, efficient_attention, linformer" in printed
    assert "no model" in printed  # e.g. NSA declares no cost model
    assert "KV cache / state per sequence and layer after T tokens" in printed
    assert "n/a  ring: not run: exact attention split across processes" in printed
    assert (
        "whole layers (input tokens of width H D; projections, routers and experts included): mla, switchhead"
        in printed
    )
    assert {r.method for r in results} == {m for p in bench08.PHASES for m in phases.phase_methods(p)}
    assert all(r.extra["mechanism"] == bench08.mechanism_of(r) for r in results)
    stored = w08.load_results(path)
    assert [r.method for r in stored] == [r.method for r in results] and stored[0].extra["flops"] > 0
    assert (tmp_path / "all.png").stat().st_size > 0


def test_phase_builders_bad_input():
    x = phases.phase_inputs("sdpa", 16)
    with pytest.raises(ValueError, match="name"):
        bench08.decode_step("mamba", x)
    with pytest.raises(ValueError, match="T"):
        bench08.decode_step("sdpa", x, 17)
    with pytest.raises(ValueError, match="name"):
        bench08.train_step("mamba", x)
    with pytest.raises(ValueError, match="name='efficient_attention' has no decode phase: not causal"):
        bench08.decode_step("efficient_attention", x)
    with pytest.raises(ValueError, match="name='ring' has no functional form"):
        phases.prefill_step("ring", x)
    with pytest.raises(ValueError, match="phase"):
        phases.not_applicable("gla", "finetune")
    with pytest.raises(ValueError, match="phase"):
        bench08.phase_methods("finetune")


def test_recall_suite_tiny_configuration_runs_end_to_end(monkeypatch):
    methods, reference, lengths = bench08.recall_suite("cpu", steps=2, progress=False)
    assert reference == "attention"
    results = sweep({m: methods[m] for m in ("attention", "gla")}, [16], min_run_time=0.01, progress=False)
    for r in results:
        assert 0.0 <= r.extra["accuracy"] <= 1.0 and r.extra["num_pairs"] == 1 and r.extra["steps"] == 2
    report = bench08.recall_report(results)
    assert "attention" in report and "gla" in report


def test_stored_recall_study_covers_every_mixer_or_lists_it_as_missing():
    # The lead commits results/recall_study.json (the study takes hours); it may be partial.
    path = recall_study.STUDY_PATH
    assert path.exists(), f"no stored summary: run {recall_study.COMMAND}, or --summarise"
    payload = json.loads(path.read_text())
    # the sweep ran for every mixer of the course
    assert {r["mixer"] for r in payload["sweep"]} == set(RECALL_MIXERS)
    for r in payload["sweep"]:
        assert r["stop"] in ("converged", "plateau", "cap") and 0.0 <= r["accuracy"]["64"] <= 1.0
    # every final run names how it stopped, its steps and its accuracy at every length of the grid
    for r in payload["final"]:
        assert r["stop"] in ("converged", "plateau", "cap") and r["steps"] <= r["cap"]
        assert set(r["accuracy"]) == {str(T) for T in payload["lengths"]}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert r["stop"] != "converged" or min(r["accuracy"].values()) >= payload["target"] - 0.05
        assert r["state_bytes"] == {str(T): state_bytes(r["mixer"], T) for T in payload["lengths"]}
    # whatever the plan holds and the summary lacks is listed under "missing", nothing silently short
    assert "missing" in payload, "a summary without its missing runs: store it with --summarise"
    pending = recall_study.pending(payload)
    listed = {(m["kind"], m["mixer"], m["seed"]) for m in payload["missing"] if m["kind"] != "state"}
    assert {("final", m, s) for m, seeds in pending["final"].items() for s in seeds} <= listed
    assert {("sweep", m, 0) for m in pending["sweep"]} <= listed
    assert {m for m in pending["state"]} <= {m["mixer"] for m in payload["missing"] if m["kind"] == "state"}
    assert len(payload["missing"]) == sum(len(v) for kind in pending.values() for v in kind.values())


def test_notebook_reads_the_recall_study_not_the_old_grid():
    text = (w08.RESULTS_DIR.parent / "notebooks" / "08_choosing_an_attention.ipynb").read_text()
    assert "recall_grid.json" not in text and "bench recall" not in text
    assert "recall_study.load_summary()" in text and recall_study.COMMAND in text


@pytest.mark.parametrize(
    "draw",
    [
        figures08.recall_sweep_figure,
        figures08.recall_final_figure,
        figures08.recall_distance_figure,
        figures08.recall_state_figure,
    ],
)
def test_recall_figures_draw_a_partial_summary_and_refuse_an_empty_one(draw, fake_recall_summary):
    figure = draw(fake_recall_summary)
    assert figure.axes and any(ax.lines or ax.collections or ax.patches for ax in figure.axes)
    legends = [ax.get_legend() for ax in figure.axes if ax.get_legend()]
    assert all(text.get_fontsize() >= 9 for legend in legends for text in legend.get_texts())
    with pytest.raises(ValueError, match="summary"):
        draw(recall_study.summarise([], [], []))


def test_recall_final_figure_draws_the_spread_over_seeds(fake_recall_summary):
    figure = figures08.recall_final_figure(fake_recall_summary)
    left = figure.axes[0]
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert labels == ["attention", "gla"]
    # attention at T = 256: seeds 0.97 and 0.95 -> mean 0.96, bar from 0.95 to 0.97
    mean_line = left.containers[0].lines[0]
    assert mean_line.get_ydata()[-1] == pytest.approx(0.96)
    bars = left.containers[0].lines[2][0].get_segments()
    assert bars[-1][:, 1] == pytest.approx([0.95, 0.97])


def test_recall_tasks_grow_their_pairs_with_the_length():
    assert [bench08.recall_task(T).num_pairs for T in (64, 128, 256)] == [4, 8, 16]  # Zoology's pairs
    assert bench08.recall_task(8).num_pairs == 1
    with pytest.raises(ValueError, match="T"):
        bench08.recall_task(2)
    with pytest.raises(ValueError, match="num_pairs"):
        bench08.recall_task(1024)  # 64 pairs: more than the 31 keys of the vocabulary


# --- the sources' relative charts, recomputed ---------------------------------------------------


def test_relative_to_divides_by_the_reference_at_one_length_and_phase():
    rows = [
        Measurement("train:attention", 512, 0.40, 400),
        Measurement("train:sdpa", 512, 0.10, 20),
        Measurement("train:sdpa", 1024, 9.0, 9),  # another length: ignored
        Measurement("prefill:attention", 512, 1.0, 1),  # another phase: ignored
    ]
    assert bench08.relative_to(rows, "train", 512) == {"attention": 1.0, "sdpa": 4.0}
    assert bench08.relative_to(rows, "train", 512, metric="memory") == {"attention": 1.0, "sdpa": 0.05}
    assert bench08.relative_to(rows, "train", 512, reference="sdpa") == {"attention": 0.25, "sdpa": 1.0}
    with pytest.raises(ValueError, match="reference"):
        bench08.relative_to(rows, "train", 2048)
    with pytest.raises(ValueError, match="metric"):
        bench08.relative_to(rows, "train", 512, metric="flops")
    with pytest.raises(ValueError, match="phase"):
        bench08.relative_to(rows, "inference", 512)


def test_relative_bars_scale_to_the_largest_value():
    text = bench08.relative_bars({"a": 1.0, "bb": 4.0}, width=8)
    assert text.splitlines() == ["a:  ##       1.00x", "bb: ######## 4.00x"]
    assert bench08.relative_bars({"a": 0.5}, unit="%", width=4) == "a: #### 50%"
    with pytest.raises(ValueError, match="values"):
        bench08.relative_bars({})
